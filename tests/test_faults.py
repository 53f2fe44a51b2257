"""Faults against the real programs under real supervisord: kills, outages, freezes, crash loops."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mqtt_raw import RawClient
from tests.support import (
    ECHO_READY,
    Spawner,
    logged_pongs,
    pid_alive,
    program_log,
    rss_kib,
    supervised,
    supervisorctl,
    wait_until,
)

FAST = ['MQTT_INTERVAL="0.2"', 'MQTT_TIMEOUT="0.5"', 'MQTT_SILENCE="1"']


def pid_of(conf: Path, program: str) -> int:
    """The pid of a program, once supervisord reports it RUNNING (past its startsecs)."""
    match = wait_until(
        lambda: re.search(r"RUNNING\s+pid (\d+)", supervisorctl(conf, "status", program)),
        10,
        f"{program} RUNNING",
    )
    return int(match.group(1))


def stamp(line: str) -> dt.datetime:
    """The timestamp at the start of one of our log lines."""
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")


def test_broker_sigkill_clients_recover_fast_and_nothing_doubles(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port, FAST) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 3, 20, "first pongs")
        os.kill(pid_of(conf, "broker"), signal.SIGKILL)
        wait_until(
            lambda: program_log(tmp_path, "broker").count("Listening on") == 2, 15, "restart"
        )
        wait_until(lambda: "Reconnected" in program_log(tmp_path, "ping_client"), 10, "reconnect")
        before = logged_pongs(tmp_path)
        wait_until(lambda: logged_pongs(tmp_path) >= before + 5, 10, "pongs after the restart")
        listening = [
            ln for ln in program_log(tmp_path, "broker").splitlines() if "Listening on" in ln
        ]
        ready = stamp(listening[1])
        first_pong = next(
            stamp(ln) for ln in program_log(tmp_path, "ping_client").splitlines()
            if "client: Got b'" in ln and stamp(ln) > ready
        )  # fmt: skip
        recovery = (first_pong - ready).total_seconds()
        # 100 ms retry + connect + the next 200 ms tick: well under a second here (make soak
        # measures it). Asserted generously, so that load on two cores cannot fail it by
        # chance, while a 5 s timeout in the loop (aiomqtt's default) still would.
        assert recovery < 4.0, recovery
        for name in ("echo_client", "ping_client"):
            text = program_log(tmp_path, name)
            assert text.count("Lost connection") == 1, text
            assert text.count("Reconnected") == 1, text
        ping_log = program_log(tmp_path, "ping_client")
        assert "Duplicate" not in ping_log
        echoed = re.findall(
            r"echo_client: Publishing (b'[\d.]+') on /pong", program_log(tmp_path, "echo_client")
        )
        assert len(echoed) == len(set(echoed)), "a ping was echoed twice"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_broker_down_for_60_s_clients_retry_quietly_and_recover(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port, FAST) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 2, 20, "first pongs")
        assert "stopped" in supervisorctl(conf, "stop", "broker")
        clients = {name: pid_of(conf, name) for name in ("echo_client", "ping_client")}
        lines_before = {name: len(program_log(tmp_path, name).splitlines()) for name in clients}
        wait_until(
            lambda: all("Lost connection" in program_log(tmp_path, n) for n in clients), 10, "loss"
        )
        rss_before = {name: rss_kib(pid) for name, pid in clients.items()}
        # The reminder lines come every 15 s; the fourth says a minute has passed.
        wait_until(
            lambda: all(
                re.search(r"Still cannot reach \S+ after 6\d s", program_log(tmp_path, n))
                for n in clients
            ),
            75,
            "a minute of retrying",
        )
        rss_after = {name: rss_kib(pid) for name, pid in clients.items()}
        assert "started" in supervisorctl(conf, "start", "broker")
        wait_until(
            lambda: all("Reconnected" in program_log(tmp_path, n) for n in clients), 10, "recovery"
        )
        before = logged_pongs(tmp_path)
        wait_until(lambda: logged_pongs(tmp_path) >= before + 3, 10, "pongs again")
        for name in clients:
            outage = program_log(tmp_path, name).splitlines()[lines_before[name] :]
            retry_lines = [ln for ln in outage if "onnect" in ln or "Still cannot" in ln]
            assert len(retry_lines) <= 7, retry_lines  # loss + 4 reminders + recovery (+ slack)
            assert rss_after[name] - rss_before[name] < 2048, (rss_before, rss_after)
            assert re.search(r"Reconnected to \S+ after 6\d\.\d+ s \(\d{3} attempts\)",
                             program_log(tmp_path, name))  # fmt: skip


def test_echo_client_stopped_then_started(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port, FAST) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 2, 20, "first pongs")
        assert "stopped" in supervisorctl(conf, "stop", "echo_client")
        wait_until(
            lambda: "is echo_client running" in program_log(tmp_path, "ping_client"), 10, "silence"
        )
        assert re.search(r"Lost b'[\d.]+' on /ping: seq \d+", program_log(tmp_path, "ping_client"))
        assert "started" in supervisorctl(conf, "start", "echo_client")
        wait_until(
            lambda: "Echoes are back" in program_log(tmp_path, "ping_client"), 10, "echoes back"
        )
        before = logged_pongs(tmp_path)
        wait_until(lambda: logged_pongs(tmp_path) >= before + 3, 10, "pongs again")
        assert program_log(tmp_path, "ping_client").count("is echo_client running") == 1


def test_echo_client_killed_is_restarted_and_pongs_resume(tmp_path: Path, port: int) -> None:
    with supervised(tmp_path, port, FAST) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 2, 20, "first pongs")
        old = pid_of(conf, "echo_client")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not pid_alive(old), 5, "the echo client to die")
        before = logged_pongs(tmp_path)
        wait_until(
            lambda: logged_pongs(tmp_path) >= before + 3, 15, "pongs from the new echo client"
        )
        assert pid_of(conf, "echo_client") != old


def test_frozen_client_is_dropped_after_1_5_keepalive_and_recovers(
    tmp_path: Path, port: int
) -> None:
    with supervised(tmp_path, port, [*FAST, 'MQTT_KEEPALIVE="2"']) as conf:
        wait_until(lambda: logged_pongs(tmp_path) >= 2, 20, "first pongs")
        echo = pid_of(conf, "echo_client")
        os.kill(echo, signal.SIGSTOP)
        try:
            # The broker keeps serving everyone else while one client is frozen.
            probe = RawClient(port)
            assert probe.connect("probe") == (False, 0)
            assert probe.barrier() == []
            wait_until(
                lambda: re.search(
                    r"Client echo_client-\w+ closed: silent for more than 3 s",
                    program_log(tmp_path, "broker"),
                ),
                10,
                "the broker to drop the frozen client",
            )
        finally:
            os.kill(echo, signal.SIGCONT)
        wait_until(
            lambda: "Reconnected" in program_log(tmp_path, "echo_client"), 15, "echo to reconnect"
        )
        before = logged_pongs(tmp_path)
        wait_until(lambda: logged_pongs(tmp_path) >= before + 3, 10, "pongs again")


def test_broker_that_cannot_bind_ends_fatal_and_the_others_keep_running(
    tmp_path: Path, port: int
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with supervised(tmp_path, port) as conf:
            wait_until(lambda: re.search(r"^broker\s+FATAL", supervisorctl(conf, "status"),
                                         re.MULTILINE), 30, "broker FATAL")  # fmt: skip
            broker_log = program_log(tmp_path, "broker")
            # Each start says why it failed, once. 1 + startretries (3) starts, or more: a start
            # that fails only after startsecs (1 s, a busy machine) counted as up, and was
            # restarted afresh (5 in one fresh-clone CI).
            starts = program_log(tmp_path, "supervisord").count("spawned: 'broker'")
            assert starts >= 4
            assert broker_log.count(f"port {port} on 127.0.0.1 is already in use") == starts
            assert "Traceback" not in broker_log
            status = supervisorctl(conf, "status")
            assert re.search(r"^echo_client\s+RUNNING", status, re.MULTILINE), status
            assert re.search(r"^ping_client\s+RUNNING", status, re.MULTILINE), status
            assert "gave up: broker entered FATAL state" in program_log(tmp_path, "supervisord")


def test_persistent_qos1_loses_nothing_while_the_echo_client_is_killed(
    tmp_path: Path, port: int, spawn: Spawner
) -> None:
    """--session persistent at QoS 1: pings sent while echo_client is down wait in its session
    at the broker, and are answered when supervisord has restarted it; none twice."""
    persistent = ['MQTT_QOS="1"', 'MQTT_SESSION="persistent"']
    with supervised(tmp_path, port, persistent) as conf:
        assert "stopped" in supervisorctl(conf, "stop", "ping_client")  # ours is run below
        wait_until(lambda: re.search(ECHO_READY, program_log(tmp_path, "echo_client")), 20,
                   "the echo client")  # fmt: skip
        ping = spawn.start(
            "ping_client", "--port", str(port), "--qos", "1", "--session", "persistent",
            "--count", "300", "--interval", "0.1", "--timeout", "15", "--json",
            "--stats-interval", "0", name="ping",
        )  # fmt: skip

        def pongs_reach(wanted: int) -> Callable[[], bool]:
            return lambda: ping.out().count('"event":"pong"') >= wanted

        def gone(pid: int) -> Callable[[], bool]:
            return lambda: not pid_alive(pid)

        # About 30 s at 10 pings/s, and the echo client killed five times along the way.
        for kill in range(5):
            wait_until(pongs_reach(40 + 50 * kill), 30, "pongs before the next kill")
            old = pid_of(conf, "echo_client")
            os.kill(old, signal.SIGKILL)
            wait_until(gone(old), 5, "the echo client to die")
        assert ping.wait(60) == 0, ping.err()[-2000:]
    summary = json.loads(ping.out().splitlines()[-1])
    assert summary["event"] == "summary"
    assert (summary["sent"], summary["received"], summary["never_answered"]) == (300, 300, 0)
    assert summary["late"] == 0
