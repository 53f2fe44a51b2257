"""The ping client as a probe: counts, loss, exit codes, JSON, summaries, strangers on the topic."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from tests.support import ECHO_READY, PYTHON, REPO, MqttProbe, Proc, Spawner, base_env, wait_until


def summary_counts(text: str) -> dict[str, int]:
    """Parse the counts line of a human summary."""
    match = re.search(
        r"(\d+) sent, (\d+) received, (\d+) lost, (\d+) late, (\d+) duplicate, ([\d.]+)% loss", text
    )
    assert match is not None, text
    keys = ("sent", "received", "lost", "late", "duplicates")
    return dict(zip(keys, (int(g) for g in match.groups()[:5]), strict=True))


def json_events(proc: Proc) -> list[dict[str, Any]]:
    """Every JSON event a --json ping client printed, the summary last."""
    events = [json.loads(line) for line in proc.out().splitlines()]
    assert events[-1]["event"] == "summary"
    return events


class FaultyEcho:
    """A misbehaving echo in the test process: it doubles or delays echoes on purpose."""

    def __init__(self, port: int, *, delay: float = 0.0, copies: int = 1) -> None:
        """Echo /ping to /pong ``copies`` times, ``delay`` seconds late."""
        self.probe = MqttProbe(port)
        self.delay = delay
        self.copies = copies
        self.probe.client.on_message = self._on_message
        self.probe.subscribe("/ping")

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)

        def send() -> None:
            for _ in range(self.copies):
                self.probe.client.publish("/pong", payload)

        if self.delay:
            timer = threading.Timer(self.delay, send)
            timer.daemon = True
            timer.start()
        else:
            send()

    def close(self) -> None:
        """Disconnect."""
        self.probe.close()


def test_count_5_exits_0_with_5_of_5(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", str(port), "--count", "5", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout) == {
        "sent": 5,
        "received": 5,
        "lost": 0,
        "late": 0,
        "duplicates": 0,
    }
    assert re.search(r"rtt min/avg/max/mdev = [\d.]+/[\d.]+/[\d.]+/[\d.]+ ms", result.stdout)
    assert re.search(r"rtt p50/p90/p99 = [\d.]+/[\d.]+/[\d.]+ ms", result.stdout)
    assert "disconnected 0.000 s, 0 reconnects" in result.stdout
    rtts = re.findall(r"Got b'[\d.]+' on /pong: seq \d, rtt (\d+\.\d{3}) ms\.", result.stderr)
    assert len(rtts) == 5
    # The second connection the broker shows is explained in the probe's own log.
    assert re.search(r"A second connection, \S+-watch, only watches /ping", result.stderr)


def test_without_echo_client_every_ping_is_lost_and_exit_is_1(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    result = spawn.run(
        "ping_client",
        "--port",
        str(port),
        "--count",
        "3",
        "--timeout",
        "0.5",
        "--interval",
        "0.2",
        "--silence",
        "0.5",
    )
    assert result.returncode == 1, result.stderr
    assert summary_counts(result.stdout) == {
        "sent": 3,
        "received": 0,
        "lost": 3,
        "late": 0,
        "duplicates": 0,
    }
    assert "100.0% loss" in result.stdout
    assert len(re.findall(r"Lost b'[\d.]+' on /ping: seq \d", result.stderr)) == 3
    assert result.stderr.count("is echo_client running") == 1


def test_without_broker_exit_is_2_after_connect_timeout(spawn: Spawner, port: int) -> None:
    result = spawn.run(
        "ping_client", "--port", str(port), "--count", "1", "--connect-timeout", "1", timeout=15
    )
    assert result.returncode == 2, result.stderr
    # One true line, not "disconnected 0.000 s, 0 reconnects, never connected".
    assert "never connected: [Errno 111] Connection refused\n" in result.stdout
    assert "reconnects" not in result.stdout
    assert (
        f"No usable link to 127.0.0.1:{port} within 1 s: [Errno 111] Connection refused."
        in result.stderr
    )
    assert result.stderr.count("Cannot connect") == 1
    assert "Traceback" not in result.stderr


def test_strangers_on_the_topics_do_not_change_the_counts(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    # A second ping client on the same broker, same topics, same schedule.
    other = spawn.start("ping_client", "--port", str(port), "--interval", "0.1", name="other")
    other.wait_for("Got b'")
    stray = MqttProbe(port)
    stop = threading.Event()

    def pester() -> None:
        while not stop.wait(0.05):
            stray.client.publish("/pong", b"stray")
            stray.client.publish("/pong", b"1744796556")

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        result = spawn.run("ping_client", "--port", str(port), "--count", "20", "--interval", "0.1")
    finally:
        stop.set()
        thread.join(5)
        stray.close()
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout) == {
        "sent": 20,
        "received": 20,
        "lost": 0,
        "late": 0,
        "duplicates": 0,
    }
    assert "unexpected echoes ignored" in result.stdout
    assert "Unexpected b'stray' on /pong" in result.stderr


def test_duplicate_echoes_are_counted_as_duplicates(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = FaultyEcho(port, copies=2)
    try:
        proc = spawn.start(
            "ping_client", "--port", str(port), "--interval", "0.1", "--json", name="ping"
        )
        wait_until(lambda: proc.out().count('"event":"duplicate"') >= 3, 10, "three duplicates")
        proc.signal(signal.SIGTERM)
        code = proc.wait(10)
    finally:
        echo.close()
    assert code == 0
    events = json_events(proc)
    summary = events[-1]
    pong_seqs = [e["seq"] for e in events if e["event"] == "pong"]
    dup_seqs = [e["seq"] for e in events if e["event"] == "duplicate"]
    assert summary["duplicates"] == len(dup_seqs) >= 3
    assert summary["received"] == len(pong_seqs)
    assert summary["lost"] == 0
    assert len(set(dup_seqs)) == len(dup_seqs)
    assert set(dup_seqs) <= set(pong_seqs)


def test_late_echoes_are_late_and_lost_not_received(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = FaultyEcho(port, delay=0.6)
    try:
        proc = spawn.start(
            "ping_client",
            "--port",
            str(port),
            "--count",
            "2",
            "--interval",
            "0.1",
            "--timeout",
            "0.3",
            "--json",
            name="ping",
        )
        # --count waits only for timeouts; keep the run going until the late echoes arrive.
        code = proc.wait(15)
    finally:
        echo.close()
    assert code == 1
    events = json_events(proc)
    summary = events[-1]
    assert (summary["sent"], summary["received"], summary["lost"]) == (2, 0, 2)
    # Whether a late echo beats the exit is a race; when it does, it is late, never received.
    assert summary["late"] == sum(1 for e in events if e["event"] == "late")


def test_late_echo_during_a_long_run(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = FaultyEcho(port, delay=0.5)
    try:
        proc = spawn.start(
            "ping_client",
            "--port",
            str(port),
            "--interval",
            "0.2",
            "--timeout",
            "0.25",
            "--json",
            name="ping",
        )
        wait_until(lambda: proc.out().count('"event":"late"') >= 2, 15, "two late echoes")
        proc.signal(signal.SIGTERM)
        code = proc.wait(10)
    finally:
        echo.close()
    assert code == 1
    events = json_events(proc)
    summary = events[-1]
    assert summary["received"] == 0
    assert summary["late"] >= 2
    assert summary["late"] <= summary["lost"]
    late_seqs = [e["seq"] for e in events if e["event"] == "late"]
    assert len(late_seqs) == len(set(late_seqs)) == summary["late"]


def test_json_lines_parse_and_agree_with_the_human_summary(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run(
        "ping_client", "--port", str(port), "--count", "4", "--interval", "0.1", "--json"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["start", "connected"]  # ping's first line, then the link
    assert kinds.count("ping") == 4
    assert kinds.count("pong") == 4
    assert kinds[-1] == "summary"
    summary = events[-1]
    human = summary_counts(result.stderr)
    assert human == {k: summary[k] for k in ("sent", "received", "lost", "late", "duplicates")}
    pongs = [e for e in events if e["event"] == "pong"]
    assert all(isinstance(e["rtt_ms"], float) and e["rtt_ms"] > 0 for e in pongs)
    assert summary["rtt_ms"]["min"] == min(e["rtt_ms"] for e in pongs)
    assert summary["rtt_ms"]["max"] == max(e["rtt_ms"] for e in pongs)
    match = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/", result.stderr)
    assert match is not None
    assert float(match.group(1)) == summary["rtt_ms"]["min"]
    assert float(match.group(3)) == summary["rtt_ms"]["max"]


def test_sigterm_mid_run_prints_the_summary_and_exits_by_the_rules(
    spawn: Spawner, port: int
) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    ping = spawn.start("ping_client", "--port", str(port), "--interval", "0.05", name="ping")
    wait_until(lambda: ping.count(r"Got b'") >= 5, 10, "five pongs")
    ping.signal(signal.SIGTERM)
    assert ping.wait(5) == 0
    counts = summary_counts(ping.out())
    assert counts["lost"] == 0
    assert counts["received"] >= 5
    assert counts["sent"] - counts["received"] <= 1  # at most the one in flight at the signal


def test_rolling_status_line(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    ping = spawn.start(
        "ping_client",
        "--port",
        str(port),
        "--interval",
        "0.1",
        "--stats-interval",
        "1",
        name="ping",
    )
    line = ping.wait_for(
        r"Last 1 s: (\d+) sent, (\d+) received, (\d+) lost, rtt p50 [\d.]+ ms, "
        r"p99 [\d.]+ ms\."
    )
    assert int(line.group(1)) >= 5


def test_echo_silence_is_reported_once_and_its_end_too(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    ping = spawn.start(
        "ping_client",
        "--port",
        str(port),
        "--interval",
        "0.1",
        "--timeout",
        "0.3",
        "--silence",
        "0.5",
        name="ping",
    )
    ping.wait_for(r"No echo for \d+ s: is echo_client running on /ping\?")
    spawn.start("echo_client", "--port", str(port), name="echo")
    ping.wait_for(r"Echoes are back after [\d.]+ s of silence\.")
    wait_until(lambda: ping.count(r"Got b'") >= 3, 10, "pongs after the echo came back")
    assert ping.count("is echo_client running") == 1


SLOW_SUBSCRIBE_BROKER = """
import asyncio, sys
from broker import client

