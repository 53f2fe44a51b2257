"""Bounded, isolated delivery on the wire: the window, the queue, and counted drops.

The broker here runs with a small window and queue (--max-inflight 5, --max-queued 50), so each
bound is reached with a few hundred messages.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import PYTHON, Proc, Spawner, base_env, wait_until

INFLIGHT, QUEUED = 5, 50


@pytest.fixture(params=["uvloop", "asyncio"])
def broker(spawn: Spawner, port: int, request: pytest.FixtureRequest) -> Proc:
    """A broker with a window of 5 and a queue of 50, on each event loop."""
    return spawn.broker(port, "--max-inflight", str(INFLIGHT), "--max-queued", str(QUEUED),
                        "--event-loop", request.param)  # fmt: skip


def connected(port: int, client_id: str, *, clean: bool = True) -> RawClient:
    """A raw client, accepted."""
    client = RawClient(port)
    assert client.connect(client_id, clean=clean)[1] == 0
    return client


def publish_qos1(publisher: RawClient, count: int, start: int = 0) -> None:
    """Send ``count`` QoS 1 messages (payloads '0000', '0001', ...) and read every PUBACK."""
    publisher.send(b"".join(m.publish("t/x", f"{i:04d}".encode(), qos=1, packet_id=i + 1)
                            for i in range(start, start + count)))  # fmt: skip
    assert [publisher.expect(m.PUBACK).packet_id for _ in range(count)] == [
        i + 1 for i in range(start, start + count)
    ]


def test_a_stuck_subscriber_gets_the_window_and_the_publisher_is_kept(
    broker: Proc, port: int
) -> None:
    stuck = connected(port, "stuck")
    assert stuck.subscribe(1, ("t/#", 1)) == [1]
    publisher = connected(port, "publisher")
    publish_qos1(publisher, 300)  # every PUBACK comes back: the publisher is served
    bystander = connected(port, "bystander")
    assert bystander.subscribe(1, ("t/x", 0)) == [0]
    publisher.send(m.publish("t/x", b"after"))
    assert bystander.message().payload == b"after"  # others are served too
    # The stuck client got the window: 5 messages, none beyond, until it acknowledges.
    window = [stuck.message() for _ in range(INFLIGHT)]
    assert [w.payload for w in window] == [f"{i:04d}".encode() for i in range(INFLIGHT)]
    assert stuck.barrier() == []
    broker.wait_for(r"Dropping messages for client stuck: queue full \(50\)\.")
    # Each PUBACK lets one more through, in order, from the queue: the 50 kept after the window.
    got = [w.payload for w in window]
    unacknowledged = [w.packet_id or 0 for w in window]
    while unacknowledged:
        stuck.send(m.ack(m.PUBACK, unacknowledged.pop(0)))
        if len(got) < INFLIGHT + QUEUED:
            message = stuck.message()
            got.append(message.payload)
            unacknowledged.append(message.packet_id or 0)
    assert got == [f"{i:04d}".encode() for i in range(INFLIGHT + QUEUED)]
    assert stuck.barrier() == []
    dropped = 301 - INFLIGHT - QUEUED  # 300, and "after"
    broker.wait_for(
        rf"Client stuck: queue drained; {dropped} messages were dropped while it was full\."
    )
    assert broker.count("Dropping messages for client stuck") == 1  # once per episode


def test_an_offline_session_keeps_the_first_messages_up_to_the_bound(
    broker: Proc, port: int
) -> None:
    away = connected(port, "away", clean=False)
    assert away.subscribe(1, ("t/#", 1)) == [1]
    away.send(m.DISCONNECT_PACKET)
    assert away.closed_within(5)
    publish_qos1(connected(port, "flood"), 120)
    back = RawClient(port)
    assert back.connect("away", clean=False) == (True, 0)
    got: list[bytes] = []
    while len(got) < QUEUED:
        message = back.message()
        got.append(message.payload)
        back.send(m.ack(m.PUBACK, message.packet_id or 0))
    assert got == [f"{i:04d}".encode() for i in range(QUEUED)]
    assert back.barrier() == []
    broker.wait_for(r"Client away: queue drained; 70 messages were dropped while it was full\.")


def test_packet_ids_never_run_out(broker: Proc, port: int) -> None:
    """amqtt closed the publisher at 65,535 pending messages for a stuck subscriber."""
    stuck = connected(port, "stuck-long")
    assert stuck.subscribe(1, ("t/#", 1)) == [1]
    publisher = connected(port, "publisher-long")
    for batch in range(8):  # 80,000 messages, 10,000 at a time
        publisher.send(b"".join(m.publish("t/x", b"x", qos=1, packet_id=i % 65535 + 1)
                                for i in range(batch * 10_000, (batch + 1) * 10_000)))  # fmt: skip
        for _ in range(10_000):
            publisher.expect(m.PUBACK)
    assert publisher.barrier() == []
    wait_until(lambda: broker.count("Dropping messages for client stuck-long") == 1, 5, "one line")
    assert broker.count("internal error") == 0


def test_qos2_messages_awaiting_pubrel_are_bounded(broker: Proc, port: int) -> None:
    hoarder = connected(port, "hoarder")
    hoarder.send(b"".join(m.publish("t/x", b"x", qos=2, packet_id=i) for i in range(1, QUEUED + 1)))
    assert [hoarder.expect(m.PUBREC).packet_id for _ in range(QUEUED)] == list(range(1, QUEUED + 1))
    hoarder.send(m.publish("t/x", b"x", qos=2, packet_id=1, dup=True))  # a resend: still fine
    assert hoarder.expect(m.PUBREC).packet_id == 1
    hoarder.send(m.publish("t/x", b"one too many", qos=2, packet_id=QUEUED + 1))
    assert hoarder.closed_within(3)
    broker.wait_for(r"Client hoarder closed: more than 50 QoS 2 messages awaiting PUBREL")
    assert connected(port, "other").barrier() == []


def test_the_broker_raises_its_open_files_limit_to_serve_more_clients(
    port: int, tmp_path: Path
) -> None:
    """The usual soft limit (1024; 256 here) would refuse clients the hard limit allows."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 1024, "this machine allows too few open files for the test"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    log = tmp_path / "broker.err"
    with log.open("wb") as err:
        broker = subprocess.Popen(
            [PYTHON, "-m", "broker", "--port", str(port)], stderr=err, env=base_env(),
            preexec_fn=low_soft_limit,  # noqa: PLW1509 - before exec, no threads to fear
        )  # fmt: skip
    try:
        wait_until(lambda: "Listening on" in log.read_text(), 10, "the broker listening")
        assert f"raised the limit from 256 to {hard}" in log.read_text()
        clients = [connected(port, f"many-{i}") for i in range(300)]
        assert clients[-1].barrier() == []
    finally:
        broker.terminate()
        broker.wait(10)
