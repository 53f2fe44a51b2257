"""MQTT over WebSockets (RFC 6455; MQTT 5.0 section 6), and the live page on the same port.

:class:`WebSocket` is the asyncio protocol of a WebSocket listener. It runs the upgrade and the
framing through ``websockets``' sans-I/O ``ServerProtocol`` and, once upgraded, hands the
payload of every binary frame to an ordinary :class:`~broker.connection.Connection`, which sees
a :class:`Tunnel` as its transport: the MQTT side is the TCP path's, unchanged (limits,
keepalive, auth, flow control, batching). An MQTT packet may span frames and a frame may hold
several packets: the connection's framer cuts the byte stream, as it does for TCP.

A plain GET (no upgrade) is answered from the page directory (:mod:`broker.page`), as
mosquitto's ``http_dir``. Bad input gets a clear answer: a request that is not HTTP, a wrong
path or subprotocol, an upgrade that takes too long: HTTP 400, 404 or 426 and a log line; a
text frame, or one larger than ``--max-packet-size``: a WebSocket close (1003, 1009).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from websockets.frames import OP_BINARY, OP_CONT, OP_TEXT, CloseCode, Frame
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from broker.connection import Connection
from broker.hub import Hub
from broker.page import Page

logger = logging.getLogger("broker")

SUBPROTOCOLS = [Subprotocol("mqtt"), Subprotocol("mqttv3.1")]
"""MQTT 5.0 section 6.0 and 3.1.1 section 6: "mqtt"; some older clients ask for "mqttv3.1"."""
PATHS = frozenset({"/mqtt", "/"})
"""Where the upgrade is accepted: /mqtt (MQTT.js's default, and mosquitto's), and /."""
OTHER_METHODS = frozenset(
    {b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"}
)
"""HTTP's methods (RFC 9110) but GET, the one this port serves: each gets a 405."""

_quiet = logging.getLogger("broker.websockets")
"""``websockets``' own lines (connection open, rejected) say less than ours: warnings only."""
_quiet.setLevel(logging.WARNING)


