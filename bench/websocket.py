"""MQTT over WebSockets: ours beside mosquitto's WebSocket listener, in one run.

    python -m bench.websocket          # a few rounds, about half a minute
    python -m bench.websocket --full   # more rounds and round trips

Both brokers get a TCP listener and a WebSocket one (mosquitto: ``listener N`` with
``protocol websockets``). The clients are lean on purpose, so that the broker's share shows:
one pinger and one echo (its own process), MQTT 3.1.1 QoS 0, one ping in flight, back to back,
each MQTT packet in one binary frame, no compression. Per broker and round: RTT p50/p99 over
WebSockets, the same over TCP (the same client code, on a socket), broker CPU per round trip
over WebSockets, and memory per idle WebSocket connection (CONNECTed, 500 of them). Ratios are
medians of per-round ratios, rounds alternating between the brokers. Prints a table and writes
bench/websocket.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.harness import (
    PYTHON,
    REPO,
    Broker,
    connack_within,
    connect_packet,
    cpu_seconds,
    free_port,
    mosquitto_path,
    percentile,
    rss_mb,
    workspace,
)
from broker.protocol import remaining_length

OUT = REPO / "bench" / "websocket.json"
IDLE_CONNECTIONS = 500


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def subscribe_packet(topic: str) -> bytes:
    """SUBSCRIBE packet id 1, QoS 0."""
    return _packet(8, 2, b"\x00\x01" + _string(topic) + b"\x00")


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH."""
    return _packet(3, 0, _string(topic) + payload)


def payload_of(packet: bytes) -> bytes:
    """The payload of one whole QoS 0 PUBLISH (a one- or two-byte remaining length)."""
    offset = 2 if packet[1] < 0x80 else 3
    size = packet[offset] << 8 | packet[offset + 1]
    return packet[offset + 2 + size :]


class Link:
    """One lean MQTT 3.1.1 client over a WebSocket or a TCP socket: one packet per message."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], recv: Callable[[], Awaitable[bytes]]
    ) -> None:
        """Wrap a connection's send and receive."""
        self.send, self.recv = send, recv

    @classmethod
    async def websocket(cls, port: int, client_id: str) -> tuple[Link, ClientConnection]:
        """Connect over ws://127.0.0.1:port/mqtt and complete CONNECT/CONNACK."""
        ws = await connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"],  # type: ignore[list-item]
                           compression=None, ping_interval=None, max_size=None)  # fmt: skip

        async def recv() -> bytes:
            return bytes(await ws.recv(decode=False))

        link = cls(ws.send, recv)
        await link.send(connect_packet(client_id, 4, keepalive=0))
        await link.recv()  # CONNACK
        return link, ws

    @classmethod
    async def tcp(cls, port: int, client_id: str) -> tuple[Link, asyncio.StreamWriter]:
        """Connect over TCP (TCP_NODELAY) and complete CONNECT/CONNACK."""
        import socket  # noqa: PLC0415

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def send(data: bytes) -> None:
            writer.write(data)

        async def recv() -> bytes:
            head = await reader.readexactly(2)
            length, shift, byte = head[1] & 0x7F, 7, head[1]
            extra = b""
            while byte & 0x80:
                byte = (await reader.readexactly(1))[0]
                extra += bytes([byte])
                length |= (byte & 0x7F) << shift
                shift += 7
            return head + extra + await reader.readexactly(length)

        link = cls(send, recv)
        await link.send(connect_packet(client_id, 4, keepalive=0))
        await link.recv()
        return link, writer