registered = client.Client._subscribe


def late(self, session, packet):
    # The fault: a busy broker registers the pong subscription half a second late (its SUBACK
    # goes out only after the registration).
    if any(want.topic_filter == "/pong" for want in packet.filters):
        asyncio.get_running_loop().call_later(0.5, registered, self, session, packet)
        return
    registered(self, session, packet)


client.Client._subscribe = late
from broker.main import main
main(sys.argv[1:])
"""


def test_no_ping_goes_out_before_the_pong_subscription_is_acknowledged(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    (tmp_path / "slow_subscribe_broker.py").write_text(SLOW_SUBSCRIBE_BROKER)
    broker = spawn.start(
        "slow_subscribe_broker", "--port", str(port), env=base_env(PYTHONPATH=str(tmp_path))
    )
    broker.wait_for(r"Listening on 127\.0\.0\.1:\d+")
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run(
        "ping_client", "--port", str(port), "--count", "5", "--interval", "0.05", "--timeout", "2"
    )
    # Pings sent before SUBACK had their echoes dropped by the broker: 5 of 5 lost, exit 1.
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_counts(result.stdout)["received"] == 5


def test_ping_style_short_flags_quiet_and_payload_size(spawn: Spawner, port: int) -> None:
    """-c -i -W -w -s -q -V, as ping and mosquitto_sub users type them."""
    broker = spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    watcher = MqttProbe(port)
    watcher.subscribe("/ping")
    result = spawn.run("ping_client", "--port", str(port), "-c", "3", "-i", "0.1", "-W", "2",
                       "-w", "20", "-s", "64", "-q", "-V", "3.1.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout)["received"] == 3
    assert "Publishing" not in result.stderr  # -q: nothing per ping
    assert "Got b'" not in result.stderr
    payloads = [payload for _, payload in (watcher.expect() for _ in range(3))]
    assert all(len(p) == 64 and p.rstrip(b" ").replace(b".", b"").isdigit() for p in payloads)
    broker.wait_for(r"Client ping_client-\S+ connected from \S+ \(MQTT 3\.1\.1\)")
    watcher.close()


def test_a_ping_larger_than_correlation_data_may_be_is_answered(spawn: Spawner, port: int) -> None:
    """MQTT 5 and -s 70000, the ping alone and a fleet: correlation data has a two-byte length,
    and carries the timestamp without the padding (it was the whole payload: a traceback)."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    for fleet in ((), ("--devices", "2")):
        result = spawn.run("ping_client", "--port", str(port), "-c", "2", "-i", "0.1", "-W", "2",
                           "-s", "70000", *fleet)  # fmt: skip
        assert result.returncode == 0, result.stderr
        pings = 2 * (2 if fleet else 1)
        assert f"{pings} sent, {pings} received, 0 lost" in result.stdout, result.stdout
        assert "Traceback" not in result.stderr


