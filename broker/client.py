"""One client's MQTT conversation over one connection: a handler per packet kind, both versions.

:class:`Client` is what the hub sees of a connection (:class:`broker.hub.Attached`). It holds
what the client asked for at CONNECT, its session and its flows, and answers each packet in the
connection's version: both codecs decode into the same records (:mod:`broker.records`), and
replies go through the version's encoder (:mod:`broker.replies`). As in mosquitto, one handler
per packet kind serves MQTT 3.1.1 and 5, branching on the version inside where they differ.

It does no I/O: the connection (:mod:`broker.connection`, the asyncio protocol) hands it whole
frames and gives it a :class:`~broker.wire.Wire` to write, close, run awaited work and time
keepalive.
"""

from __future__ import annotations

import logging
import time

import mqtt5

from broker import connect as handshake
from broker import protocol, v5
from broker import reasons as rc
from broker.engine import Engine, Incoming, Message, Session
from broker.flows import Flows
from broker.hub import Hub
from broker.protocol import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Frame,
    ProtocolViolation,
)
from broker.records import Connect, Props, Publish, Subscribe, Unsubscribe, Will
from broker.replies import Replies, Replies5
from broker.topics import SubOptions, topic_matches
from broker.wire import Wire

logger = logging.getLogger("broker")

ACKNOWLEDGEMENTS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP})


