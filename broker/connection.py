"""The connection layer: an asyncio.Protocol per client, and the hub that routes between them.

Each read's whole packets are handled inside ``data_received``, synchronously: a PUBLISH is
routed to every subscriber there and then. What they cause is gathered per destination
connection and written once, when the callback ends (:meth:`Hub.flush`), so a read of a hundred
packets costs each subscriber one write, and order holds because nothing else can run in between.
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
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, cast

from broker import protocol
from broker.engine import Engine, IncomingApplicationMessage, OutgoingApplicationMessage, Session
from broker.framing import Framer
from broker.protocol import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Connect,
    Frame,
    ProtocolViolation,
    Publish,
    Subscribe,
    Unsubscribe,
    UnsupportedProtocol,
    Will,
    encode_ack,
    encode_connack,
    encode_publish,
    encode_suback,
)
from broker.settings import Limits

logger = logging.getLogger("broker")

KEEPALIVE_GRACE = 1.5
"""[MQTT-3.1.2-24]: close a client silent for more than 1.5 times its keepalive."""
QOS0_BUFFER_LIMIT = 4 * 1024 * 1024
"""Above this many unsent bytes for a client, QoS 0 messages to it are dropped (at most once)."""

# CONNACK return codes (section 3.2.2.3).
UNACCEPTABLE_PROTOCOL_VERSION = 0x01
IDENTIFIER_REJECTED = 0x02
NOT_AUTHORIZED = 0x05


class Hub:
    """Every connection of the broker, who is online as which client, and routing between them."""

    def __init__(self, limits: Limits, max_connections: int = 0) -> None:
        """Create an empty hub; :attr:`engine` must be set before the first client connects."""
        self.limits = limits
        self.max_connections = max_connections
        self.engine: Engine | None = None
        self.connections: set[Connection] = set()
        self.online: dict[str, Connection] = {}
        """Client id -> its current connection, from CONNACK to the end of that connection."""
        self.batching = False
        self.stopping = False
        self.refused = 0
        self._dirty: list[Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropping: dict[str, int] = {}
        """Client id -> messages dropped for it since its queue was last empty."""
        self._all_closed: asyncio.Event | None = None

    def connection(self, *, tls: bool = False) -> Connection:
        """Make the protocol for a new connection (the server's protocol factory)."""
        return Connection(self, tls=tls)

    # --- writes: gathered during a callback, one write per connection at its end ---------------

    def flush(self) -> None:
        """Write what each connection gathered, and stop gathering."""
        self.batching = False
        if self._dirty:
            dirty, self._dirty = self._dirty, []
            for connection in dirty:
                connection.flush()

    def mark(self, connection: Connection) -> None:
        """Note that ``connection`` has writes to flush."""
        self._dirty.append(connection)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the hub keeps until it ends (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- routing --------------------------------------------------------------------------------

    @property
    def state(self) -> Engine:
        """The engine (amqtt's state)."""
        if self.engine is None:
            raise RuntimeError("the hub has no engine")
        return self.engine

    def publish(
        self, topic: str, payload: bytes, qos: int | None, frame: bytes | None = None
    ) -> None:
        """Deliver a message to every subscriber now, or keep it for them (synchronous).

        Each delivery's QoS is min(publish QoS, granted QoS) [MQTT-3.8.4-6, section 3.3.5]; a
        client whose filters overlap gets one copy at the highest granted QoS [MQTT-3.3.5-1].
        ``qos`` None (a plugin's broadcast) delivers at each granted QoS. ``frame``, when given,
        is the message already encoded as a QoS 0 PUBLISH with RETAIN 0.
        """
        online = self.online
        for session, granted in self.state.matches(topic):
            delivered = granted if qos is None or qos > granted else qos
            connection = online.get(session.client_id)
            if connection is None or connection.session is not session:
                if delivered and not session.clean_session:
                    # [MQTT-3.1.2-5]: QoS 1/2 messages wait for an offline persistent session.
                    self.queue(session, topic, payload, delivered, retain=False)
                continue
            if delivered == 0 and not connection.backlog:
                if frame is None:
                    frame = encode_publish(topic, payload)
                connection.send_qos0(frame)
            else:  # QoS 1/2, or QoS 0 behind waiting messages: topics stay ordered [MQTT-4.6.0-6]
                connection.deliver(topic, payload, delivered, retain=False)

    def publish_will(self, session: Session | None, will: Will) -> None:
        """Publish a will [MQTT-3.1.2-8], and retain it if it asks to be."""
        self.publish(will.topic, will.payload, will.qos)
        if will.retain:
            self.spawn(
                self.state.retain(session, will.topic, will.payload, will.qos), "retain will"
            )

    def queue(
        self, session: Session, topic: str, payload: bytes, qos: int, *, retain: bool
    ) -> None:
        """Keep a message for ``session``, unless its queue is full (then count and drop it)."""
        engine = self.state
        if engine.queued(session) < self.limits.max_queued:
            engine.enqueue(session, topic, payload, qos, retain=retain)
            return
        client_id = session.client_id
        dropped = self._dropping.get(client_id, 0)
        if not dropped:
            logger.warning(
                "Dropping messages for client %s: queue full (%d).",
                client_id, self.limits.max_queued,
            )  # fmt: skip
        self._dropping[client_id] = dropped + 1

    def drained(self, client_id: str) -> None:
        """Note that a client's queue is empty: end its episode of drops, if any."""
        dropped = self._dropping.pop(client_id, 0)
        if dropped:
            logger.warning(
                "Client %s: queue drained; %d messages were dropped while it was full.",
                client_id, dropped,
            )  # fmt: skip

    # --- sessions -------------------------------------------------------------------------------

    def attach(self, connection: Connection, connect: Connect, session: Session) -> bool:
        """Make ``connection`` the client's current one; return whether a session was resumed."""
        engine = self.state
        client_id = session.client_id
        previous = self.online.get(client_id)
        if previous is not None:
            # [MQTT-3.1.4-2]: the server disconnects the existing client first.
            logger.info("Client %s connected again: closing its previous connection.", client_id)
            previous.close(will=True)
        present = False
        if connect.clean_session:
            # [MQTT-3.1.2-6]: a clean session starts empty and ends with the connection.
            engine.forget(client_id)
            self._dropping.pop(client_id, None)
        else:
            stored = engine.stored(client_id)
            if stored is not None:
                # [MQTT-3.2.2-2]: resume the stored session with this connection's settings.
                for name in ("keep_alive", "username", "password", "remote_address",
                             "remote_port"):  # fmt: skip
                    setattr(stored, name, getattr(session, name))
                session, present = stored, True
        engine.keep(session)
        self.online[client_id] = connection
        connection.session = session
        engine.connected(session)
        return present

    def detach(self, connection: Connection) -> None:
        """End ``connection``'s hold on its session; a clean session ends with it."""
        session = connection.session
        if session is None or self.online.get(session.client_id) is not connection:
            return
        del self.online[session.client_id]
        engine = self.state
        engine.disconnected(session)
        logger.info("Client %s disconnected from %s.", session.client_id, connection.peer)
        if session.clean_session:
            engine.forget(session.client_id)
            self._dropping.pop(session.client_id, None)

    # --- shutdown -------------------------------------------------------------------------------

    async def close_all(self, grace: float) -> None:
        """Close every connection: gently, then, after ``grace`` seconds, abruptly."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self.connections):
            connection.close(will=False)
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for connection in list(self.connections):
            connection.abort()


class Connection(asyncio.Protocol):
    """One client's connection: framing, checks, keepalive, its flows and its writes."""

    def __init__(self, hub: Hub, *, tls: bool = False) -> None:
        """Serve one connection for ``hub``."""
        self.hub = hub
        self.tls = tls
        self.limits = hub.limits
        self.framer = Framer(hub.limits.max_packet_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: Session | None = None
        self._peer_address: tuple[str, int] = ("?", 0)
        self._out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._limit = 0.0
        self._heard_at = 0.0
        self._loop = asyncio.get_running_loop()  # protocols are made by the running server
        self._will: Will | None = None
        self._goodbye = False
        self._ended = False
        self._counted = False
        self._dropped_qos0 = 0
        self.backlog = False
        """Whether messages wait in the session's queue (later ones queue behind them)."""

    @property
    def name(self) -> str:
        """The client id once connected, else the peer address (for log lines)."""
        return self.session.client_id if self.session is not None else self.peer

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accept the connection, or refuse it at once when --max-connections are in use."""
        self.transport = cast("asyncio.Transport", transport)  # a stream server's (or uvloop's)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self._peer_address = (str(peer[0]), int(peer[1]))
        self.peer = f"{peer[0]}:{peer[1]}"
        hub = self.hub
        if hub.max_connections and len(hub.connections) >= hub.max_connections:
            # amqtt's own limit (a semaphore) made the extra client wait without a word.
            hub.refused += 1
            if hub.refused in (1, 10, 100) or hub.refused % 1000 == 0:
                logger.warning(
                    "Refused a connection: %d of --max-connections %d in use (%d refused so far).",
                    len(hub.connections), hub.max_connections, hub.refused,
                )  # fmt: skip
            self._ended = True
            transport.close()
            return
        hub.connections.add(self)
        self._counted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.limits.connect_timeout, self._no_connect)

    def data_received(self, data: bytes) -> None:
        """Handle every whole packet this read completed; write what they caused once."""
        hub = self.hub
        hub.batching = True
        try:
            self.framer.feed(data)
            self._work()
        finally:
            hub.flush()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's
        """Release everything the connection held; publish the will unless it said goodbye."""
        self._end(will=not self._goodbye)
        hub = self.hub
        if self._counted:
            hub.connections.discard(self)
            if not hub.connections and hub._all_closed is not None:
                hub._all_closed.set()
        self.transport = None

    def pause_writing(self) -> None:
        """Stop reading from a client that does not read what we send, until it does."""
        self._pause("writing")

    def resume_writing(self) -> None:
        """Read again from a client that reads again."""
        self._resume("writing")

    # --- reading ----------------------------------------------------------------------------

    def _work(self) -> None:
        """Handle buffered packets until the buffer runs dry or a packet starts awaited work."""
        handled = False
        while self._task is None and not self._ended:
            try:
                frame = self.framer.next_frame()
                if frame is None:
                    break
                handled = True
                self._handle(frame)
            except ProtocolViolation as exc:
                if self.session is None:
                    logger.warning("Closed %s: %s.", self.peer, exc)
                else:
                    logger.warning("Client %s closed: %s.", self.name, exc)
                self.close(will=True)
                return
            except Exception as exc:  # noqa: BLE001 - one packet's bug ends one connection
                self._internal_error(exc)
                return
        if handled and self._limit:
            self._heard_at = self._loop.time()
        if self._task is not None and self.framer.buffered > self.limits.max_packet_size:
            self._pause("busy")

    def _handle(self, frame: Frame) -> None:
        session = self.session
        kind = frame.packet_type
        if session is None:
            protocol.check(frame, connected=False)
            self._on_connect(frame)
            return
        if kind == PUBLISH:  # the hot path first
            self._on_publish(session, protocol.check_publish(frame))
            return
        packet = protocol.check(frame, connected=True)
        if kind == PUBACK:
            self._on_ack(session, protocol.packet_id_of(frame), qos=1)
        elif kind == PUBREC:
            self._on_pubrec(session, protocol.packet_id_of(frame))
        elif kind == PUBREL:
            self._on_pubrel(session, protocol.packet_id_of(frame))
        elif kind == PUBCOMP:
            self._on_ack(session, protocol.packet_id_of(frame), qos=2)
        elif kind == SUBSCRIBE:
            assert isinstance(packet, Subscribe)  # noqa: S101
            self._start(self._subscribe(session, packet), "subscribe")
        elif kind == UNSUBSCRIBE:
            assert isinstance(packet, Unsubscribe)  # noqa: S101
            for topic_filter in packet.filters:
                self.hub.state.unsubscribe(session, topic_filter)
            self.send(encode_ack(UNSUBACK, packet.packet_id))
        elif kind == PINGREQ:
            self.send(protocol.PINGRESP_PACKET)
        elif kind == DISCONNECT:
            # [MQTT-3.1.2-10]: a client that says goodbye has its will discarded.
            self._goodbye = True
            self.close(will=False)

    # --- connecting -------------------------------------------------------------------------

    def _no_connect(self) -> None:
        logger.info("Closed %s: no CONNECT within %g s.", self.peer, self.limits.connect_timeout)
        self.close(will=False)

    def _on_connect(self, frame: Frame) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            connect = protocol.decode_connect(frame)
        except UnsupportedProtocol as exc:
            if exc.level is not None and exc.level >= 5:
                # In the form a newer client can read: MQTT 5's CONNACK, 0x84 (section 3.2.2.2).
                self.send(protocol.CONNACK_UNSUPPORTED_V5)
            elif exc.level is not None:
                self.send(encode_connack(UNACCEPTABLE_PROTOCOL_VERSION))  # [MQTT-3.1.2-2]
            logger.warning("Refused %s: %s; this broker speaks MQTT 3.1.1.", self.peer, exc)
            self.close(will=False)
            return
        if not connect.client_id and not connect.clean_session:
            self.send(encode_connack(IDENTIFIER_REJECTED))
            logger.warning(
                "Refused %s: empty client id without clean session [MQTT-3.1.3-8].", self.peer
            )
            self.close(will=False)
            return
        self._start(self._connect(connect), "connect")

    async def _connect(self, connect: Connect) -> None:
        hub = self.hub
        session = Engine.new_session(
            connect.client_id, clean=connect.clean_session, peer=self._peer_address
        )
        session.keep_alive = connect.keep_alive
        session.username = connect.username
        session.password = connect.password
        if not await hub.state.authenticate(session):
            # Before take-over and session lookup: a client that fails to log in must not
            # knock off, or end the session of, the client whose id it used.
            logger.warning(
                "Client %s from %s refused: not authorized.", session.client_id, self.peer
            )
            self.send(encode_connack(NOT_AUTHORIZED))
            self.close(will=False)
            return
        if self._ended:
            return
        present = hub.attach(self, connect, session)
        self._will = connect.will
        self.send(encode_connack(0, session_present=present))
        logger.info("Client %s connected from %s.", self.name, self.peer)
        if connect.keep_alive:
            loop = asyncio.get_running_loop()
            self._limit = connect.keep_alive * KEEPALIVE_GRACE
            self._heard_at = loop.time()
            self._timer = loop.call_later(self._limit, self._check_keepalive)
        self._resume_session()

    def _resume_session(self) -> None:
        """Resend what the session had in flight [MQTT-4.4.0-1], then what waits for it."""
        session = self.session
        assert session is not None  # noqa: S101
        for packet_id, message in list(session.inflight_out.items()):
            if message.qos == 2 and message.pubrec_packet is not None:
                self.send(encode_ack(PUBREL, packet_id))
            else:
                self.send(encode_publish(
                    message.topic, bytes(message.data), message.qos or 1, packet_id,
                    retain=bool(message.retain), dup=True,
                ))  # fmt: skip
        self.backlog = bool(self.hub.state.queued(session))
        self._pump(session)

    def _check_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._heard_at + self._limit
        if now < due or self._task is not None or "writing" in self._paused:
            # Heard from since; or busy, or not read by us: not the client's silence.
            self._timer = loop.call_at(max(due, now + 0.1), self._check_keepalive)
            return
        self._timer = None
        logger.warning(
            "Client %s closed: silent for more than %g s [MQTT-3.1.2-24].", self.name, self._limit
        )
        self.close(will=True)

    # --- publishing -------------------------------------------------------------------------

    def _on_publish(self, session: Session, publish: Publish) -> None:
        packet_id = publish.packet_id or 0
        if publish.qos == 2:
            # Kept until PUBREL, then delivered once however often it is resent [MQTT-4.3.3-2].
            if packet_id not in session.inflight_in:
                if len(session.inflight_in) >= self.limits.max_queued:
                    # Each waits for its PUBREL in memory; a client that never sends one must
                    # not grow the broker without bound (MQTT 5 calls this receive maximum).
                    raise ProtocolViolation(
                        f"more than {self.limits.max_queued} QoS 2 messages awaiting PUBREL",
                        "server limit --max-queued",
                    )
                session.inflight_in[packet_id] = IncomingApplicationMessage(
                    packet_id, publish.topic, 2, publish.payload, publish.retain
                )
            self.send(encode_ack(PUBREC, packet_id))
            return
        self._route(
            session, publish.topic, publish.payload, publish.qos, retain=publish.retain,
            frame=publish.raw,
        )  # fmt: skip
        if publish.qos == 1:
            # The message is ours once PUBACK is sent [MQTT-4.3.2-2]; it is already on its way.
            self.send(encode_ack(PUBACK, packet_id))

    def _on_pubrel(self, session: Session, packet_id: int) -> None:
        # After a reconnect the client resends PUBREL for a message stored before: deliver it
        # now, and answer PUBCOMP either way [MQTT-4.3.3-2, MQTT-4.4.0-1].
        message = session.inflight_in.pop(packet_id, None)
        if message is not None:
            self._route(session, message.topic, bytes(message.data), 2, retain=bool(message.retain))
        self.send(encode_ack(PUBCOMP, packet_id))

    def _route(
        self, session: Session, topic: str, payload: bytes, qos: int, *, retain: bool,
        frame: bytes | None = None,
    ) -> None:  # fmt: skip
        if topic.startswith("$SYS"):
            # $SYS is the server's own (section 4.7.2); a client's publish there is dropped.
            logger.warning("Client %s published to %s: dropped.", session.client_id, topic)
            return
        self.hub.publish(topic, payload, qos, frame)
        if retain:
            # [MQTT-3.3.1-5]: kept for future subscribers; an empty payload clears it [-10].
            self._start(self.hub.state.retain(session, topic, payload, qos), "retain")

    # --- delivering to this client ----------------------------------------------------------

    def deliver(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> None:
        """Send a message now if the window has room and nothing waits, else queue it."""
        session = self.session
        assert session is not None  # noqa: S101
        if self.backlog or (qos and len(session.inflight_out) >= self.limits.max_inflight):
            self.hub.queue(session, topic, payload, qos, retain=retain)
            self.backlog = True
            return
        self._send_new(session, topic, payload, qos, retain=retain)

    def _send_new(
        self, session: Session, topic: str, payload: bytes, qos: int, *, retain: bool
    ) -> None:
        if not qos:
            self.send(encode_publish(topic, payload, retain=retain))
            return
        packet_id = session.next_packet_id
        # Kept until acknowledged, and resent on reconnect [MQTT-4.3.2-1, MQTT-4.4.0-1].
        session.inflight_out[packet_id] = OutgoingApplicationMessage(
            packet_id, topic, qos, payload, retain
        )
        self.send(encode_publish(topic, payload, qos, packet_id, retain=retain))

    def _pump(self, session: Session) -> None:
        """Fill the window from the session's queue."""
        engine = self.hub.state
        while len(session.inflight_out) < self.limits.max_inflight:
            waiting = engine.dequeue(session)
            if waiting is None:
                self.backlog = False
                self.hub.drained(session.client_id)
                return
            topic, payload, qos, retain = waiting
            self._send_new(session, topic, payload, qos, retain=retain)

    def _on_ack(self, session: Session, packet_id: int, qos: int) -> None:
        """PUBACK (qos 1) or PUBCOMP (qos 2): the delivery is done; the window has room."""
        message = session.inflight_out.get(packet_id)
        if message is None:
            logger.debug("Client %s acknowledged unknown packet id %d.", self.name, packet_id)
            return
        # An acknowledgement of the wrong kind breaks the flow of section 4.3.2 or 4.3.3.
        if message.qos != qos:
            ack = "PUBACK" if qos == 1 else "PUBCOMP"
            raise ProtocolViolation(
                f"{ack} for packet id {packet_id}, a QoS {message.qos} delivery",
                "MQTT-4.3.2" if message.qos == 1 else "MQTT-4.3.3",
            )
        if qos == 2 and message.pubrec_packet is None:
            raise ProtocolViolation(
                f"PUBCOMP for packet id {packet_id} before its PUBREC", "MQTT-4.3.3"
            )
        del session.inflight_out[packet_id]
        self._pump(session)

    def _on_pubrec(self, session: Session, packet_id: int) -> None:
        message = session.inflight_out.get(packet_id)
        if message is not None and message.qos == 1:
            raise ProtocolViolation(
                f"PUBREC for packet id {packet_id}, a QoS 1 delivery", "MQTT-4.3.2"
            )
        if message is not None:
            message.pubrec_packet = True  # PUBREL is resent on reconnect, not PUBLISH
        # For an id we never used, PUBREL too, as mosquitto answers (and MQTT 5 does, 0x92).
        self.send(encode_ack(PUBREL, packet_id))

    def send_qos0(self, frame: bytes) -> None:
        """Send an encoded QoS 0 PUBLISH, unless the client lags too far (then drop it)."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > QOS0_BUFFER_LIMIT:
            # An unbounded buffer for a client that reads nothing would not be allowed; at
            # most once allows dropping. Said once per thousand, not per message.
            self._dropped_qos0 += 1
            if self._dropped_qos0 % 1000 == 1:
                logger.warning(
                    "Client %s is not reading: dropped %d QoS 0 messages so far.",
                    self.name, self._dropped_qos0,
                )  # fmt: skip
            return
        if self.hub.batching:
            if not self._out:
                self.hub.mark(self)
            self._out.append(frame)
        elif not transport.is_closing():
            transport.write(frame)

    # --- subscribing ------------------------------------------------------------------------

    async def _subscribe(self, session: Session, subscribe: Subscribe) -> None:
        engine = self.hub.state
        codes = []
        for topic_filter, qos in subscribe.filters:
            if any(_denied(topic_filter, pattern) for pattern in self.limits.deny_subscribe):
                logger.info("Client %s may not subscribe to %s.", self.name, topic_filter)
                codes.append(0x80)
            else:
                codes.append(await engine.subscribe(session, topic_filter, qos))
        if self._ended:
            return
        self.send(encode_suback(subscribe.packet_id, codes))
        # [MQTT-3.3.1-6]: a new subscription gets the retained messages it matches, RETAIN 1.
        for (topic_filter, _), granted in zip(subscribe.filters, codes, strict=True):
            if granted == 0x80:
                continue
            for topic, payload, retained_qos in engine.retained(topic_filter):
                self.deliver(topic, payload, min(granted, retained_qos), retain=True)

    # --- awaited work -----------------------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` before any later packet of this connection is handled."""
        self._task = self.hub.spawn(self._run(coro), f"{what} {self.peer}")

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - as in _work
            self._task = None
            self._internal_error(exc)
            return
        self._task = None
        if self._ended:
            return
        self._resume("busy")
        hub = self.hub
        hub.batching = True
        try:
            self._work()
        finally:
            hub.flush()

    def _internal_error(self, exc: Exception) -> None:
        # A bug in handling one packet ends this connection, visibly, rather than leave one
        # that looks alive but is never read again.
        logger.error(
            "Client %s closed: internal error %r.", self.name, exc,
            exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
        )  # fmt: skip
        self.close(will=True)

    # --- writing and closing ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write ``data``: at the end of the current callback if gathering, else now."""
        if self.hub.batching:
            if not self._out:
                self.hub.mark(self)
            self._out.append(data)
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

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

    def close(self, *, will: bool) -> None:
        """End the connection: what is gathered goes out first, then the socket closes."""
        self._end(will=will)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close the socket now, dropping anything unsent."""
        if self.transport is not None:
            self.transport.abort()

    def _end(self, *, will: bool) -> None:
        """Leave the hub once: detach the session, publish the will if it is due."""
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        hub = self.hub
        session = self.session
        hub.detach(self)
        if will and self._will is not None and not hub.stopping:
            # [MQTT-3.1.2-8]: lost, silent, or closed for a protocol error.
            hub.publish_will(session, self._will)

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


def _denied(topic_filter: str, pattern: str) -> bool:
    """Return whether a deny-list ``pattern`` (a topic filter) covers ``topic_filter``.

    The requested filter is matched level by level as if it were a topic name, so ``secret/#``
    denies ``secret``, ``secret/a`` and ``secret/+``.
    """
    wanted = topic_filter.split("/")
    for index, level in enumerate(pattern.split("/")):
        if level == "#":
            return True
        if index >= len(wanted) or level not in ("+", wanted[index]):
            return False
    return len(wanted) == len(pattern.split("/"))
