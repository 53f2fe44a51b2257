"""The broker in-process: its hub and engine on a real loopback socket, clients on real sockets.

Where the wire tests see what a client sees, these see what the broker holds: the bounds on a
client's window and queue, and nothing left behind by clients that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import ClassVar

from bench.harness import LeanClient
from broker.main import Running, running
from broker.settings import BrokerSettings, Limits
from tests import mqtt_raw as m

SETTINGS = BrokerSettings(port=0, limits=Limits(max_inflight=4, max_queued=30))


class Client(LeanClient):
    """The benchmark's lean client, kept for the test's cleanup, with what these tests need."""

    opened: ClassVar[list[Client]] = []

    @classmethod
    async def open(cls, port: int, client_id: str, *, clean: bool = True) -> Client:
        """Connect and wait for an accepting CONNACK."""
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        Client.opened.append(client)
        client.writer.write(m.connect(client_id, clean=clean))
        kind, body = await client.read()
        assert (kind, body[1]) == (m.CONNACK, 0)
        return client

    async def read(self) -> tuple[int, bytes]:
        """One packet: its type and body."""
        first, body = await self.read_packet()
        return first >> 4, body

    async def expect(self, kind: int) -> bytes:
        """Read until a packet of ``kind``; return its body."""
        while True:
            got, body = await asyncio.wait_for(self.read(), 5)
            if got == kind:
                return body

    async def barrier(self) -> None:
        """PINGREQ, and wait for PINGRESP: everything sent before it has been handled."""
        self.writer.write(m.PINGREQ_PACKET)
        await self.expect(m.PINGRESP)


def in_process(test: Callable[[Running, int], Awaitable[None]]) -> None:
    """Run ``test`` against an in-process broker on a free port."""

    async def main() -> None:
        async with running(SETTINGS) as broker:
            port = broker.listeners["default"].sock.getsockname()[1]
            try:
                await asyncio.wait_for(test(broker, port), 30)
            finally:
                for client in Client.opened:
                    client.writer.close()
                    with contextlib.suppress(ConnectionError):
                        await client.writer.wait_closed()
                Client.opened.clear()

    asyncio.run(main())


def test_a_stuck_subscriber_costs_at_most_its_window_and_its_queue() -> None:
    async def test(broker: Running, port: int) -> None:
        stuck = await Client.open(port, "stuck")
        await stuck.subscribe("t/#", 1)
        publisher = await Client.open(port, "publisher")
        publisher.writer.write(b"".join(m.publish("t/x", bytes(100), qos=1, packet_id=i)
                                        for i in range(1, 501)))  # fmt: skip
        for _ in range(500):
            await publisher.expect(m.PUBACK)
        session = broker.hub.online["stuck"].session
        assert session is not None
        assert len(session.inflight_out) == 4  # the window
        assert broker.engine.queued(session) == 30  # the queue; the other 466 were dropped

    in_process(test)


def test_clients_that_are_gone_leave_nothing_behind() -> None:
    async def test(broker: Running, port: int) -> None:
        before = broker.engine.counts()
        for i in range(50):
            client = await Client.open(port, f"passing-{i}")
            await client.subscribe(f"t/{i}/#", i % 3)
            if i % 2:
                client.writer.write(m.DISCONNECT_PACKET)
            client.writer.close()
            await client.writer.wait_closed()
        watcher = await Client.open(port, "watcher")
        for _ in range(100):  # until the broker has seen every connection end
            if len(broker.hub.online) == 1:
                break
            await watcher.barrier()
        assert list(broker.hub.online) == ["watcher"]
        assert broker.engine.counts() == (before[0] + 1, before[1])

    in_process(test)


def test_a_persistent_session_keeps_its_queue_in_order_across_reconnects() -> None:
    async def test(broker: Running, port: int) -> None:
        sub = await Client.open(port, "keeper", clean=False)
        await sub.subscribe("k/#", 1)
        sub.writer.write(m.DISCONNECT_PACKET)
        sub.writer.close()
        publisher = await Client.open(port, "k-publisher")
        publisher.writer.write(b"".join(m.publish("k/x", b"%d" % i, qos=1, packet_id=i + 1)
                                        for i in range(10)))  # fmt: skip
        for _ in range(10):
            await publisher.expect(m.PUBACK)
        back = await Client.open(port, "keeper", clean=False)
        got = []
        for _ in range(10):
            body = await back.expect(m.PUBLISH)
            size = struct.unpack_from("!H", body)[0]
            got.append(body[4 + size :])
            back.writer.write(m.ack(m.PUBACK, struct.unpack_from("!H", body, 2 + size)[0]))
        assert got == [b"%d" % i for i in range(10)]
        await back.barrier()
        session = broker.hub.online["keeper"].session
        assert session is not None
        assert not session.inflight_out
        assert broker.engine.queued(session) == 0

    in_process(test)


def test_a_fan_out_is_written_in_growing_batches_and_a_few_connections_once() -> None:
    """The first subscribers of a fan-out are written after 4 are encoded, then 8, 16 and 32 at
    a time; fewer than 4 connections (a pinger, its echo) get one write, at the callback's end.

    Batches of 32 from the first made the first subscriber wait for 31 others to be encoded:
    its delivery p50 went from 0.274 to 0.258 ms with the growing batches (4 rounds each,
    1,000 subscribers; mosquitto 0.219), the CPU per delivery unchanged.
    """
    from broker.hub import Hub  # noqa: PLC0415 - the unit under test, on its own

    flushed: list[int] = []

    class Writer:
        def __init__(self, index: int) -> None:
            self.index = index

        def flush(self) -> None:
            flushed.append(self.index)

    hub = Hub(Limits())
    for rounds, connections, written_early in ((2, 70, [4, 12, 28, 60]), (1, 3, [])):
        for _ in range(rounds):
            flushed.clear()
            hub.batching = True
            sizes = []
            for index in range(connections):
                hub.mark(Writer(index))
                if len(flushed) not in sizes:
                    sizes.append(len(flushed))
            assert [s for s in sizes if s] == written_early
            hub.flush()  # the callback's end: the rest, and the batches start again at 4
            assert flushed == list(range(connections))
