"""The connection layer: an asyncio.Protocol per client (the hub routes between them).

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
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import mqtt5

from broker import connect as handshake
from broker import protocol, v5
from broker import reasons as rc
from broker.engine import Engine, Incoming, Message, Session, SubOptions, topic_matches
from broker.flows import Flows
from broker.framing import Framer
from broker.hub import Hub
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
    Wanted,
    Will,
    encode_ack,
    encode_publish,
    encode_suback,
)
from broker.v5 import Props

logger = logging.getLogger("broker")

KEEPALIVE_GRACE = 1.5
"""[MQTT-3.1.2-24]: close a client silent for more than 1.5 times its keepalive."""
QOS0_BUFFER_LIMIT = 4 * 1024 * 1024
"""Above this many unsent bytes for a client, QoS 0 messages to it are dropped (at most once)."""

HTTP_METHODS = frozenset({b"GET ", b"HEAD", b"POST", b"PUT ", b"OPTI", b"DELE", b"PATC"})
"""How an HTTP request starts: no MQTT CONNECT does (its first byte is 0x10)."""
HTTP_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"This is an MQTT port (MQTT 5.0 and 3.1.1 over TCP), not HTTP. MQTT over WebSockets is "
    b"not enabled on this broker.\n"
)
RETAIN_IF_NEW, RETAIN_NEVER = 1, 2
"""MQTT 5 retain handling (section 3.8.3.1): 0 sends retained messages on every SUBSCRIBE."""


class Connection(asyncio.Protocol):
    """One client's connection: framing, checks, keepalive, its flows and its writes."""

    def __init__(self, hub: Hub) -> None:
        """Serve one connection for ``hub``."""
        self.hub = hub
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
        self._how = "connection lost (no DISCONNECT)"
        """How the connection ended, for the broker's log line: lost until we know better."""
        self._ended = False
        self._counted = False
        self._dropped_qos0 = 0
        self.flows: Flows | None = None
        """The session's QoS flows over this connection, once it has any (see _flows)."""
        self.window = hub.limits.max_inflight
        """Unacknowledged QoS 1/2 messages allowed (an MQTT 5 client's receive maximum too)."""
        # MQTT 5 only:
        self.v5 = False
        self.expiry: int | None = None
        """The session expiry interval (seconds) an MQTT 5 client asked for."""
        self._will_props: Props | None = None
        self._will_delay = 0
        self._max_out: int | None = None
        """The largest packet the client accepts (its maximum packet size)."""
        self._aliases: dict[int, str] = {}
        self._assigned = False
        self._request: handshake.Request  # what CONNECT asked for, from _on_connect on

    @property
    def backlog(self) -> bool:
        """Whether messages wait in the session's queue (later ones queue behind them)."""
        flows = self.flows
        return flows is not None and flows.backlog

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
        if self.session is None and self._task is None and data[:4] in HTTP_METHODS:
            self._not_http(data)
            return
        self.framer.feed(data)
        self._work_batched()

    def _not_http(self, data: bytes) -> None:
        """Answer an HTTP request (a browser, a WebSocket upgrade) with what this port is."""
        line = data.split(b"\r\n", 1)[0][:80].decode("ascii", "replace")
        logger.warning(
            "Closed %s: an HTTP request (%s) on the MQTT TCP port; MQTT over WebSockets is not "
            "enabled on this broker.", self.peer, line,
        )  # fmt: skip
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.write(HTTP_REFUSAL)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's
        """Release everything the connection held; publish the will unless it said goodbye."""
        self._end(will=not self._goodbye)
        if self._counted:
            self.hub.closed(self)
        self.transport = None

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
        while self._task is None and not self._ended:
            try:
                frame = self.framer.next_frame()
                if frame is None:
                    break
                handled = True
                self._handle(frame)
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

    def _handle(self, frame: Frame) -> None:
        session = self.session
        kind = frame.packet_type
        if session is None:
            protocol.check(frame, connected=False)
            self._on_connect(frame)
            return
        if self.v5:
            self._handle_v5_frame(session, frame)
            return
        if kind == PUBLISH:  # the hot path first
            self._on_publish(session, protocol.check_publish(frame))
            return
        packet = protocol.check(frame, connected=True)
        if kind == PUBACK:
            self._flows.acknowledged(protocol.packet_id_of(frame), 1)
        elif kind == PUBREC:
            self._flows.received(protocol.packet_id_of(frame))
        elif kind == PUBREL:
            self._on_pubrel(session, protocol.packet_id_of(frame))
        elif kind == PUBCOMP:
            self._flows.acknowledged(protocol.packet_id_of(frame), 2)
        elif kind == SUBSCRIBE:
            assert isinstance(packet, Subscribe)  # noqa: S101
            wanted = [Wanted(topic_filter, qos) for topic_filter, qos in packet.filters]
            self._start(self._subscribe(session, packet.packet_id, wanted, None), "subscribe")
        elif kind == UNSUBSCRIBE:
            assert isinstance(packet, Unsubscribe)  # noqa: S101
            self._unsubscribe(session, packet.packet_id, packet.filters)
        elif kind == PINGREQ:
            self.send(protocol.PINGRESP_PACKET)
        elif kind == DISCONNECT:
            # [MQTT-3.1.2-10]: a client that says goodbye has its will discarded.
            self._goodbye = True
            self._how = "it sent DISCONNECT"
            self.close(will=False)

    # --- connecting -------------------------------------------------------------------------

    def _no_connect(self) -> None:
        logger.info("Closed %s: no CONNECT within %g s.", self.peer, self.limits.connect_timeout)
        self.close(will=False)

    def _on_connect(self, frame: Frame) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        request = handshake.read(frame, self.limits, time.monotonic())
        if isinstance(request, handshake.Refusal):
            if request.reply is not None:
                self.send(request.reply)
            logger.warning("Refused %s: %s.", self.peer, request.why)
            self.close(will=False)
            return
        self._request = request
        self.v5, self.window, self.expiry = request.v5, request.window, request.expiry
        self._max_out, self._will_props = request.max_out, request.will_props
        self._will_delay = request.will_delay
        self._start(self._connect(request.connect), "connect")

    async def _connect(self, connect: Connect) -> None:
        hub = self.hub
        session = Engine.new_session(
            connect.client_id, clean=connect.ends_with_connection, peer=self._peer_address
        )
        self._assigned = not connect.client_id
        session.keep_alive = connect.keep_alive
        session.username = connect.username
        session.password = connect.password
        if not await hub.state.authenticate(session):
            # Before take-over and session lookup: a client that fails to log in must not
            # knock off, or end the session of, the client whose id it used.
            logger.warning(
                "Client %s from %s refused: not authorized.", session.client_id, self.peer
            )
            self.send(handshake.not_authorized(self._request))
            self.close(will=False)
            return
        if self._ended:
            return
        present = hub.attach(self, connect, session)
        self._will = connect.will
        assigned = self.name if self._assigned else None
        self.send(handshake.connack(self._request, self.limits, present=present,
                                    assigned=assigned))  # fmt: skip
        logger.info(
            "Client %s connected from %s (MQTT %s).", self.name, self.peer,
            "5.0" if self.v5 else "3.1.1",
        )  # fmt: skip
        if connect.keep_alive:
            loop = asyncio.get_running_loop()
            self._limit = connect.keep_alive * KEEPALIVE_GRACE
            self._heard_at = loop.time()
            self._timer = loop.call_later(self._limit, self._check_keepalive)
        resumed = self.session
        if resumed is not None and (resumed.inflight_out or hub.size(resumed)):
            self._flows.resume()  # what was in flight [MQTT-4.4.0-1], then what waits

    # --- MQTT 5 ---------------------------------------------------------------------------

    def _handle_v5_frame(self, session: Session, frame: Frame) -> None:
        if frame.packet_type == PUBLISH:
            plain = v5.plain_publish(frame)
            if plain is not None:
                # The hot path: no properties, nothing for the codec to build.
                self.hub.counters.received += 1
                self._accept(session, plain.topic, plain.qos, plain.packet_id or 0,
                             plain.payload, retain=plain.retain, frame5=plain.raw)  # fmt: skip
                return
        self._handle_v5(session, v5.read(frame), frame)

    def _handle_v5(self, session: Session, packet: v5.Packet, frame: Frame) -> None:  # noqa: PLR0912
        match packet:
            case mqtt5.PublishPacket():
                self._on_publish_v5(session, packet, frame)
            case mqtt5.PubAckPacket():
                self._flows.acknowledged(packet.packet_id, 1)
            case mqtt5.PubRecPacket():
                self._flows.received(packet.packet_id, refused=rc.failed(packet.reason_code))
            case mqtt5.PubRelPacket():
                self._on_pubrel(session, packet.packet_id)
            case mqtt5.PubCompPacket():
                self._flows.acknowledged(packet.packet_id, 2)
            case mqtt5.SubscribePacket():
                # Checked whole before any filter is subscribed: a protocol error subscribes
                # none of them.
                for topic_filter in packet.topic_filters:
                    _check_shared(topic_filter)
                wanted = [Wanted(f.pattern, int(f.max_qos), f.no_local, f.retain_as_published,
                                 int(f.retain_handling)) for f in packet.topic_filters]  # fmt: skip
                self._start(self._subscribe(session, packet.packet_id, wanted,
                                            packet.subscription_id), "subscribe")  # fmt: skip
            case mqtt5.UnsubscribePacket():
                self._unsubscribe(session, packet.packet_id, packet.patterns)
            case mqtt5.PingReqPacket():
                self.send(protocol.PINGRESP_PACKET)
            case mqtt5.DisconnectPacket():
                expiry = packet.session_expiry_interval
                if expiry is not None:
                    if self.expiry == 0 and expiry:
                        raise ProtocolViolation(
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                            "MQTT-3.14.2-2", code=rc.PROTOCOL_ERROR,
                        )  # fmt: skip
                    self.expiry = expiry
                    session.clean_session = expiry == 0
                # 0x04: disconnect with will message; any other reason discards it.
                with_will = rc.value(packet.reason_code) == rc.DISCONNECT_WITH_WILL_MESSAGE
                self._goodbye = not with_will
                self._how = ("it sent DISCONNECT with will (0x04)" if with_will
                             else "it sent DISCONNECT")  # fmt: skip
                self.close(will=with_will)
            case _:  # AUTH without an authentication method in CONNECT
                raise ProtocolViolation(f"unexpected {type(packet).__name__}", "MQTT-4.12.0-1",
                                        code=rc.PROTOCOL_ERROR)  # fmt: skip

    def _topic_of(self, packet: mqtt5.PublishPacket) -> str:
        """Return the PUBLISH's topic, through its topic alias if it has one (MQTT 5 3.3.2.3.4)."""
        topic = packet.topic
        alias = packet.topic_alias
        if alias is not None:
            most = handshake.TOPIC_ALIAS_MAXIMUM
            if not 0 < alias <= most:
                raise ProtocolViolation(f"topic alias {alias} not in 1..{most}", "MQTT-3.3.2-9",
                                        code=rc.TOPIC_ALIAS_INVALID)  # fmt: skip
            if topic:
                self._aliases[alias] = topic
            elif alias in self._aliases:
                topic = self._aliases[alias]
            else:
                raise ProtocolViolation(f"topic alias {alias} was never set", "MQTT-3.3.4",
                                        code=rc.PROTOCOL_ERROR)  # fmt: skip
        elif not topic:
            raise ProtocolViolation("PUBLISH with no topic and no alias", "MQTT-3.3.2-8",
                                    code=rc.PROTOCOL_ERROR)  # fmt: skip
        return topic

    def _on_publish_v5(self, session: Session, packet: mqtt5.PublishPacket, frame: Frame) -> None:
        self.hub.counters.received += 1
        topic = self._topic_of(packet)
        qos, packet_id, payload = int(packet.qos), packet.packet_id or 0, packet.payload
        if packet.payload_format_indicator == 1 and not _utf8(payload):
            # MQTT 5 section 3.3.2.3.2: a "UTF-8" payload that is not: refused, 0x99.
            if qos == 0:
                raise ProtocolViolation("payload marked UTF-8 is not", "MQTT-3.3.2-4",
                                        code=rc.PAYLOAD_FORMAT_INVALID)  # fmt: skip
            self.send(v5.ack(PUBACK if qos == 1 else PUBREC, packet_id, rc.PAYLOAD_FORMAT_INVALID))
            return
        props = Props.of(packet, time.monotonic())
        # A QoS 0 PUBLISH without RETAIN or topic alias is, as received, what an MQTT 5
        # subscriber with no subscription identifier gets: forwarded in the bytes it came in.
        # Its message expiry too: it is routed in this same callback, so the time left, rounded
        # up to whole seconds [MQTT-3.3.2-6], is still the interval it came with.
        same = (
            frame.raw if qos == 0 and not packet.retain and packet.topic_alias is None
            else None
        )  # fmt: skip
        self._accept(session, topic, qos, packet_id, payload, retain=packet.retain, props=props,
                     frame5=same)  # fmt: skip

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
        self.close(will=True, reason=rc.KEEP_ALIVE_TIMEOUT,
                   why=f"silent for more than {self._limit:g} s [MQTT-3.1.2-24]")  # fmt: skip

    # --- publishing -------------------------------------------------------------------------

    def _on_publish(self, session: Session, publish: Publish) -> None:
        """Take a checked 3.1.1 PUBLISH (the hot path)."""
        self.hub.counters.received += 1
        self._accept(session, publish.topic, publish.qos, publish.packet_id or 0,
                     publish.payload, retain=publish.retain, frame=publish.raw)  # fmt: skip

    def _accept(
        self, session: Session, topic: str, qos: int, packet_id: int, payload: bytes, *,
        retain: bool, props: Props | None = None, frame: bytes | None = None,
        frame5: bytes | None = None,
    ) -> None:  # fmt: skip
        """Take a checked PUBLISH of either version: hold it for PUBREL or route it; ack it.

        MQTT 5's acknowledgement says when nobody subscribed (0x10, sections 3.4.2.1, 3.5.2.1).
        """
        if qos == 2:
            # Kept until PUBREL, then delivered once however often it is resent [MQTT-4.3.3-2].
            self._flows.hold(Incoming(packet_id, topic, 2, payload, retain, props))
            if self.v5 and not self.hub.state.has_subscribers(topic):
                self.send(v5.ack(PUBREC, packet_id, rc.NO_MATCHING_SUBSCRIBERS))
            else:
                self.send(encode_ack(PUBREC, packet_id))
            return
        matched = self._route(session, topic, payload, qos, retain=retain, frame=frame,
                              props=props, frame5=frame5)  # fmt: skip
        if qos == 1:
            # The message is ours once PUBACK is sent [MQTT-4.3.2-2]; it is already on its way.
            if matched or not self.v5:
                self.send(encode_ack(PUBACK, packet_id))
            else:
                self.send(v5.ack(PUBACK, packet_id, rc.NO_MATCHING_SUBSCRIBERS))

    def _on_pubrel(self, session: Session, packet_id: int) -> None:
        # After a reconnect the client resends PUBREL for a message stored before: deliver it
        # now, and answer PUBCOMP either way [MQTT-4.3.3-2, MQTT-4.4.0-1].
        message = self._flows.release(packet_id)
        if message is not None:
            props = getattr(message, "props", None)
            self._route(session, message.topic, bytes(message.data), 2,
                        retain=bool(message.retain), props=props)  # fmt: skip
        if message is None and self.v5:
            self.send(v5.ack(PUBCOMP, packet_id, rc.PACKET_ID_NOT_FOUND))
        else:
            self.send(encode_ack(PUBCOMP, packet_id))

    def _route(
        self, session: Session, topic: str, payload: bytes, qos: int, *, retain: bool,
        frame: bytes | None = None, props: Props | None = None, frame5: bytes | None = None,
    ) -> bool:  # fmt: skip
        """Publish a client's message; return whether any subscriber matched."""
        if topic.startswith("$SYS"):
            # $SYS is the server's own (section 4.7.2); a client's publish there is dropped.
            logger.warning("Client %s published to %s: dropped.", session.client_id, topic)
            return False
        matched = self.hub.publish(topic, payload, qos, frame, retain=retain, props=props,
                                   origin=session.client_id, frame5=frame5)  # fmt: skip
        if retain:
            # [MQTT-3.3.1-5]: kept for future subscribers; an empty payload clears it [-10].
            self._start(self.hub.state.retain(session, topic, payload, qos, props), "retain")
        return matched

    # --- delivering to this client ----------------------------------------------------------

    @property
    def _flows(self) -> Flows:
        """The session's flows, made when first needed: an idle connection costs none."""
        flows = self.flows
        if flows is None:
            session = self.session
            assert session is not None  # noqa: S101 - packets after CONNECT come after CONNACK
            flows = self.flows = Flows(
                session, window=self.window, hold_limit=self.limits.max_queued,
                send=self.send, encode=self._encode_publish, queue=self.hub,
                clock=time.monotonic, v5=self.v5,
            )  # fmt: skip
        return flows

    def deliver(
        self, topic: str, payload: bytes, qos: int, *, retain: bool, props: Props | None = None,
        ids: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        """Send a message now if the window has room and nothing waits, else queue it."""
        self._flows.deliver(Message(None, topic, qos, payload, retain, props, ids))

    def _encode_publish(self, message: Message, packet_id: int | None, dup: bool) -> bytes | None:
        """Encode a PUBLISH in the connection's version, or None if the client cannot take it."""
        qos = message.qos or 0
        payload = bytes(message.data)
        if not self.v5:
            self.hub.counters.sent += 1
            return encode_publish(message.topic, payload, qos, packet_id or 0,
                                  retain=bool(message.retain), dup=dup)  # fmt: skip
        data = v5.encode_publish(
            message.topic, payload, qos, packet_id, retain=bool(message.retain), dup=dup,
            props=getattr(message, "props", None),
            subscription_ids=list(getattr(message, "subscription_ids", ())),
        )  # fmt: skip
        if self._max_out is not None and len(data) > self._max_out:
            # MQTT 5 [MQTT-3.1.2-25]: never more than the client accepts; dropped as delivered.
            logger.debug("Client %s: a %d-byte PUBLISH is over its maximum.", self.name, len(data))
            self.hub.counters.dropped += 1
            return None
        self.hub.counters.sent += 1
        return data

    def send_qos0(self, frame: bytes) -> None:
        """Send an encoded QoS 0 PUBLISH, unless the client lags too far (then drop it)."""
        transport = self.transport
        if transport is None:
            return
        if self._max_out is not None and len(frame) > self._max_out:
            self.hub.counters.dropped += 1
            return  # MQTT 5 [MQTT-3.1.2-25]: dropped, as if delivered
        if transport.get_write_buffer_size() > QOS0_BUFFER_LIMIT:
            # An unbounded buffer for a client that reads nothing would not be allowed; at
            # most once allows dropping. Said once per thousand, not per message.
            self._dropped_qos0 += 1
            self.hub.counters.dropped += 1
            if self._dropped_qos0 % 1000 == 1:
                logger.warning(
                    "Client %s is not reading: dropped %d QoS 0 messages so far.",
                    self.name, self._dropped_qos0,
                )  # fmt: skip
            return
        hub = self.hub
        hub.counters.sent += 1
        if hub.batching:
            if not self._out:
                hub.mark(self)
            self._out.append(frame)
        elif not transport.is_closing():
            transport.write(frame)

    # --- subscribing ------------------------------------------------------------------------

    async def _subscribe(
        self, session: Session, packet_id: int, wanted: list[Wanted], subscription_id: int | None
    ) -> None:
        """SUBSCRIBE, both versions: subscribe each filter, SUBACK, then retained messages."""
        engine = self.hub.state
        codes: list[int] = []
        fresh: list[bool] = []
        for want in wanted:
            topic_filter = want.topic_filter
            if any(topic_matches(topic_filter, deny, dollar=True)
                   for deny in self.limits.deny_subscribe):  # fmt: skip
                logger.info("Client %s may not subscribe to %s.", self.name, topic_filter)
                codes.append(rc.NOT_AUTHORIZED if self.v5 else rc.SUBACK_FAILURE_311)
                fresh.append(False)
                continue
            options = (
                SubOptions(want.no_local, want.retain_as_published, subscription_id)
                if self.v5 else None
            )  # fmt: skip
            granted, existed = await engine.subscribe(session, topic_filter, want.qos, options)
            codes.append(granted)
            fresh.append(not existed)
        if self._ended:
            return
        self.send(v5.suback(packet_id, codes) if self.v5 else encode_suback(packet_id, codes))
        # [MQTT-3.3.1-6]: a new subscription gets the retained messages it matches, RETAIN 1,
        # as its retain handling asks (MQTT 5); none for a shared one (section 4.8.2).
        ids = (subscription_id,) if subscription_id else ()
        now = time.monotonic()
        for want, granted, new in zip(wanted, codes, fresh, strict=True):
            handling = want.retain_handling
            if rc.failed(granted) or want.topic_filter.startswith("$share/"):
                continue
            if handling == RETAIN_NEVER or (handling == RETAIN_IF_NEW and not new):
                continue
            for topic, payload, retained_qos, props in engine.retained(want.topic_filter, now):
                self.deliver(topic, payload, min(granted, retained_qos), retain=True,
                             props=props, ids=ids)  # fmt: skip

    def _unsubscribe(self, session: Session, packet_id: int, filters: Sequence[str]) -> None:
        """UNSUBSCRIBE, both versions; MQTT 5 says per filter whether it was subscribed."""
        engine = self.hub.state
        existed = [engine.unsubscribe(session, topic_filter) for topic_filter in filters]
        if self.v5:
            codes = [rc.SUCCESS if was else rc.NO_SUBSCRIPTION_EXISTED for was in existed]
            self.send(v5.unsuback(packet_id, codes))
        else:
            self.send(encode_ack(UNSUBACK, packet_id))

    # --- awaited work -----------------------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, None], what: str) -> None:
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
        if self._ended:
            return
        self._resume("busy")
        self._work_batched()

    def _violated(self, exc: ProtocolViolation) -> None:
        """Close the connection for the client's protocol error, publishing its will.

        An MQTT 5 client is told the reason code in a DISCONNECT first; the will is due as for
        any connection closed by the server [MQTT-3.1.2-8].
        """
        if self.session is None:
            logger.warning("Closed %s: %s.", self.peer, exc)
        else:
            logger.warning("Client %s closed: %s.", self.name, exc)
        self.close(will=True, reason=exc.code, why=str(exc))

    def _internal_error(self, exc: Exception) -> None:
        # A bug in handling one packet ends this connection, visibly, rather than leave one
        # that looks alive but is never read again.
        logger.error(
            "Client %s closed: internal error %r.", self.name, exc,
            exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
        )  # fmt: skip
        self.close(will=True, reason=rc.IMPLEMENTATION_SPECIFIC_ERROR, why="internal error")

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

    def close(self, *, will: bool, reason: int | None = None, why: str | None = None) -> None:
        """End the connection: what is gathered goes out first, then the socket closes.

        An MQTT 5 client is told ``reason`` in a DISCONNECT first, with ``why`` (the line the
        broker logs) as its reason string.
        """
        if reason is not None and self.v5 and self.session is not None and not self._ended:
            self.send(v5.disconnect(reason, why, self._max_out))
        if not self._ended and not self._how.startswith("it sent"):
            self._how = "closed by the broker"  # why: the line logged just before says it
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
        what = self._will if will and not hub.stopping else None  # the will now due, if any
        delay = min(self._will_delay, self.expiry or 0) if what is not None else 0
        how = self._how
        if what is not None:
            how += (f"; will due on {what.topic} in {delay} s" if delay
                    else f"; will published on {what.topic}")  # fmt: skip
        hub.detach(self, how)
        if what is not None:
            # [MQTT-3.1.2-8]: lost, silent, or closed for a protocol error.
            props = self._will_props
            if delay and session is not None:
                hub.lifetimes.delay_will(session.client_id, delay,
                               lambda: hub.publish_will(session, what, props))  # fmt: skip
            else:
                hub.publish_will(session, what, props)

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


def _check_shared(wanted: mqtt5.TopicFilter) -> None:
    """Refuse an invalid shared subscription: a protocol error (0x82), as mosquitto answers.

    No Local set on one [MQTT-3.8.3-4], or no share name (section 4.8.2).
    """
    pattern = wanted.pattern
    if not pattern.startswith("$share/"):
        return
    if wanted.no_local:
        raise ProtocolViolation(f"shared subscription {pattern!r} with No Local set",
                                "MQTT-3.8.3-4", code=rc.PROTOCOL_ERROR)  # fmt: skip
    if pattern.count("/") < 2 or not pattern.split("/", 2)[1]:
        raise ProtocolViolation(f"invalid shared subscription {pattern!r}", "MQTT-4.8.2-1",
                                code=rc.PROTOCOL_ERROR)  # fmt: skip


def _utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
