"""The echo round trip over a real broker and real sockets."""

from __future__ import annotations

import os

import pytest

from tests.hostile import Proxy, hostile_broker
from tests.support import ECHO_READY, MqttProbe, Spawner, free_port, wait_until


@pytest.fixture
def system(spawn: Spawner, port: int) -> MqttProbe:
    """A broker and an echo client, and a paho peer subscribed to /pong."""
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
    probe = MqttProbe(port)
    probe.subscribe("/pong")
    return probe


@pytest.mark.parametrize(
    "payload",
    [b"1744796556", b"", bytes(range(256)), b"\xff\xfe\x00not utf-8", os.urandom(64 * 1024)],
    ids=["timestamp", "empty", "all-bytes", "invalid-utf8", "64KiB"],
)
def test_echo_returns_every_payload_byte_for_byte(system: MqttProbe, payload: bytes) -> None:
    system.publish("/ping", payload)
    assert system.expect() == ("/pong", payload)
    system.close()


def test_echo_ignores_other_topics_and_never_loops(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
    probe = MqttProbe(port)
    probe.subscribe("#")
    ignored = ("/pong", "/pong/dev", "/ping/a/b", "ping", "/other")
    for topic in ignored:
        probe.publish(topic, b"not for echo")
    probe.publish("/ping", b"marker")
    # Everything above arrives in order; after the marker's echo, nothing else may come back.
    seen = [probe.expect() for _ in range(len(ignored) + 2)]
    assert seen[: len(ignored)] == [(t, b"not for echo") for t in ignored]
    assert seen[len(ignored) :] == [("/ping", b"marker"), ("/pong", b"marker")]
    # A device's own ping topic (an MQTT 3.1.1 fleet's) is answered on its own pong topic.
    probe.publish("/ping/dev-1", b"second")
    assert [probe.expect(), probe.expect()] == [("/ping/dev-1", b"second"),
                                                ("/pong/dev-1", b"second")]  # fmt: skip
    assert probe.drain() == []
    assert echo.count(r"Publishing") == 2
    probe.close()


def test_echo_skips_payloads_over_the_limit(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), "--max-payload", "100", name="echo")
    echo.wait_for(ECHO_READY)
    probe = MqttProbe(port)
    probe.subscribe("/pong")
    probe.publish("/ping", b"x" * 101)
    echo.wait_for(r"Skipping 101-byte payload: over the 100-byte limit\.")
    probe.publish("/ping", b"small")
    assert probe.expect() == ("/pong", b"small")
    probe.close()


def test_an_echo_over_the_brokers_maximum_packet_size_is_skipped_not_sent(
    spawn: Spawner, port: int
) -> None:
    """A ping that fits the broker's Maximum Packet Size whose echo does not (a longer pong
    topic): skipped with a warning, the connection kept, the next ping answered.

    Sent, it cost the echo its connection (0x95); at QoS 1 paho would send it again on every
    connection after, and no ping would be answered again: one publisher stopping the echo.
    """
    broker = spawn.broker(port, "--max-packet-size", "1000")
    pong = "/pong/" + "x" * 29  # 30 bytes longer than /ping
    echo = spawn.start("echo_client", "--port", str(port), "--qos", "1", "--pong-topic", pong,
                       name="echo")  # fmt: skip
    echo.wait_for(ECHO_READY)
    probe = MqttProbe(port)
    probe.subscribe(pong)
    probe.publish("/ping", b"x" * 988, qos=1)  # a 1000-byte PUBLISH at QoS 1
    echo.wait_for(
        r"Not echoing b'x+\.\.\. \(988 bytes\) on /pong/x+: a 1031-byte PUBLISH is over the"
        rf" Maximum Packet Size of 127\.0\.0\.1:{port} \(1000 bytes, from its CONNACK\)\."
    )
    probe.publish("/ping", b"small", qos=1)
    assert probe.expect() == (pong, b"small")
    probe.close()
    assert "Lost connection" not in echo.err()
    assert "exceeds" not in broker.err()


def test_the_echo_keeps_to_the_brokers_receive_maximum(spawn: Spawner, port: int) -> None:
    """A burst of QoS 2 pings through a broker whose CONNACK says Receive Maximum 5: the echo
    has at most 5 echoes unacknowledged at once [MQTT-3.3.4-7], and keeps its connection.

    paho kept to its own limit (1,000 here): our broker, with ``--max-queued 5``, closed the
    echo at every burst ("more than 5 QoS 2 messages awaiting PUBREL", 0x93).
    """
    broker = spawn.broker(port, "--max-queued", "5")
    echo = spawn.start("echo_client", "--port", str(port), "--qos", "2", name="echo")
    echo.wait_for(ECHO_READY)
    # 20 devices, pinging at once: the broker's bound of 5 queued may drop some deliveries to
    # the echo (it says so), which the fleet counts as lost; what counts here is the echo.
    spawn.run("ping_client", "--port", str(port), "--devices", "20", "--qos", "2", "-c", "2",
              "-i", "0.05", "--jitter", "0", "-W", "1")  # fmt: skip
    assert echo.count(r"Publishing b'") >= 5, echo.err()
    assert "Lost connection" not in echo.err()
    assert "awaiting PUBREL" not in broker.err()


def test_echo_logs_binary_payloads_safely_and_truncated(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
    probe = MqttProbe(port)
    probe.subscribe("/pong")
    probe.publish("/ping", b"\x00\xff" * 1000)
    assert probe.expect() == ("/pong", b"\x00\xff" * 1000)
    line = echo.wait_for(r"Got .* on /ping\.").group(0)
    assert "(2000 bytes)" in line
    assert len(line) < 200
    probe.close()


def test_ping_client_count_gets_every_echo(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", str(port), "--count", "3", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert "3 sent, 3 received, 0 lost" in result.stdout
    assert result.stderr.count("Publishing b'") == 3
    assert len([line for line in result.stderr.splitlines() if "client: Got b'" in line]) == 3


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_ping_is_acknowledged_only_once_its_echo_is(
    spawn: Spawner, port: int, protocol: str
) -> None:
    """At QoS 1 the echo client takes ownership of a ping only when the broker has its echo.

    The first echo client's PUBLISH of the echo is swallowed on the way to the broker, and the
    client is then SIGKILLed. Had it acknowledged the ping on receipt (paho's default), the
    broker would hold nothing for it and the ping would be lost. It did not, so its restarted
    self gets the ping again from its persistent session, and echoes it.
    """
    spawn.broker(port)
    proxy_port = free_port()
    probe = MqttProbe(port)
    probe.subscribe("/pong", qos=1)
    echo_args = ("--qos", "1", "--session", "persistent", "--client-id", "echo-owner",
                 "--protocol", protocol)  # fmt: skip
    swallower = Proxy(port, swallow=True)
    with hostile_broker(proxy_port, swallower):
        first = spawn.start("echo_client", "--port", str(proxy_port), *echo_args, name="echo1")
        first.wait_for(ECHO_READY)
        probe.publish("/ping", b"1744796556", qos=1)
        wait_until(lambda: swallower.swallowed, 10, "the echo's PUBLISH, swallowed")
        first.kill()
    assert probe.drain() == []
    second = spawn.start("echo_client", "--port", str(port), *echo_args, name="echo2")
    assert probe.expect(10) == ("/pong", b"1744796556")
    second.wait_for(r"Got b'1744796556' on /ping\.")
    assert probe.drain() == []
    probe.close()