class Tunnel(asyncio.Transport):
    """The transport a :class:`Connection` over WebSockets writes to: binary frames out."""

    def __init__(self, socket: WebSocket) -> None:
        """Carry a connection's bytes over ``socket``'s WebSocket."""
        super().__init__()
        self._socket = socket

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` in one binary frame (nothing, as a transport does, for no bytes)."""
        if data:
            self._socket.send(bytes(data))

    def close(self) -> None:
        """Close the WebSocket (1000), then the socket once what is queued is written."""
        self._socket.close(CloseCode.NORMAL_CLOSURE, "")

    def abort(self) -> None:
        """Close the socket now."""
        self._socket.abort()

    def is_closing(self) -> bool:
        """Whether the WebSocket is closing or closed."""
        return self._socket.closing

    def get_write_buffer_size(self) -> int:
        """Bytes not yet written to the socket."""
        transport = self._socket.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def pause_reading(self) -> None:
        """Stop reading from the socket."""
        if self._socket.transport is not None:
            self._socket.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        if self._socket.transport is not None:
            self._socket.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401 - asyncio's
        """Return the socket's extra info (``peername`` and the rest)."""
        transport = self._socket.transport
        return transport.get_extra_info(name, default) if transport is not None else default


class WebSocket(asyncio.Protocol):
    """One connection to the WebSocket listener: an HTTP request, then MQTT in binary frames."""

    def __init__(self, hub: Hub, page: Page | None, tcp_port: int) -> None:
        """Serve MQTT over WebSockets for ``hub``, and ``page`` to plain GETs."""
        self.hub = hub
        self.page = page
        self.tcp_port = tcp_port
        self.ws = ServerProtocol(subprotocols=SUBPROTOCOLS, max_size=hub.limits.max_packet_size,
                                 logger=_quiet)  # fmt: skip
        self.transport: asyncio.Transport | None = None
        self.inner: Connection | None = None
        self.peer = "?"
        self.closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._answered = False
        """Whether the HTTP request got its response (an upgrade, a page, a refusal)."""
        self._heard = False
        """Whether any byte came: only the first ones are a method (a request may come a line
        at a time, and its last line is an empty one)."""

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wait for the upgrade, for at most --handshake-timeout seconds."""
        self.transport = cast("asyncio.Transport", transport)  # a stream server's
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.hub.limits.connect_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        """Feed the WebSocket; hand the MQTT bytes of this read's binary frames on at once."""
        ws = self.ws
        if not self._heard:  # the request's first bytes: its method
            self._heard = True
            if not data[:1].isalpha():
                # An HTTP request starts with its method; an MQTT CONNECT with 0x10. Said now,
                # not when the handshake times out waiting for a line that never ends.
                self._answered = True
                self._not_http("it starts with a byte no HTTP request starts with")
                return
            method = data.split(b" ", 1)[0]
            if method in OTHER_METHODS:
                # websockets reads GET alone, and called a POST "not a valid HTTP request".
                self._answered = True
                self._wrong_method(method.decode())
                return
        ws.receive_data(data)
        mqtt: list[bytes] = []
        for event in ws.events_received():
            if isinstance(event, Request):
                self._upgrade(event)
            elif isinstance(event, Frame):
                if event.opcode in (OP_BINARY, OP_CONT):
                    mqtt.append(bytes(event.data))
                elif event.opcode == OP_TEXT:
                    self._deliver(mqtt)
                    mqtt = []
                    logger.warning("Closed %s: a text frame; MQTT over WebSockets is binary "
                                   "[MQTT-6.0.0-1].", self._name)  # fmt: skip
                    self._closed_by_us()
                    self.close(CloseCode.UNSUPPORTED_DATA, "MQTT takes binary frames")
        self._deliver(mqtt)
        if ws.state is State.CONNECTING and ws.handshake_exc is not None and not self._answered:
            self._not_http(str(ws.handshake_exc))
        elif (
            ws.parser_exc is not None
            and not self.closing
            and not isinstance(ws.parser_exc, EOFError)
        ):
            # websockets failed the connection itself (a frame too large: 1009; a protocol
            # error: 1002), and queued its close frame.
            logger.warning("Closed %s: %s.", self._name, ws.parser_exc)
            self._closed_by_us()
            self.closing = True
        self._write()

    def eof_received(self) -> bool | None:
        """Take the end of what the peer sends: the WebSocket ends too."""
        self.ws.receive_eof()
        self._write()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """End the MQTT connection inside (its will is due unless it said goodbye)."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inner = self.inner
        if inner is not None:
            inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        """Stop the MQTT connection reading its client: the socket's buffer is full."""
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Let the MQTT connection read again: the socket's buffer drained."""
        if self.inner is not None:
            self.inner.resume_writing()

    # --- the HTTP request -------------------------------------------------------------------

    @property
    def _name(self) -> str:
        inner = self.inner
        return inner.client.name if inner is not None else self.peer

    def _closed_by_us(self) -> None:
        """Have the MQTT connection's last line say the broker closed it (the line before: why)."""
        if self.inner is not None and not self.inner.client.ended:
            self.inner.client.how = "closed by the broker"

    def _upgrade(self, request: Request) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ws = self.ws
        path = request.path.split("?", 1)[0]
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if not upgrade:
            response = (
                self.page.respond(path) if self.page is not None
                else ws.reject(404, "This is an MQTT over WebSockets port (path /mqtt).\n")
            )  # fmt: skip
            if response.status_code >= 400:
                logger.info("HTTP %d for GET %s from %s.", response.status_code, path, self.peer)
            ws.send_response(response)
            return
        if path not in PATHS:
            logger.warning("Refused a WebSocket upgrade from %s: path %s, not /mqtt.",
                           self.peer, path)  # fmt: skip
            ws.send_response(ws.reject(404, f"No MQTT at {path}: use /mqtt.\n"))
            return
        response = ws.accept(request)
        if response.status_code != 101:
            logger.warning("Refused a WebSocket upgrade from %s: %s.", self.peer,
                           ws.handshake_exc)  # fmt: skip
            ws.send_response(response)
            return
        ws.send_response(response)
        self._write()
        inner = self.inner = Connection(self.hub)
        inner.connection_made(Tunnel(self))

    def _wrong_method(self, method: str) -> None:
        """Answer an HTTP request of another method than GET: 405, and what is served."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        logger.info("HTTP 405 for %s from %s: this port serves GET only.", method, self.peer)
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Type: text/plain\r\n"
                b"Connection: close\r\n\r\nOnly GET here: the live page, and MQTT over "
                b"WebSockets at /mqtt.\n"
            )
        self.close_after_write()

    def _not_http(self, why: str) -> None:
        """Answer what is not an HTTP request (an MQTT client on the wrong port, say)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        logger.warning(
            "Closed %s: not an HTTP request on the WebSocket port (%s); MQTT over TCP is on "
            "port %d.", self.peer, why, self.tcp_port,
        )  # fmt: skip
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"\r\nThis is an MQTT over WebSockets port (ws://host:port/mqtt).\n"
            )
        self.close_after_write()

    def _too_slow(self) -> None:
        self._timer = None
        logger.info("Closed %s: no WebSocket upgrade within %g s.", self.peer,
                    self.hub.limits.connect_timeout)  # fmt: skip
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            )
        self.close_after_write()

    # --- writing ----------------------------------------------------------------------------

    def _deliver(self, chunks: list[bytes]) -> None:
        inner = self.inner
        if chunks and inner is not None and not self.closing:
            inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def send(self, data: bytes) -> None:
        """Send MQTT bytes in one binary frame."""
        if self.ws.state is State.OPEN and not self.closing:
            self.ws.send_binary(data)
            self._write()

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code``; the socket closes once it is written."""
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
        self.closing = True
        self._write()
        self.close_after_write()

    def abort(self) -> None:
        """Close the socket now."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close_after_write(self) -> None:
        """Close the socket once what is queued is written."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _write(self) -> None:
        transport = self.transport
        if transport is None:
            return
        out = self.ws.data_to_send()
        if not out:
            return
        eof = out[-1] == b""
        data = b"".join(out)
        if data and not transport.is_closing():
            transport.write(data)
        if eof or self.ws.close_expected():
            transport.close()
