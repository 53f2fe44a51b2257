"""The three programs under real supervisord, on a copy of the repository's config."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.support import (
    free_port,
    logged_pongs,
    pid_alive,
    port_accepts,
    program_log,
    supervised,
    supervisor_children,
    supervisorctl,
    supervisord_pid,
    wait_until,
)


def test_supervisord_runs_all_three_and_leaves_nothing_behind(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 2, 20, "two pongs in ping_client.log")
        status = supervisorctl(conf, "status")
        for program in ("broker", "echo_client", "ping_client"):
            assert re.search(rf"^{program}\s+RUNNING", status, re.MULTILINE), status
        assert "echo_client: Got b'" in program_log(tmp_path, "echo_client")
        assert f"Listening on 127.0.0.1:{port}" in program_log(tmp_path, "broker")
        sock = tmp_path / "run" / "sv.sock"
        assert sock.stat().st_mode & 0o777 == 0o700
        pid = supervisord_pid(tmp_path / "run" / "supervisord.pid")
        children = supervisor_children(pid)
        assert len(children) >= 3
    assert not pid_alive(pid)
    assert not any(pid_alive(child) for child in children)
    assert not port_accepts(port)
    for program in ("broker", "echo_client", "ping_client"):
        assert "Traceback" not in program_log(tmp_path, program)


def test_broker_killed_is_restarted_and_pongs_resume(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 1, 20, "a first pong")
        old = re.search(r"pid (\d+)", supervisorctl(conf, "status", "broker"))
        assert old is not None
        os.kill(int(old.group(1)), signal.SIGKILL)
        wait_until(
            lambda: (
                "Lost connection" in program_log(tmp_path, "echo_client")
                and "Lost connection" in program_log(tmp_path, "ping_client")
            ),
            10,
            "both clients to report the loss",
        )
        wait_until(lambda: "Reconnected" in program_log(tmp_path, "ping_client"), 15, "reconnect")
        before = logged_pongs(tmp_path)
        wait_until(lambda: logged_pongs(tmp_path) >= before + 2, 15, "pongs to resume")
        for name in ("echo_client", "ping_client"):
            text = program_log(tmp_path, name)
            assert text.count("Lost connection") == 1, text
            assert text.count("Reconnected") == 1, text


def test_one_client_id_for_the_whole_system_gives_each_program_its_own(
    tmp_path: Path, port: int
) -> None:
    """MQTT_CLIENT_ID=demo make run: supervisord hands the id to both clients."""
    with supervised(tmp_path, port, ['MQTT_CLIENT_ID="demo"']):
        wait_until(lambda: logged_pongs(tmp_path) >= 3, 20, "three pongs")
        broker = program_log(tmp_path, "broker")
        assert "Client demo-echo_client connected" in broker
        assert "Client demo-ping_client connected" in broker
        for name in ("echo_client", "ping_client"):
            text = program_log(tmp_path, name)
            assert f"as demo-{name}." in text
            assert "Lost connection" not in text, text


def test_the_environment_moves_the_websocket_port_that_the_config_defaults(
    tmp_path: Path, port: int
) -> None:
    """MQTT_WS_PORT=N make run: the config's 10080 is a default, not an override."""
    ws_port = free_port()
    with supervised(tmp_path, port, [f'MQTT_WS_PORT="{ws_port}"']) as conf:
        wait_until(
            lambda: (
                f"Listening on 127.0.0.1:{ws_port} for MQTT over WebSockets"
                in program_log(tmp_path, "broker")
            ),
            20,
            "the WebSocket listener on the port from the environment",
        )
        assert port_accepts(ws_port)
        # The shell that fills in the default has exec'd: supervisord watches python itself.
        wait_until(lambda: "RUNNING" in supervisorctl(conf, "status", "broker"), 10, "RUNNING")
        pid = re.search(r"pid (\d+)", supervisorctl(conf, "status", "broker"))
        assert pid is not None
        argv = Path(f"/proc/{pid.group(1)}/cmdline").read_bytes().split(b"\0")
        assert argv[1:3] == [b"-m", b"broker"], argv
