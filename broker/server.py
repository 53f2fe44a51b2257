"""Build and run the amqtt broker on a socket we bind ourselves."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from functools import partial
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import ListenerType

from broker.settings import BrokerSettings

logger = logging.getLogger(__name__)


class BindError(Exception):
    """The broker could not listen on the requested address."""


def bind(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket, turning each OS error into a one-line reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    # Create the socket with IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted
    # sockets whose proto is IPPROTO_TCP, and socket.create_server() leaves it 0. Without
    # NODELAY, a pong that follows another packet to the same client waits on Nagle.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # SO_REUSEADDR: a restart never waits out TIME_WAIT (it does not allow two listeners).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"port {port} on {host} is already in use") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError(f"address {host} is not an address of this machine") from exc
        if exc.errno == errno.EACCES:
            raise BindError(f"permission denied to listen on {where}") from exc
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return sock


def amqtt_config(settings: BrokerSettings, port: int) -> dict[str, Any]:
    """Return the amqtt configuration: one TCP listener, our two plugins, nothing on disk."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{host}:{port}",
                "max_connections": settings.max_connections,
            },
        },
        # amqtt's loader needs an auth plugin whenever `plugins` is given, or it refuses everyone.
        "plugins": {
            "broker.plugins.AllowAnonymous": {},
            "broker.plugins.ConnectionLog": {},
        },
    }


class PingPongBroker(Broker):
    """amqtt's Broker, serving on a socket bound before it starts."""

    def __init__(self, config: dict[str, Any], sock: socket.socket) -> None:
        """Create the broker; must run inside the event loop (amqtt takes the running loop)."""
        super().__init__(config)
        self._sock = sock

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,  # noqa: ARG002 - amqtt's signature; the socket is already bound
        port: int,  # noqa: ARG002
        ssl_context: Any,  # noqa: ANN401 - ssl.SSLContext | None
    ) -> asyncio.Server:
        # Replaces amqtt's Broker._create_server_instance, which binds by host and port itself.
        # We bind first so that a taken port is a clear error before amqtt is involved.
        if listener_type != ListenerType.TCP:
            raise BindError(f"unsupported listener type {listener_type}")
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            sock=self._sock,
            ssl=ssl_context,
        )
