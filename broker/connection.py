"""The connection layer: an asyncio.Protocol per client (the hub routes between them).

Each read's whole packets are handled inside ``data_received``, synchronously: a PUBLISH is
routed to every subscriber there and then. What they cause is gathered per destination
connection and written once, when the callback ends (:meth:`Hub.flush`), so a read of a hundred
packets costs each subscriber one write, and order holds because nothing else can run in between;
a fan-out to many writes as it goes, in batches of 4, 8, 16, then 32 connections (:meth:`Hub.mark`).
Work that must await (authentication, amqtt's subscription and retained-message bookkeeping)
runs as the connection's one task; its later packets wait in the receive buffer, in order, and
reading pauses if they pile up.

Bounds, after mosquitto's defaults: at most ``max_inflight`` unacknowledged QoS 1/2 messages per
client, and ``max_queued`` waiting behind them (or while a persistent session is offline); past
that, QoS 1/2 messages for that client are dropped and counted. QoS 0 to a client that stops
reading is dropped beyond ``QOS0_BUFFER_LIMIT`` unsent bytes. A client whose own replies we
cannot send (it does not read) is not read from until it does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, cast

from broker import reasons as rc
from broker.client import Client
from broker.framing import Framer
from broker.hub import Hub
from broker.protocol import ProtocolViolation
from broker.server import common_name
from broker.wire import Gone

logger = logging.getLogger("broker")

KEEPALIVE_GRACE = 1.5
"""[MQTT-3.1.2-24]: close a client silent for more than 1.5 times its keepalive."""
QOS0_BUFFER_LIMIT = 4 * 1024 * 1024
"""Above this many unsent bytes for a client, QoS 0 messages to it are dropped (at most once)."""

NOT_PAUSED: frozenset[str] = frozenset()
"""One empty set for every connection that is reading (most of them, most of the time)."""
HTTP_METHODS = frozenset({b"GET ", b"HEAD", b"POST", b"PUT ", b"OPTI", b"DELE", b"PATC"})
"""How an HTTP request starts: no MQTT CONNECT does (its first byte is 0x10)."""
HTTP_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"This is an MQTT port (MQTT 5.0 and 3.1.1 over TCP), not HTTP. %s\n"
)


class Connection(asyncio.Protocol):
    """One client's connection: transport, framer, timers, read pausing and gathered writes.

    What the packets mean is the :class:`~broker.client.Client`'s; this class hands it whole
    frames, runs its awaited work one task at a time, and turns a protocol violation (or a bug
    of ours) into one close.
    """

    def __init__(self, hub: Hub) -> None:
        """Serve one connection for ``hub``."""
        self.hub = hub
        self.limits = hub.limits
        self.framer = Framer(hub.limits.max_packet_size)
        self.client = Client(hub, self)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_address: tuple[str, int] = ("?", 0)
        self.identity: str | None = None
        """The common name of the client's TLS certificate, when it is the user name."""
        self._out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._paused: frozenset[str] = NOT_PAUSED
        """Why reading is paused ("writing", "busy"); empty while reading."""
        self._timer: asyncio.TimerHandle | None = None
        """The keepalive timer."""
        self._handshaking = False
        """Whether the connection waits for its first packet (in ``hub.handshakes``)."""
        self._limit = 0.0
        self._heard_at = 0.0
        self._loop = hub.loop  # protocols are made by the running server
        self._closed = False
        self._counted = False
        self._dropped_qos0 = 0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accept the connection, or refuse it at once when the most allowed are in use.

        That is --max-connections, or what the open-file limit leaves (:meth:`Hub.cap_connections`).
        """
        self.transport = cast("asyncio.Transport", transport)  # a stream server's (or uvloop's)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_address = (str(peer[0]), int(peer[1]))
        self.peer = f"{peer[0]}:{peer[1]}"
        if self.limits.identity_as_username:
            self.identity = common_name(transport.get_extra_info("peercert"))
        hub = self.hub
        if hub.max_connections and len(hub.connections) >= hub.max_connections:
            # amqtt's own limit (a semaphore) made the extra client wait without a word.
            hub.refused += 1
            if hub.refused in (1, 10, 100) or hub.refused % 1000 == 0:
                logger.warning(
                    "Refused a connection: %d in use, %s (%d refused so far).",
                    len(hub.connections), hub.limited_by, hub.refused,
                )  # fmt: skip
            self._closed = self.client.ended = True
            transport.close()
            return
        hub.connections.add(self.client)
        self._counted = True
        self._handshaking = True
        hub.handshakes.wait(self, self._loop)

    def data_received(self, data: bytes) -> None:
        """Handle every whole packet this read completed; write what they caused once."""
        if self.client.session is None and self._task is None and data[:4] in HTTP_METHODS:
            self._not_http(data)
            return
        self.framer.feed(data)
        self._work_batched()

    def _not_http(self, data: bytes) -> None:
        """Answer an HTTP request (a browser, a WebSocket upgrade) with what this port is."""
        line = data.split(b"\r\n", 1)[0][:80].decode("ascii", "replace")
        url = self.hub.websocket_url
        where = (f"MQTT over WebSockets is at {url}" if url
                 else "MQTT over WebSockets is not enabled on this broker")  # fmt: skip
        logger.warning("Closed %s: an HTTP request (%s) on the MQTT TCP port; %s.",
                       self.peer, line, where)  # fmt: skip
        self.client.ended = True
        self.send(HTTP_REFUSAL % f"{where}.".encode())
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's
        """Release everything the connection held; publish the will unless it said goodbye."""
        self._stop()
        client = self.client
        client.end(will=not client.goodbye)
        if self._counted:
            self.hub.closed(client)
        self.transport = None
        client.release(Gone(self.peer, self.peer_address, self.identity))

    def pause_writing(self) -> None:
        """Stop reading from a client that does not read what we send, until it does."""
        self._pause("writing")

    def resume_writing(self) -> None:
        """Read again from a client that reads again."""
        self._resume("writing")

    # --- reading ----------------------------------------------------------------------------

    def _work_batched(self) -> None:
        """Handle what is buffered, gathering every connection's writes for one flush."""
        hub = self.hub
        hub.batching = True
        try:
            self._work()
        finally:
            hub.flush()

    def _work(self) -> None:
        """Handle buffered packets until the buffer runs dry or a packet starts awaited work."""
        handled = False
        client = self.client
        while self._task is None and not client.ended:
            try:
                frame = self.framer.next_frame()
                if frame is None:
                    break
                if self._handshaking:  # a first packet came in time
                    self._handshaking = False
                    self.hub.handshakes.done(self)
                handled = True
                client.handle(frame)
            except ProtocolViolation as exc:
                self._violated(exc)
                return
            except Exception as exc:  # noqa: BLE001 - one packet's bug ends one connection
                self._internal_error(exc)
                return
        if handled and self._limit:
            self._heard_at = self._loop.time()
        if self._task is not None and self.framer.buffered > self.limits.max_packet_size:
            self._pause("busy")

    def start(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` before any later packet of this connection is handled."""
        self._task = self.hub.spawn(self._run(coro), f"{what} {self.peer}")
        # A connection that ends before the task first runs cancels it with ``coro`` never
        # started: close it, or Python warns on stderr that it was never awaited.
        self._task.add_done_callback(lambda _: coro.close())

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except ProtocolViolation as exc:  # the client's fault, as in _work: not a bug of ours
            self._task = None
            self._violated(exc)
            return
        except Exception as exc:  # noqa: BLE001 - as in _work
            self._task = None
            self._internal_error(exc)
            return
        self._task = None
        if self.client.ended:
            return
        self._resume("busy")
        self._work_batched()

    def _violated(self, exc: ProtocolViolation) -> None:
        """Close the connection for the client's protocol error, publishing its will.

        An MQTT 5 client is told the reason code in a DISCONNECT first; the will is due as for
        any connection closed by the server [MQTT-3.1.2-8].
        """
        client = self.client
        if client.session is None:
            logger.warning("Closed %s: %s.", self.peer, exc)
        else:
            logger.warning("Client %s closed: %s.", client.name, exc)
        client.close(will=True, reason=exc.code, why=str(exc))

    def _internal_error(self, exc: Exception) -> None:
        # A bug in handling one packet ends this connection, visibly, rather than leave one
        # that looks alive but is never read again.
        logger.error(
            "Client %s closed: internal error %r.", self.client.name, exc,
            exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
        )  # fmt: skip
        self.client.close(will=True, reason=rc.IMPLEMENTATION_SPECIFIC_ERROR, why="internal error")

    # --- timers -----------------------------------------------------------------------------

    def no_connect(self) -> None:
        """Close the connection: no packet came within --handshake-timeout (broker.handshakes)."""
        self._handshaking = False
        if self._closed:
            return
        logger.info("Closed %s: no CONNECT within %g s.", self.peer, self.limits.connect_timeout)
        self.client.close(will=False)

    def watch(self, keep_alive: int) -> None:
        """Close the connection when the client is silent for 1.5 times its keepalive."""
        self._limit = keep_alive * KEEPALIVE_GRACE
        self._heard_at = self._loop.time()
        self._timer = self._loop.call_later(self._limit, self._check_keepalive)

    def _check_keepalive(self) -> None:
        now = self._loop.time()
        due = self._heard_at + self._limit
        if now < due or self._task is not None or "writing" in self._paused:
            # Heard from since; or busy, or not read by us: not the client's silence.
            self._timer = self._loop.call_at(max(due, now + 0.1), self._check_keepalive)
            return
        self._timer = None
        why = f"silent for more than {self._limit:g} s [MQTT-3.1.2-24]"
        logger.warning("Client %s closed: %s.", self.client.name, why)
        self.client.close(will=True, reason=rc.KEEP_ALIVE_TIMEOUT, why=why)

    # --- writing and closing ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write ``data``: at the end of the current callback if gathering, else now."""
        if self.hub.batching:
            out = self._out
            out.append(data)
            if len(out) == 1:  # after the append: mark() may write it at once
                self.hub.mark(self)
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def send_qos0(self, frame: bytes) -> None:
        """Send an encoded QoS 0 PUBLISH, unless the client lags too far (then drop it)."""
        transport = self.transport
        if transport is None:
            return
        hub = self.hub
        if transport.get_write_buffer_size() > QOS0_BUFFER_LIMIT:
            # An unbounded buffer for a client that reads nothing would not be allowed; at
            # most once allows dropping. Said once per thousand, not per message.
            self._dropped_qos0 += 1
            hub.counters.dropped += 1
            if self._dropped_qos0 % 1000 == 1:
                logger.warning(
                    "Client %s is not reading: dropped %d QoS 0 messages so far.",
                    self.client.name, self._dropped_qos0,
                )  # fmt: skip
            return
        hub.counters.sent += 1
        self.send(frame)

    def flush(self) -> None:
        """Write what was gathered for this connection, in one write."""
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        """Write what is gathered, then close the socket (the client has ended)."""
        self._stop()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close the socket now, dropping anything unsent."""
        if self.transport is not None:
            self.transport.abort()

    def _stop(self) -> None:
        """Stop the timers and the awaited work: nothing more is read."""
        if self._closed:
            return
        self._closed = True
        if self._handshaking:
            self._handshaking = False
            self.hub.handshakes.done(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused |= {reason}

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused -= {reason}
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