def test_a_ping_over_the_brokers_maximum_packet_size_ends_the_run_with_what_fits(
    spawn: Spawner, port: int
) -> None:
    """-s larger than the broker's Maximum Packet Size (its CONNACK): nothing sent, one line
    saying which -s fits, exit 64; the ping alone and a fleet. That -s is answered.

    paho does not check [MQTT-3.2.2-15]: each ping cost the connection (0x95), was lost, and the
    reconnect loop went round until the count ran out, blaming "another client using the id".
    """
    broker = spawn.broker(port, "--max-packet-size", "1000")
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    for fleet, fits in (((), 961), (("--devices", "2"), 938)):  # a fleet's topics are longer
        result = spawn.run("ping_client", "--port", str(port), "-c", "3", "-i", "0.1",
                           "-s", "2000", *fleet)  # fmt: skip
        assert result.returncode == 64, result.stdout + result.stderr
        too_large = re.findall(r"ERROR +client: (.*)", result.stderr)
        assert too_large == [
            f"Cannot ping: a {3000 - fits}-byte PUBLISH is over the Maximum Packet Size of"
            f" 127.0.0.1:{port} (1000 bytes, from its CONNACK); nothing sent. At most --size"
            f" {fits} fits."
        ], result.stderr
        assert re.search(r"\b0 sent, ", result.stdout), result.stdout
        assert "Lost connection" not in result.stderr
        exact = spawn.run("ping_client", "--port", str(port), "-c", "2", "-i", "0.1",
                          "-s", str(fits), *fleet)  # fmt: skip
        assert exact.returncode == 0, exact.stdout + exact.stderr
    assert "exceeds" not in broker.err()  # nothing too large reached it


