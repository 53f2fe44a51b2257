"""What a round trip costs across a two-node RabbitMQ cluster, beside one node, ours and mosquitto.

    python -m bench.cluster            # about a minute; `make bench` runs it when RabbitMQ is here

The cluster is the one ``make cluster`` runs (cluster/main.py), on free ports. Our ping_client
and echo_client measure every row, in MQTT 3.1.1 (RabbitMQ 3.10 speaks nothing else), one ping
in flight every 10 ms. The rows alternate round by round, so that drift on a shared machine
hits them alike; each figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import REPO, env, free_port, ping, start_broker, start_program, workspace
from cluster.main import ClusterError, Layout, find_rabbitmq, write

RESULTS = Path(__file__).with_name("cluster.json")
BIN = Path(sys.executable).parent


@contextmanager
def rabbitmq_cluster(tmp: Path) -> Iterator[Layout]:
    """Run a fresh two-node cluster (without its clients) for the duration of a ``with``."""
    ports: list[int] = []
    while len(ports) < 5:
        if (port := free_port()) not in ports:
            ports.append(port)
    conf = write(tmp / "cluster", tmp / "logs", ports)
    layout = Layout.load(tmp / "cluster")
    subprocess.run([str(BIN / "supervisord"), "-c", str(conf)], check=True, env=env(), cwd=REPO)
    try:
        join_log = tmp / "logs" / "join.log"
        deadline = time.monotonic() + 120
        while "joined" not in (join_log.read_text() if join_log.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form; see {tmp / 'logs'}")
            time.sleep(0.2)
        # The join starts make cluster's own clients; the benchmark runs its own.
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "stop", "ping_client",
                        "echo_client"], check=True, capture_output=True)  # fmt: skip
        yield layout
    finally:
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"],
                       capture_output=True, check=False)  # fmt: skip
        pidfile = tmp / "cluster" / "supervisord.pid"
        deadline = time.monotonic() + 40
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def round_trip(ping_port: int, echo_port: int, qos: int, count: int) -> dict[str, float]:
    """Our ping_client on ``ping_port``, our echo_client on ``echo_port``: RTT percentiles."""
    common = ("--qos", str(qos), "--protocol", "3.1.1")
    echo = start_program("echo_client", echo_port, *common)
    try:
        # Warm-up; and it waits for the echo client's subscription to be in place everywhere.
        for _ in range(50):
            if ping(ping_port, 3, 0.01, *common, "--timeout", "1")["received"] == 3:
                break
        else:
            raise RuntimeError(f"no echo through {ping_port} -> {echo_port}")
        summary = ping(ping_port, count, 0.01, *common)
    finally:
        echo.terminate()
        echo.wait(10)
    r = summary["rtt_ms"]
    return {"p50": r["p50"], "p99": r["p99"], "lost": summary["sent"] - summary["received"]}


def main() -> None:
    """Measure and print the table; write bench/cluster.json."""
    parser = argparse.ArgumentParser(prog="bench.cluster")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    try:
        find_rabbitmq()
    except ClusterError as exc:
        sys.stdout.write(f"Cluster rows skipped: {exc}.\n")
        return
    rows: dict[str, dict[str, list[float]]] = {}
    with workspace() as tmp, rabbitmq_cluster(tmp) as layout:
        ours = start_broker("ours", tmp)
        mosquitto = start_broker("mosquitto", tmp)
        try:
            paths = {
                "RabbitMQ, across the two nodes": (layout.mqtt[0], layout.mqtt[1]),
                "RabbitMQ, one node": (layout.mqtt[0], layout.mqtt[0]),
                "ours (one broker)": (ours.port, ours.port),
                "mosquitto (one broker)": (mosquitto.port, mosquitto.port),
            }
            for _ in range(args.rounds):
                for qos in (0, 1):
                    for name, (p, e) in paths.items():
                        result = round_trip(p, e, qos, args.count)
                        row = rows.setdefault(f"{name}, QoS {qos}", {})
                        for key, value in result.items():
                            row.setdefault(key, []).append(value)
        finally:
            ours.stop()
            mosquitto.stop()
    table = {
        name: {k: sum(v) if k == "lost" else statistics.median(v) for k, v in row.items()}
        for name, row in rows.items()
    }
    lines = [
        f"Round trip through a RabbitMQ cluster ({args.rounds} rounds of {args.count} pings, "
        "10 ms apart, MQTT 3.1.1, our clients)",
        "| path | p50 | p99 | lost |",
        "|---|---|---|---|",
        *(f"| {name} | {row['p50']:.3f} ms | {row['p99']:.3f} ms | {row['lost']:.0f} |"
          for name, row in table.items()),
    ]  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")
    RESULTS.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
