"""The broker's own listening socket: clear bind errors and TCP_NODELAY on every connection."""

from __future__ import annotations

import asyncio
import socket

import pytest

from broker.server import BindError, bind


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
