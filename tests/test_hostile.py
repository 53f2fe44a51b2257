"""The probe always returns, and both clients stay calm, against brokers that break the protocol.

Each broken broker is a small socket server (tests/hostile.py). For each, the probe must end
within its bound with the exit status that says what happened, one ERROR line that says what
the broker did wrong, and nothing else at ERROR: no traceback, no "exception was never
retrieved" from the client library.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from functools import partial

import pytest

from tests.hostile import BEHAVIOURS, HostileBroker, hostile_broker, never_puback
from tests.support import ECHO_READY, Spawner, free_port, wait_until

CONNECT_TIMEOUT = 3.0
# How much later than its bound the probe may end on a loaded two-core machine: the bound is
# measured inside the process, the elapsed time here includes interpreter start-up.
MARGIN = 4.0

# The one-line reason each broken broker earns: what it did wrong, as the probe saw it.
REASONS = {
    "silent after CONNACK": r"no SUBACK for /pong after [\d.]+ s",
    "garbage after CONNACK": (
        r"connection closed before (SUBSCRIBE /pong|SUBACK \(Protocol error\))"
    ),
    "garbage instead of CONNACK": r"connection closed before CONNACK \(Protocol error\)",
    "close after CONNACK": r"connection closed before (SUBSCRIBE /pong|SUBACK \(.*\))",
    "256 MB packet after CONNACK": r"no SUBACK for /pong after [\d.]+ s",
    "one byte per second": r"no CONNACK after [\d.]+ s",
}


def retried(broker: HostileBroker) -> bool:
    """Whether a client has come back to ``broker`` after its first connection."""
    return broker.connections >= 2


def error_lines(log: str) -> list[str]:
    """Every log line at ERROR."""
    return [line for line in log.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
def test_probe_ends_with_one_reason(spawn: Spawner, port: int, behaviour: str) -> None:
    with hostile_broker(port, BEHAVIOURS[behaviour]) as broker:
        started = time.monotonic()
        result = spawn.run(
            "ping_client", "--port", str(port), "--count", "2",
            "--connect-timeout", str(CONNECT_TIMEOUT), timeout=30,
        )  # fmt: skip
        took = time.monotonic() - started
    assert broker.connections >= 1
    assert result.returncode == 2, result.stderr
    assert CONNECT_TIMEOUT <= took < CONNECT_TIMEOUT + MARGIN, took
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    pattern = rf"No usable link to 127\.0\.0\.1:{port} within 3 s: {REASONS[behaviour]}\.$"
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.stderr
    assert "never connected" in result.stdout


def test_deadline_alone_bounds_a_run_against_a_silent_broker(spawn: Spawner, port: int) -> None:
    with hostile_broker(port, BEHAVIOURS["silent after CONNACK"]):
        started = time.monotonic()
        result = spawn.run("ping_client", "--port", str(port), "--deadline", "2", timeout=30)
        took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert 2 <= took < 2 + MARGIN, took
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert re.search(
        rf"No usable link to 127\.0\.0\.1:{port} within the 2 s deadline: "
        r"no SUBACK for /pong after [\d.]+ s\.$",
        errors[0],
    )


def test_counted_run_ends_by_its_derived_deadline_when_the_broker_dies(
    spawn: Spawner, port: int
) -> None:
    """A link that goes away for good: ticks are skipped for ever, the deadline ends the run."""
    broker = spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    # Derived deadline: connect timeout 2 + 4 pings x 0.5 s + timeout 0.5 + 1 s slack = 5.5 s.
    ping = spawn.start(
        "ping_client", "--port", str(port), "--count", "4", "--interval", "0.5",
        "--timeout", "0.5", "--connect-timeout", "2", name="ping",
    )  # fmt: skip
    ping.wait_for(r"Got b'[\d.]+' on /pong: seq 1,")
    broker.kill()
    assert ping.wait(15) == 1
    err, out = ping.err(), ping.out()
    # The broker died after the first pong: at most one more ping went out, unanswered.
    assert re.search(r"^[12] sent, 1 received", out, re.MULTILINE), out
    assert re.search(r"Deadline of 5\.5 s reached with 3 pings unanswered\.", err), err
    assert "deadline 5.5 s reached, 3 unanswered" in out
    assert error_lines(err) == [], err


def test_deadline_run_on_a_healthy_system_ends_clean(spawn: Spawner, port: int) -> None:
    """--deadline without --count: pings stop in time to be answered, so exit 0 and no loss."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    started = time.monotonic()
    result = spawn.run(
        "ping_client", "--port", str(port), "--deadline", "3", "--interval", "0.2", timeout=30
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert took < 3 + MARGIN
    match = re.search(r"^(\d+) sent, (\d+) received, 0 lost", result.stdout, re.MULTILINE)
    assert match is not None, result.stdout
    assert int(match.group(1)) >= 3
    assert match.group(1) == match.group(2)


def test_deadline_with_unanswered_pings_exits_1(spawn: Spawner, port: int) -> None:
    """No echo client: every ping is still waiting (timeout 10 s) when the deadline ends it."""
    spawn.broker(port)
    result = spawn.run(
        "ping_client", "--port", str(port), "--deadline", "2", "--interval", "0.2",
        "--timeout", "10", "--json", timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = [line for line in result.stdout.splitlines() if '"event":"summary"' in line]
    assert len(summary) == 1
    assert '"deadline_reached":true' in summary[0]
    assert re.search(r'"unanswered":[1-9]', summary[0]), summary[0]
    assert error_lines(result.stderr) == [], result.stderr


def test_echo_client_stays_calm_against_every_broken_broker(spawn: Spawner) -> None:
    """It retries with a bounded log, logs no ERROR and no traceback, and stops on SIGTERM."""
    with contextlib.ExitStack() as stack:
        pairs = []
        for name, behaviour in BEHAVIOURS.items():
            port = free_port()
            broker = stack.enter_context(hostile_broker(port, behaviour))
            echo = spawn.start("echo_client", "--port", str(port), name=name.replace(" ", "-"))
            pairs.append((broker, echo))
        for broker, echo in pairs:
            # Each broken link is reported once, with its reason; then the echo client tries
            # again (SUBACK and CONNACK waits take up to 5 s each).
            echo.wait_for(r"Cannot connect to 127\.0\.0\.1:\d+: .+\. Retrying every 100 ms\.", 15)
            wait_until(partial(retried, broker), 15, "a second attempt")
        for _, echo in pairs:
            echo.signal(signal.SIGTERM)
        for _, echo in pairs:
            assert echo.wait(10) == 0, echo.err()
            err = echo.err()
            assert error_lines(err) == [], err
            assert "Traceback" not in err
            assert err.count("Cannot connect") == 1, err
            assert "Echoed 0 messages" in err


def test_a_stop_does_not_wait_for_pubacks_that_never_come(spawn: Spawner, port: int) -> None:
    """QoS 1 pings whose PUBACKs never arrive (a broker gone quiet, or one that closed first)
    must not hold SIGTERM past the shutdown bound: aiomqtt would wait 5 s for each."""
    with hostile_broker(port, never_puback):
        ping = spawn.start("ping_client", "--port", str(port), "--qos", "1", "--interval",
                           "0.05", name="ping")  # fmt: skip
        wait_until(lambda: ping.count("Publishing b'") >= 5, 10, "pings going out")
        started = time.monotonic()
        ping.signal(signal.SIGTERM)
        code = ping.wait(10)
    assert code in (0, 1), ping.err()[-1500:]
    assert time.monotonic() - started < 3.0
