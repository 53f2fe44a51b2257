"""`make cluster`: our two clients across a real two-node RabbitMQ cluster, under supervisord."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from cluster.main import NODES, ClusterError, Layout, find_rabbitmq
from tests.support import (
    BIN,
    PYTHON,
    REPO,
    base_env,
    free_port,
    pid_alive,
    supervisor_children,
    supervisord_pid,
    wait_until,
)


def rabbitmq() -> Path:
    """Return RabbitMQ's scripts directory, or fail with how to get it."""
    try:
        return find_rabbitmq()
    except ClusterError:
        pytest.fail("RabbitMQ is not installed: apt-get install rabbitmq-server (.ci/run does)")


def log(logs: Path, name: str) -> str:
    path = logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


@pytest.mark.timeout(180)
def test_the_clients_round_trip_across_a_two_node_rabbitmq_cluster(tmp_path: Path) -> None:
    """ping_client on node 1, echo_client on node 2: every ping crosses the cluster, at QoS 1.

    RabbitMQ 3.10 speaks MQTT 3.1.1 only and hangs up on the clients' MQTT 5 CONNECT; they fall
    back. A shutdown of supervisord (what Ctrl-C on `make cluster` does) leaves nothing behind.
    """
    ctl = rabbitmq() / "rabbitmqctl"
    ports: list[int] = []
    while len(ports) < 5:
        if (port := free_port()) not in ports:
            ports.append(port)
    directory, logs = tmp_path / "c", tmp_path / "logs"
    written = subprocess.run(
        [PYTHON, "-m", "cluster", "write", "--dir", str(directory), "--logs", str(logs),
         "--ports", ",".join(map(str, ports))],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    conf = Path(written.stdout.strip())
    layout = Layout.load(directory)
    env = base_env(MQTT_QOS="1", MQTT_INTERVAL="0.2")
    subprocess.run([str(BIN / "supervisord"), "-c", str(conf)], check=True, timeout=30, env=env)
    pid = supervisord_pid(directory / "supervisord.pid")
    try:

        def pongs() -> int:
            return len(re.findall(r"client: Got b'[\d.]+' on /pong: seq \d+, rtt",
                                  log(logs, "ping_client")))  # fmt: skip

        wait_until(lambda: pongs() >= 10, 120, "10 pongs across the cluster")
        status = subprocess.run(
            [str(ctl), "-n", NODES[0], "cluster_status", "--formatter", "json"],
            env=layout.env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        running = json.loads(status.stdout)["running_nodes"]
        # A fleet spread over both nodes (--host twice), MQTT 3.1.1 as RabbitMQ 3.10 speaks
        # it: each device on its own topic, answered through the echo client on node 2.
        fleet = subprocess.run(
            [PYTHON, "-m", "ping_client", "--host", f"127.0.0.1:{ports[0]}", "--host",
             f"127.0.0.1:{ports[1]}", "--devices", "6", "-V", "3.1.1", "--qos", "1", "--count",
             "3", "--interval", "0.2", "--client-id", "fleet", "--json"],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO, env=base_env(),
        )  # fmt: skip
        assert fleet.returncode == 0, fleet.stderr[-2000:]
        summary = json.loads(fleet.stdout.splitlines()[-1])
        assert (summary["devices_ever_up"], summary["sent"], summary["received"]) == (6, 18, 18)
        children = supervisor_children(pid)
        before_stop = log(logs, "ping_client")
    finally:
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"],
                       capture_output=True, timeout=60, check=False)  # fmt: skip
        wait_until(lambda: not pid_alive(pid), 40, "supervisord to exit")
    assert sorted(running) == sorted(NODES)
    # Nothing left: both nodes (and their Erlang children), epmd, the clients.
    wait_until(lambda: not any(pid_alive(p) for p in children), 10, "every program to exit")

    ping, echo, join = log(logs, "ping_client"), log(logs, "echo_client"), log(logs, "join")
    assert f"Connected to 127.0.0.1:{ports[0]} " in ping
    assert f"Connected to 127.0.0.1:{ports[1]} " in echo
    assert f"{NODES[1]} joined {NODES[0]}" in join
    fallback = "hung up on an MQTT 5 CONNECT without a CONNACK, and accepts MQTT 3.1.1"
    assert fallback in ping
    assert fallback in echo
    for text in (ping, echo, join):
        assert error_lines(text) == [], text
    assert "Lost" not in before_stop  # the clients start once the cluster has formed
    # Stopped first, the ping client summarises a clean run.
    assert "Lost" not in ping
    assert re.search(r"\d+ sent, \d+ received, 0 lost", ping), ping[-2000:]


def test_cluster_write_refuses_bad_ports_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "cluster", "write", "--dir", str(tmp_path), "--ports", "10011,x"],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "cluster: error: --ports: five port numbers separated by commas: '10011,x'"
    )
    assert not (tmp_path / "supervisord.conf").exists()