class Client:
    """One client's conversation: what it asked for, its session, and a handler per packet."""

    def __init__(self, hub: Hub, wire: Wire) -> None:
        """Talk to a client over ``wire``, for ``hub``."""
        self.hub = hub
        self.limits = hub.limits
        self.wire = wire
        self.session: Session | None = None
        self.ended = False
        self.goodbye = False
        """Whether the client said goodbye (DISCONNECT): its will is then discarded."""
        self.how = "connection lost (no DISCONNECT)"
        """How the connection ended, for the broker's log line: lost until we know better."""
        self.flows: Flows | None = None
        """The session's QoS flows over this connection, once it has any (see _flows)."""
        self.v5 = False
        self.replies: type[Replies] = Replies
        self.window = hub.limits.max_inflight
        """Unacknowledged QoS 1/2 messages allowed (an MQTT 5 client's receive maximum too)."""
        self.expiry: int | None = None
        """The session expiry interval (seconds) an MQTT 5 client asked for."""
        self._will: Will | None = None
        self._request: handshake.Request  # what CONNECT asked for, from _on_connect on
        self._aliases: v5.Aliases | None = None
        """MQTT 5: the topic aliases the client set up (made at CONNECT)."""
        self._denied_topics: set[str] | None = None
        """Topics this client was refused publishing to (each logged once; made on the first)."""

    @property
    def peer(self) -> str:
        """The peer's address, for log lines."""
        return self.wire.peer

    @property
    def name(self) -> str:
        """The client id once connected, else the peer address (for log lines)."""
        return self.session.client_id if self.session is not None else self.wire.peer

    @property
    def backlog(self) -> bool:
        """Whether messages wait in the session's queue (later ones queue behind them)."""
        flows = self.flows
        return flows is not None and flows.backlog

    # --- one handler per packet kind --------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        """Handle one whole frame from the client."""
        session = self.session
        kind = frame.packet_type
        if session is None:
            protocol.check(frame, connected=False)
            self._on_connect(frame)
            return
        if kind == PUBLISH:  # the hot path first
            if self.v5:
                self._on_publish(session, v5.read_publish(frame, time.monotonic()))
            else:
                self._on_publish(session, protocol.check_publish(frame))
            return
        packet = v5.check(frame) if self.v5 else protocol.check(frame, connected=True)
        if kind in ACKNOWLEDGEMENTS:
            self._on_ack(session, kind, protocol.packet_id_of(frame), packet)
        elif isinstance(packet, Subscribe):
            self._subscribe(session, packet)
        elif isinstance(packet, Unsubscribe):
            self._unsubscribe(session, packet)
        elif kind == PINGREQ:
            self.wire.send(protocol.PINGRESP_PACKET)
        elif kind == DISCONNECT:
            self._on_disconnect(session, packet)
        else:  # MQTT 5 AUTH without an authentication method in CONNECT
            raise ProtocolViolation(f"unexpected {type(packet).__name__}", "MQTT-4.12.0-1",
                                    code=rc.PROTOCOL_ERROR)  # fmt: skip

    def _on_ack(self, session: Session, kind: int, packet_id: int, packet: object) -> None:
        """PUBACK, PUBREC, PUBREL, PUBCOMP: one step of a QoS 1 or 2 flow."""
        if kind == PUBACK:
            self._flows.acknowledged(packet_id, 1)
        elif kind == PUBREC:
            refused = isinstance(packet, mqtt5.PubRecPacket) and rc.failed(packet.reason_code)
            self._flows.received(packet_id, refused=refused)
        elif kind == PUBREL:
            self._on_pubrel(session, packet_id)
        else:
            self._flows.acknowledged(packet_id, 2)

    def _on_connect(self, frame: Frame) -> None:
        request = handshake.read(frame, self.limits, time.monotonic())
        if isinstance(request, handshake.Refusal):
            if request.reply is not None:
                self.wire.send(request.reply)
            logger.warning("Refused %s: %s.", self.peer, request.why)
            self.close(will=False)
            return
        self._request = request
        self.v5, self.window, self.expiry = request.v5, request.window, request.expiry
        if request.v5:
            self._aliases = v5.Aliases(handshake.TOPIC_ALIAS_MAXIMUM)
        self.replies = Replies5 if request.v5 else Replies
        connect = request.connect
        session = Engine.new_session(
            connect.client_id, clean=connect.ends_with_connection, peer=self.wire.peer_address
        )
        session.keep_alive = connect.keep_alive
        session.username = connect.username
        session.password = connect.password
        identity = self.wire.identity
        if identity is not None:
            # --use-identity-as-username: the verified certificate is the credential (as in
            # mosquitto), its common name the user the ACL sees.
            session.username, session.password = identity, None
            self._admit(connect, session, allowed=True)
            return
        allowed = self.hub.state.authenticate_now()
        if allowed is None:  # a password to check, in a worker thread
            self.wire.start(self._authenticate(connect, session), "connect")
        else:
            self._admit(connect, session, allowed=allowed)

    async def _authenticate(self, connect: Connect, session: Session) -> None:
        allowed = await self.hub.state.authenticate(session)
        if not self.ended:
            self._admit(connect, session, allowed=allowed)

    def _admit(self, connect: Connect, session: Session, *, allowed: bool) -> None:
        """CONNACK the client, or refuse it; attach its session to the hub."""
        hub = self.hub
        if not allowed:
            # Before take-over and session lookup: a client that fails to log in must not
            # knock off, or end the session of, the client whose id it used.
            logger.warning(
                "Client %s from %s refused: not authorized.", session.client_id, self.peer
            )
            self.wire.send(handshake.not_authorized(self._request))
            self.close(will=False)
            return
        present = hub.attach(self, connect, session)
        self._will = connect.will
        assigned = self.name if not connect.client_id else None
        self.wire.send(handshake.connack(self._request, self.limits, present=present,
                                         assigned=assigned))  # fmt: skip
        logger.info(
            "Client %s connected from %s (MQTT %s).", self.name, self.peer,
            "5.0" if self.v5 else "3.1.1",
        )  # fmt: skip
        if connect.keep_alive:
            self.wire.watch(connect.keep_alive)
        resumed = self.session
        if resumed is not None and (resumed.inflight_out or hub.queues.size(resumed)):
            self._flows.resume()  # what was in flight [MQTT-4.4.0-1], then what waits

    def _on_publish(self, session: Session, publish: Publish) -> None:
        """PUBLISH, both versions: hold it for PUBREL or route it; acknowledge it.

        MQTT 5's acknowledgement says when nobody subscribed (0x10, sections 3.4.2.1, 3.5.2.1).
        """
        self.hub.counters.received += 1
        qos, packet_id, payload, props = publish.qos, publish.packet_id or 0, publish.payload, None
        topic = publish.topic
        if self.v5:
            assert self._aliases is not None  # noqa: S101 - made at CONNECT for MQTT 5
            topic = self._aliases.topic(publish)
            props = publish.props
            utf8 = props is not None and props.payload_format_indicator == 1
            if utf8 and not v5.is_utf8(payload):
                # MQTT 5 section 3.3.2.3.2: a "UTF-8" payload that is not: refused, 0x99.
                if qos == 0:
                    raise ProtocolViolation("payload marked UTF-8 is not", "MQTT-3.3.2-4",
                                            code=rc.PAYLOAD_FORMAT_INVALID)  # fmt: skip
                kind = PUBACK if qos == 1 else PUBREC
                self.wire.send(self.replies.ack(kind, packet_id, rc.PAYLOAD_FORMAT_INVALID))
                return
        if not self.hub.writable(session, topic):
            self._denied(topic, qos, packet_id)
            return
        if qos == 2:
            # Kept until PUBREL, then delivered once however often it is resent [MQTT-4.3.3-2].
            self._flows.hold(Incoming(packet_id, topic, 2, payload, publish.retain, props))
            matched = not self.v5 or self.hub.state.has_subscribers(topic)
            self.wire.send(self.replies.ack(PUBREC, packet_id, _matched(matched)))
            return
        # The packet as received is what a QoS 0 subscriber of the same version gets.
        raw, raw5 = (None, publish.raw) if self.v5 else (publish.raw, None)
        matched = self._route(session, topic, payload, qos, retain=publish.retain, frame=raw,
                              props=props, frame5=raw5)  # fmt: skip
        if qos == 1:
            # The message is ours once PUBACK is sent [MQTT-4.3.2-2]; it is already on its way.
            self.wire.send(self.replies.ack(PUBACK, packet_id, _matched(matched)))

    def _denied(self, topic: str, qos: int, packet_id: int) -> None:
        """Drop a PUBLISH the ACL does not allow; tell MQTT 5 so (0x87), but not 3.1.1.

        As mosquitto: a 3.1.1 client is acknowledged as usual (it has no way to hear no), and
        the message dropped. Logged once per client and topic, and counted.
        """
        self.hub.counters.denied += 1
        denied = self._denied_topics
        if denied is None:
            denied = self._denied_topics = set()
        if topic not in denied:
            denied.add(topic)
            logger.warning("Client %s may not publish to %s: dropped (%d denied so far).",
                           self.name, topic, self.hub.counters.denied)  # fmt: skip
        if qos:
            kind = PUBACK if qos == 1 else PUBREC
            self.wire.send(self.replies.ack(kind, packet_id, rc.NOT_AUTHORIZED))

    def _on_pubrel(self, session: Session, packet_id: int) -> None:
        # After a reconnect the client resends PUBREL for a message stored before: deliver it
        # now, and answer PUBCOMP either way [MQTT-4.3.3-2, MQTT-4.4.0-1].
        message = self._flows.release(packet_id)
        if message is not None:
            props = getattr(message, "props", None)
            self._route(session, message.topic, bytes(message.data), 2,
                        retain=bool(message.retain), props=props)  # fmt: skip
        reason = rc.SUCCESS if message is not None else rc.PACKET_ID_NOT_FOUND
        self.wire.send(self.replies.ack(PUBCOMP, packet_id, reason))

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
            self.wire.start(self.hub.state.retain(session, topic, payload, qos, props), "retain")
        return matched

    def _subscribe(self, session: Session, packet: Subscribe) -> None:
        """SUBSCRIBE, both versions: subscribe each filter, SUBACK, then retained messages."""
        engine = self.hub.state
        codes: list[int] = []
        fresh: list[bool] = []
        subscription_id = packet.subscription_id
        for want in packet.filters:
            topic_filter = want.topic_filter
            denied = any(topic_matches(topic_filter, deny, dollar=True)
                         for deny in self.limits.deny_subscribe)  # fmt: skip
            if denied or not self.hub.subscribable(session, topic_filter):
                logger.info("Client %s may not subscribe to %s%s.", self.name, topic_filter,
                            "" if denied else " (ACL)")  # fmt: skip
                codes.append(rc.NOT_AUTHORIZED)
                fresh.append(False)
                continue
            options = (
                SubOptions(want.no_local, want.retain_as_published, subscription_id)
                if self.v5 else None
            )  # fmt: skip
            granted, existed = engine.subscribe(session, topic_filter, want.qos, options)
            codes.append(granted)
            fresh.append(not existed)
        self.wire.send(self.replies.suback(packet.packet_id, codes))
        ids = (subscription_id,) if subscription_id else ()
        for want, granted, new in zip(packet.filters, codes, fresh, strict=True):
            for topic, payload, qos, props in self.hub.retained_for(session, want, granted, new):
                self.deliver(topic, payload, qos, retain=True, props=props, ids=ids)

    def _unsubscribe(self, session: Session, packet: Unsubscribe) -> None:
        """UNSUBSCRIBE, both versions; MQTT 5 says per filter whether it was subscribed."""
        engine = self.hub.state
        existed = [engine.unsubscribe(session, topic_filter) for topic_filter in packet.filters]
        codes = [rc.SUCCESS if was else rc.NO_SUBSCRIPTION_EXISTED for was in existed]
        self.wire.send(self.replies.unsuback(packet.packet_id, codes))

    def _on_disconnect(self, session: Session, packet: object) -> None:
        """DISCONNECT: [MQTT-3.1.2-10] a client that says goodbye has its will discarded.

        MQTT 5 may set a new session expiry, and keep the will with reason 0x04.
        """
        with_will = False
        if isinstance(packet, mqtt5.DisconnectPacket):
            expiry = packet.session_expiry_interval
            if expiry is not None:
                if self.expiry == 0 and expiry:
                    raise ProtocolViolation(
                        "session expiry set at DISCONNECT after 0 at CONNECT",
                        "MQTT-3.14.2-2", code=rc.PROTOCOL_ERROR,
                    )  # fmt: skip
                self.expiry = expiry
                session.clean_session = expiry == 0
            with_will = rc.value(packet.reason_code) == rc.DISCONNECT_WITH_WILL_MESSAGE
        self.goodbye = not with_will
        self.how = "it sent DISCONNECT with will (0x04)" if with_will else "it sent DISCONNECT"
        self.close(will=with_will)

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
                send=self.wire.send, encode=self._encode_publish, queue=self.hub.queues,
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
        data = self.replies.publish(
            message.topic, bytes(message.data), message.qos or 0, packet_id,
            retain=bool(message.retain), dup=dup, props=getattr(message, "props", None),
            subscription_ids=list(getattr(message, "subscription_ids", ())),
        )  # fmt: skip
        if self._too_big(data):
            logger.debug("Client %s: a %d-byte PUBLISH is over its maximum.", self.name, len(data))
            return None
        self.hub.counters.sent += 1
        return data

    def send_qos0(self, frame: bytes) -> None:
        """Send an encoded QoS 0 PUBLISH (the wire drops it for a client too far behind)."""
        if not self._too_big(frame):
            self.wire.send_qos0(frame)

    def _too_big(self, data: bytes) -> bool:
        """MQTT 5 [MQTT-3.1.2-25]: never more than the client accepts; dropped as delivered."""
        if not self.v5:
            return False
        most = self._request.max_out
        if most is not None and len(data) > most:
            self.hub.counters.dropped += 1
            return True
        return False

    def flush(self) -> None:
        """Write what was gathered for this client."""
        self.wire.flush()

    # --- ending -----------------------------------------------------------------------------

    def close(self, *, will: bool, reason: int | None = None, why: str | None = None) -> None:
        """End the connection: what is gathered goes out first, then the socket closes.

        An MQTT 5 client is told ``reason`` in a DISCONNECT first, with ``why`` (the line the
        broker logs) as its reason string.
        """
        if reason is not None and self.session is not None and not self.ended:
            goodbye = self.replies.disconnect(reason, why, self._request.max_out)
            if goodbye:  # MQTT 3.1.1 has no DISCONNECT from the server
                self.wire.send(goodbye)
        if not self.ended and not self.how.startswith("it sent"):
            self.how = "closed by the broker"  # why: the line logged just before says it
        self.end(will=will)
        self.wire.close()

    def abort(self) -> None:
        """Close the socket now, dropping anything unsent."""
        self.wire.abort()

    def release(self, gone: Wire) -> None:
        """Let go of the lost connection (after :meth:`end`): they held each other, with flows."""
        self.wire, self.flows = gone, None

    def end(self, *, will: bool) -> None:
        """Leave the hub once: detach the session, publish the will if it is due."""
        if self.ended:
            return
        self.ended = True
        hub = self.hub
        session = self.session
        what = self._will if will and not hub.stopping else None  # the will now due, if any
        request = self._request if what is not None else None
        delay = min(request.will_delay, self.expiry or 0) if request is not None else 0
        how = self.how
        if what is not None:
            how += (f"; will due on {what.topic} in {delay} s" if delay
                    else f"; will published on {what.topic}")  # fmt: skip
        hub.detach(self, how)
        if what is not None and request is not None:
            # [MQTT-3.1.2-8]: lost, silent, or closed for a protocol error.
            hub.publish_will(session, what, request.will_props, delay)


def _matched(matched: bool) -> int:
    """MQTT 5's PUBACK and PUBREC say when no subscriber matched (sections 3.4.2.1, 3.5.2.1)."""
    return rc.SUCCESS if matched else rc.NO_MATCHING_SUBSCRIBERS