ECHO = """
import asyncio, sys
from bench.websocket import Link, publish_packet, payload_of, subscribe_packet
async def main(port, transport):
    link, _ = await (Link.websocket if transport == "ws" else Link.tcp)(port, "echo-" + transport)
    await link.send(subscribe_packet("/ping"))
    await link.recv()
    print("ready", flush=True)
    while True:
        await link.send(publish_packet("/pong", payload_of(await link.recv())))
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def start_echo(port: int, transport: str) -> subprocess.Popen[str]:
    """The lean echo in its own process; returns once it is subscribed."""
    proc = subprocess.Popen([PYTHON, "-c", ECHO, str(port), transport], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the echo did not start")
    return proc


async def round_trips(port: int, transport: str, count: int) -> list[float]:
    """``count`` pings, one in flight, back to back; their RTTs in seconds."""
    opened = Link.websocket if transport == "ws" else Link.tcp
    link, _ = await opened(port, "pinger-" + transport)
    await link.send(subscribe_packet("/pong"))
    await link.recv()
    rtts = []
    for seq in range(count):
        payload = str(seq).encode()
        began = time.perf_counter()
        await link.send(publish_packet("/ping", payload))
        while payload_of(await link.recv()) != payload:
            pass
        rtts.append(time.perf_counter() - began)
    return rtts


async def idle_connections(port: int, count: int) -> list[ClientConnection]:
    """Open ``count`` WebSocket connections, each CONNECTed, 50 at a time."""
    out: list[ClientConnection] = []
    while len(out) < count:
        batch = range(len(out), min(count, len(out) + 50))
        opened = await asyncio.gather(*(Link.websocket(port, f"idle-{i}") for i in batch))
        out.extend(ws for _, ws in opened)
    return out


async def connect_times(port: int, count: int) -> list[float]:
    """Seconds from opening a socket to CONNACK over WebSockets, one connection at a time."""
    out = []
    for index in range(count):
        began = time.perf_counter()
        _, ws = await Link.websocket(port, f"connect-{index}")
        out.append(time.perf_counter() - began)
        ws.transport.abort()
    return out


def start(kind: str, tcp_port: int, ws_port: int, workdir: Path) -> Broker:
    """Start a broker with a TCP and a WebSocket listener; wait for both."""
    if kind == "ours":
        command = [PYTHON, "-m", "broker", "--port", str(tcp_port), "--ws-port", str(ws_port),
                   "--http-dir", "none", "--sys-interval", "0"]  # fmt: skip
    else:
        conf = workdir / f"mosquitto-ws-{tcp_port}.conf"
        conf.write_text(
            f"listener {tcp_port} 127.0.0.1\nlistener {ws_port} 127.0.0.1\n"
            "protocol websockets\nallow_anonymous true\nset_tcp_nodelay true\n"
        )
        command = [mosquitto_path(), "-c", str(conf)]
    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    while not connack_within(tcp_port, 1):
        if proc.poll() is not None or time.perf_counter() - began > 20:
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.01)
    return Broker(kind, tcp_port, proc, time.perf_counter() - began)


def measure(kind: str, count: int, workdir: Path) -> dict[str, float]:
    """One round against a fresh broker of ``kind``."""
    tcp_port, ws_port = free_port(), free_port()
    broker = start(kind, tcp_port, ws_port, workdir)
    out: dict[str, float] = {}
    try:
        for transport, port in (("tcp", tcp_port), ("ws", ws_port)):
            echo = start_echo(port, transport)
            try:
                asyncio.run(round_trips(port, transport, 200))  # warm-up
                cpu = cpu_seconds(broker.proc.pid)
                rtts = asyncio.run(round_trips(port, transport, count))
                out[f"{transport}_cpu_us"] = (cpu_seconds(broker.proc.pid) - cpu) / count * 1e6
                out[f"{transport}_p50_ms"] = percentile(rtts, 50) * 1000
                out[f"{transport}_p99_ms"] = percentile(rtts, 99) * 1000
            finally:
                echo.terminate()
                echo.wait(10)

        async def idle() -> float:
            before = rss_mb(broker.proc.pid)
            conns = await idle_connections(ws_port, IDLE_CONNECTIONS)
            after = rss_mb(broker.proc.pid)
            for ws in conns:
                ws.transport.abort()  # not a close handshake each: not what is measured
            return (after - before) * 1024 / IDLE_CONNECTIONS

        out["idle_kib"] = asyncio.run(idle())
        out["connect_ms"] = percentile(asyncio.run(connect_times(ws_port, 20)), 50) * 1000
    finally:
        broker.stop()
    return out


ROWS = [
    ("WebSocket, QoS 0 RTT p50", "ws_p50_ms", "ms"),
    ("WebSocket, QoS 0 RTT p99", "ws_p99_ms", "ms"),
    ("WebSocket, broker CPU per round trip", "ws_cpu_us", "us"),
    ("WebSocket / TCP RTT p50, same broker", "ws_over_tcp", "x"),
    ("TCP (same lean client), QoS 0 RTT p50", "tcp_p50_ms", "ms"),
    ("memory per idle WebSocket connection (500)", "idle_kib", "KiB"),
    ("WebSocket upgrade to CONNACK, one at a time, p50", "connect_ms", "ms"),
]


def main() -> None:
    """Measure, print the table, write bench/websocket.json."""
    parser = argparse.ArgumentParser(prog="bench.websocket", description=__doc__)
    parser.add_argument("--full", action="store_true", help="more rounds and round trips")
    args = parser.parse_args()
    mosquitto_path()
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    rounds, count = (8, 20000) if args.full else (3, 5000)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "mosquitto": []}
    with workspace() as tmp:
        for _ in range(rounds):
            for kind, runs in results.items():
                run = measure(kind, count, tmp)
                run["ws_over_tcp"] = run["ws_p50_ms"] / run["tcp_p50_ms"]
                runs.append(run)
    table: list[dict[str, Any]] = []
    lines = ["| metric | ours | mosquitto | ours / mosquitto |", "|---|---|---|---|"]
    for label, key, unit in ROWS:
        ours = [r[key] for r in results["ours"]]
        theirs = [r[key] for r in results["mosquitto"]]
        ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True) if t)
        o, t = statistics.median(ours), statistics.median(theirs)
        table.append({"metric": label, "ours": o, "mosquitto": t, "unit": unit, "ratio": ratio})
        shown = "" if unit == "x" else f" {unit}"
        lines.append(f"| {label} | {o:.3f}{shown} | {t:.3f}{shown} | {ratio:.2f}x |")
    sys.stdout.write("\n".join(lines) + "\n")
    OUT.write_text(json.dumps({"rounds": rounds, "count": count, "rows": table,
                               "runs": results}, indent=1) + "\n")  # fmt: skip
    sys.stderr.write(f"{rounds} rounds of {count} round trips; written to {OUT}\n")


if __name__ == "__main__":
    main()