def test_every_program_says_its_version(spawn: Spawner) -> None:
    for program, words in (("broker", "MQTT 5.0 and 3.1.1"), ("ping_client", "aiomqtt"),
                           ("echo_client", "paho-mqtt")):  # fmt: skip
        result = spawn.run(program, "--version", timeout=10)
        assert result.returncode == 0
        assert re.match(rf"{program} .*mqtt-pingpong \d", result.stdout)
        assert words in result.stdout


def test_flood_logs_nothing_per_ping(spawn: Spawner, port: int) -> None:
    """ping -f: 200 pings and no line per ping (there were two each), the summary as usual."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", str(port), "--flood", "-c", "200")
    assert result.returncode == 0, result.stderr
    assert summary_counts(result.stdout)["received"] == 200
    assert "Publishing" not in result.stderr
    assert "Got b'" not in result.stderr
    assert "back to back (flood)" in result.stderr


def test_flood_with_an_interval_pings_at_that_interval(spawn: Spawner, port: int) -> None:
    """ping -f -i: the flood's output, at the interval given (it was ignored: back to back)."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", str(port), "--flood", "-i", "0.1", "-c", "5",
                       "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start"
    assert events[0]["interval"] == 0.1
    sent = [e["time"] for e in events if e["event"] == "ping"]
    assert len(sent) == 5
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) > 0.05, gaps  # back to back, they are a few milliseconds apart
    assert "every 0.1 s (flood)" in result.stderr
    assert "Publishing" not in result.stderr


def test_flood_on_a_terminal_draws_a_dot_per_ping_and_rubs_it_out_per_reply(
    spawn: Spawner, port: int
) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [PYTHON, "-m", "ping_client", "--port", str(port), "--flood", "-c", "50"],
            stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, env=base_env(),
            cwd=REPO, timeout=30, check=False,
        )  # fmt: skip
        os.close(follower)
        screen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal has nothing more (EIO once the writer is gone)
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    marks = re.sub(rb"\d{4}-\d\d-\d\d \d\d:[^\n]*\n", b"", screen)  # the log lines out
    assert marks.count(b".") == 50  # a dot per ping sent
    assert marks.count(b"\b \b") == 50  # every reply rubbed out its dot
    assert b"Publishing" not in screen


def test_a_deadline_that_shortens_a_run_says_why(spawn: Spawner, port: int) -> None:
    """--deadline 1.5 with pings every 0.2 s: none is sent in the last 0.2 s, and the summary
    says so instead of leaving a short run unexplained."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", str(port), "-i", "0.2", "-w", "1.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no ping in the last 0.2 s before the 1.5 s deadline" in result.stdout
