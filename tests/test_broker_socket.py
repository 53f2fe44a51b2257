"""The broker's own listening socket: clear bind errors and TCP_NODELAY on every connection."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest

from broker.server import BindError, bind
from tests.support import Spawner


def test_accepted_connections_get_tcp_nodelay(port: int) -> None:
    """A socket from bind() must make asyncio set TCP_NODELAY, or pongs wait on Nagle."""

    async def scenario() -> int:
        accepted: asyncio.Queue[int] = asyncio.Queue()

        async def on_connect(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            await accepted.put(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(on_connect, sock=bind("127.0.0.1", port))
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(accepted.get(), 5)
            await reader.read()  # the server hangs up
            writer.close()
            await writer.wait_closed()
            return value

    assert asyncio.run(scenario()) != 0


def test_bind_refuses_a_taken_port(port: int) -> None:
    first = bind("127.0.0.1", port)
    try:
        with pytest.raises(BindError, match=rf"port {port} on 127\.0\.0\.1 is already in use"):
            bind("127.0.0.1", port)
    finally:
        first.close()


def test_bind_reports_unresolvable_host() -> None:
    with pytest.raises(BindError, match=r"cannot resolve 'no-such-host\.invalid'"):
        bind("no-such-host.invalid", 0)


def test_a_herd_of_connects_to_a_busy_broker_is_queued_not_dropped(
    spawn: Spawner, port: int
) -> None:
    """A thousand devices retrying every 100 ms reach a restarted broker at once.

    The kernel completes their handshakes into the listen backlog while the broker is busy;
    a full backlog drops a SYN, and the client sends it again only a second later. asyncio's
    create_server listens again with its own default, 100, whatever the socket had: one device
    of a 1,000-device fleet then came back 1.3 s after the first instead of 0.6 s. Here the
    broker is stopped (SIGSTOP) while 300 clients connect: every handshake must complete at
    once, and every client be answered once it runs again.
    """
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    herd = min(300, somaxconn - 10)
    if herd <= 110:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: no room for more than the default")
    broker = spawn.broker(port)
    socks: list[socket.socket] = []
    os.kill(broker.popen.pid, signal.SIGSTOP)
    try:
        for _ in range(herd):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            socks.append(sock)
        # A completed handshake makes the socket writable; a dropped SYN waits 1 s for its
        # retransmission, so a deadline under that tells the two apart.
        pending = set(socks)
        deadline = time.monotonic() + 0.9
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.05)
            pending -= {s for s in writable if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)}
        assert not pending, f"{len(pending)} of {herd} connects not completed: SYNs dropped"
    finally:
        os.kill(broker.popen.pid, signal.SIGCONT)
    connect = bytes([0x10, 12]) + b"\x00\x04MQTT\x04\x02\x00\x00\x00\x00"  # 3.1.1, empty id
    for sock in socks:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(connect)
    for sock in socks:
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        sock.close()
