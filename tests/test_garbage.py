"""A closed connection is freed when it closes, not left in reference cycles for the collector.

First with the broker in this process (its objects are only visible here), on a real event
loop, and real clients talking to it over real sockets from a thread: MQTT 3.1.1 and 5, QoS 0,
1 and 2 both ways, keepalive, wills, a DISCONNECT or a dropped socket, a refused CONNECT, a
connection that never sends CONNECT. Then the broker as a program, whose garbage collector
makes full collections ten times rarer than CPython's default (broker/main.py): thousands of
clients connecting and closing must not grow it.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import mqtt5
import pytest
import uvloop

from broker.main import running
from broker.settings import parse
from tests import mqtt_raw as m
from tests.mqtt_raw import V5, RawClient
from tests.support import Spawner, free_port, rss_kib, wait_until
from tests.test_metrics import scrape

Runner = Callable[[Coroutine[Any, Any, None]], None]

OURS = ("broker.", "amqtt.")
"""Modules whose objects must not be left as garbage."""


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine on the event loop the test is parametrized with."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


def clients(port: int) -> None:
    """What clients do, over real sockets: connect, subscribe, publish both ways, leave."""
    silent = RawClient(port)  # never sends a thing: waits for CONNECT until it leaves, last
    sub = RawClient(port)
    assert sub.connect("sub", keepalive=30) == (False, 0)
    assert sub.subscribe(1, ("t/#", 2)) == [2]
    pub = RawClient(port)
    assert pub.connect("pub", will=("t/will", b"gone", 0, False)) == (False, 0)
    for qos in (0, 1, 2):
        pub.send(m.publish("t/x", b"m%d" % qos, qos=qos, packet_id=10 + qos))
        if qos == 1:
            pub.expect(m.PUBACK)
        if qos == 2:
            pub.expect(m.PUBREC)
            pub.send(m.ack(m.PUBREL, 12))
            pub.expect(m.PUBCOMP)
        got = sub.receive()
        if got.kind != m.PUBLISH:
            raise AssertionError(got)
        if qos == 1:
            sub.send(m.ack(m.PUBACK, got.packet_id))
        if qos == 2:
            sub.send(m.ack(m.PUBREC, got.packet_id))
            sub.expect(m.PUBREL)
            sub.send(m.ack(m.PUBCOMP, got.packet_id))
    pub.close()  # dropped: its will is published
    assert sub.receive().kind == m.PUBLISH
    sub.send(m.DISCONNECT_PACKET)
    assert sub.closed_within(5)
    five = V5(port)
    five.connect("five")
    assert five.subscribe(mqtt5.TopicFilter("f/#", max_qos=mqtt5.QoS.AT_LEAST_ONCE)) == [1]
    five.send(mqtt5.PublishPacket("f/1", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1))
    kinds = {type(five.read()), type(five.read())}  # in either order
    assert kinds == {mqtt5.PubAckPacket, mqtt5.PublishPacket}, kinds
    five.send(mqtt5.DisconnectPacket())
    refused = RawClient(port)
    refused.send(m.packet(m.CONNECT, 0, m.string("MQTT") + bytes([9, 2]) + struct.pack("!H", 0)))
    assert refused.closed_within(5)
    silent.close()


def test_closed_connections_leave_no_reference_cycles(run: Runner) -> None:
    async def main() -> None:
        settings = parse(["--port", "0", "--log-level", "WARNING", "--sys-interval", "0"], {})
        async with running(settings) as broker:
            port = broker.listeners["default"].sock.getsockname()[1]
            gc.collect()
            gc.disable()
            try:
                await asyncio.get_running_loop().run_in_executor(None, clients, port)
                loop, hub = asyncio.get_running_loop(), broker.hub
                deadline = loop.time() + 5
                while hub.connections:  # the hub has no event for "all closed"
                    assert loop.time() < deadline, f"{len(hub.connections)} still open"
                    await asyncio.sleep(0.01)
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                left = Counter(type(o).__qualname__ for o in gc.garbage
                               if type(o).__module__.startswith(OURS))  # fmt: skip
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert not left, left

    run(main())


def device(port: int, index: int) -> socket.socket:
    """A raw client: CONNECT and SUBSCRIBE sent together; back once the SUBACK is in."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(m.connect(f"churn-{index}", keepalive=0) + m.subscribe(1, (f"dev/{index}", 0)))
    got = b""
    while len(got) < 4 + 5:  # CONNACK (4 bytes), SUBACK (5)
        chunk = sock.recv(64)
        assert chunk, "closed before its SUBACK"
        got += chunk
    assert got[0] >> 4 == m.CONNACK, got
    assert got[4] >> 4 == m.SUBACK, got
    return sock


def test_clients_connecting_and_closing_do_not_grow_the_broker(spawn: Spawner, port: int) -> None:
    """Eight rounds of 2,000 clients that connect, subscribe and close: the broker's memory
    ends where the second round left it. While closed connections were reference cycles, it
    grew by 3 MB a round with full collections this rare."""
    metrics = free_port()
    broker = spawn.broker(port, "--metrics-port", str(metrics))
    broker.wait_for(r"Metrics for Prometheus at")
    rss = []
    for _ in range(8):
        sockets = [device(port, i) for i in range(2000)]
        for sock in sockets:
            sock.close()
        wait_until(lambda: scrape(metrics)["mqtt_broker_clients_connected"] == 0, 20,
                   "the broker to see every client leave")  # fmt: skip
        rss.append(rss_kib(broker.popen.pid))
    assert rss[-1] - rss[1] < 4096, f"RSS per round, KiB: {rss}"
