"""Bad input and load against the broker: it stays up and keeps serving ping/echo throughout."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import ECHO_READY, MqttProbe, Proc, Spawner, rss_kib

SEED = 20261129


def round_trip(port: int, payload: bytes) -> None:
    """A real client's ping must still come back from the echo client (after any backlog)."""
    probe = MqttProbe(port)
    try:
        probe.subscribe("/pong")
        probe.publish("/ping", payload)
        deadline = time.monotonic() + 10
        while (got := probe.expect(max(0.1, deadline - time.monotonic()))) != ("/pong", payload):
            assert got[0] == "/pong", got  # earlier pings' echoes may still be on their way
    finally:
        probe.close()


def valid_sequences(rng: random.Random) -> list[bytes]:
    """Well-formed packet sequences, for the mutator to break."""
    topic = rng.choice(["/ping", "a/b", "x" * rng.randint(1, 40)])
    return [
        m.connect(f"fz{rng.randint(0, 99999)}", keepalive=rng.randint(0, 5)),
        m.connect("fz-w", will=("w/t", b"bye", rng.randint(0, 2), rng.random() < 0.5))
        + m.publish(topic, rng.randbytes(rng.randint(0, 64)), qos=rng.randint(0, 2)),
        m.connect("fz-s") + m.subscribe(rng.randint(1, 9), (topic, rng.randint(0, 2)))
        + m.unsubscribe(3, topic) + m.PINGREQ_PACKET,
        m.connect("fz-q") + m.publish(topic, b"q", qos=1, packet_id=5) + m.ack(m.PUBACK, 1)
        + m.ack(m.PUBREL, 2) + m.DISCONNECT_PACKET,
    ]  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption: flips, truncation, a lying length, junk, bad UTF-8."""
    kind = rng.randrange(6)
    raw = bytearray(data)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        raw = raw[: rng.randrange(1, len(raw))]
    elif kind == 2:  # a remaining length that lies (bigger than what follows)
        raw[1] = rng.choice([0x7F, 0xFF]) if len(raw) > 1 else 0x7F
    elif kind == 3:  # random bytes before CONNECT
        raw = bytearray(rng.randbytes(rng.randint(1, 16))) + raw
    elif kind == 4:  # invalid UTF-8 where a string starts
        position = min(len(raw) - 1, rng.randint(2, 12))
        raw[position : position + 2] = b"\xff\xfe"
    else:  # pure noise
        raw = bytearray(rng.randbytes(rng.randint(1, 300)))
    return bytes(raw)


@pytest.fixture
def system(spawn: Spawner, port: int) -> Proc:
    """A broker (2 s connect timeout) and an echo client."""
    broker = spawn.broker(port, "--handshake-timeout", "2", "--max-packet-size", "65536")
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    return broker


@pytest.mark.timeout(120)
def test_fuzzed_packets_never_stop_the_broker(system: Proc, port: int) -> None:
    rng = random.Random(SEED)  # noqa: S311 - reproducible noise, not secrets
    deadline = time.monotonic() + 40  # bounded in time as well as in count
    cases = 0
    for batch in range(10):
        for _ in range(40):
            data = mutate(rng.choice(valid_sequences(rng)), rng)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(4096)  # whatever the broker says before it closes, if anything
                except (ConnectionResetError, BrokenPipeError, TimeoutError):
                    pass
            cases += 1
        round_trip(port, f"after batch {batch}".encode())
        if time.monotonic() > deadline:
            break
    assert cases >= 200
    assert system.popen.poll() is None
    assert "Traceback" not in system.err()


def test_connection_flood_and_slowloris(system: Proc, port: int, spawn: Spawner) -> None:
    idle = []
    for i in range(1000):
        c = RawClient(port, timeout=10)
        c.send(m.connect(f"idle-{i}", keepalive=0))
        idle.append(c)
    for c in idle:
        c.expect(m.CONNACK)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    try:
        result = spawn.run("ping_client", "--port", str(port), "--count", "20",
                           "--interval", "0.05", "--timeout", "2")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        # Connections that never send CONNECT are closed after --handshake-timeout (2 s).
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(max(0.1, started + 8 - time.monotonic()))
            assert sock.recv(1) == b"", "a silent connection got data"
        assert system.popen.poll() is None
        assert idle[0].barrier() == []  # the idle ones are still served
    finally:
        for sock in silent:
            sock.close()


@pytest.fixture
def publishers(port: int) -> list[RawClient]:
    """Twenty connected publishers (closed after the test, like every RawClient)."""
    clients = [RawClient(port) for _ in range(20)]
    for i, c in enumerate(clients):
        assert c.connect(f"load-{i}", keepalive=0) == (False, 0)
    return clients


def test_message_load_keeps_ping_echo_working(
    system: Proc, port: int, spawn: Spawner, publishers: list[RawClient]
) -> None:
    """Twenty publishers at 200 msg/s each to their own topics (make soak runs this for 30 s)."""
    stop = threading.Event()
    sent = 0

    def load() -> None:
        nonlocal sent
        batches = [m.publish(f"load/{i}", b"x" * 32) * 10 for i in range(len(publishers))]
        tick = time.monotonic()
        while not stop.is_set():
            for client, batch in zip(publishers, batches, strict=True):
                client.send(batch)
            sent += 10 * len(publishers)
            tick += 0.05  # 10 messages per publisher every 50 ms: 200 msg/s each
            stop.wait(max(0.0, tick - time.monotonic()))

    before = rss_kib(system.popen.pid)
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        result = spawn.run("ping_client", "--port", str(port), "--count", "25",
                           "--interval", "0.2", "--timeout", "2")  # fmt: skip
    finally:
        stop.set()
        thread.join(5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sent >= 4000 * 4
    round_trip(port, b"after the load")
    assert system.popen.poll() is None
    assert rss_kib(system.popen.pid) - before < 50 * 1024


def test_subscribers_leaving_mid_stream_do_not_stall_the_publisher(system: Proc, port: int) -> None:
    """A subscriber that hangs up while its echoes are being written must not break the echo.

    (The broker once wrote to a connection it had half-closed; the RuntimeError killed the
    reader of the *publishing* client, which then looked connected but was never read again.)
    """
    for round_ in range(8):
        leaver = RawClient(port)
        assert leaver.connect(f"leaver-{round_}", keepalive=0) == (False, 0)
        assert leaver.subscribe(1, ("/pong", 0)) == [0]
        leaver.send(b"".join(m.publish("/ping", str(i).encode()) for i in range(200)))
        leaver.close()  # gone while the echoes of its 200 pings are on their way to it
    round_trip(port, b"still echoing")
    assert "Traceback" not in system.err()
    assert "never retrieved" not in system.err()
