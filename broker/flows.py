"""The QoS 1 and 2 flows of one client's session, both ways: pure, and tested in memory.

Outbound (broker to client, sections 4.3.2 and 4.3.3): a message goes out when the window
(``--max-inflight``, or the client's receive maximum) has room and nothing waits before it;
otherwise it waits in the session's queue, in order, and so does a QoS 0 message behind waiting
ones [MQTT-4.6.0-6]. PUBACK and PUBCOMP end a delivery and the pump refills the window from the
queue; PUBREC turns a delivery into its PUBREL; an MQTT 5 PUBREC of 0x80 or more ends it there.
On a new connection of the session, what was in flight is sent again first [MQTT-4.4.0-1].

Inbound (client to broker): a QoS 2 message is held until its PUBREL, once however often it is
resent [MQTT-4.3.3-2], and at most ``hold_limit`` of them.

No I/O and no clock of its own: :class:`Flows` is handed ``send`` (bytes out), ``encode`` (a
message's PUBLISH in the connection's version, or None when the client cannot take it), the
session's bounded queue, and ``clock``. The same rules serve MQTT 3.1.1 and 5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from broker import reasons as rc
from broker.protocol import PUBREL, ProtocolViolation, encode_ack

if TYPE_CHECKING:
    from broker.engine import Incoming, Message, Session


class SessionQueue(Protocol):
    """Where messages wait for a session: bounded and counted by the hub, kept by the engine."""

    def put(self, session: Session, message: Message) -> None:
        """Keep a message for ``session`` (or drop and count it, when its queue is full)."""

    def take(self, session: Session) -> Message | None:
        """Take the oldest message waiting for ``session``."""

    def size(self, session: Session) -> int:
        """How many messages wait for ``session``."""

    def drained(self, client_id: str) -> None:
        """Note that the client's queue has run dry."""


Encode = Callable[["Message", "int | None", bool], "bytes | None"]
"""(message, packet id or None for QoS 0, DUP) -> its PUBLISH, or None if the client cannot
take it (larger than its maximum packet size: dropped as if delivered)."""


class Flows:
    """One connection's view of its session's QoS flows."""

    __slots__ = ("_clock", "_encode", "_queue", "_send", "backlog", "hold_limit", "session",
                 "v5", "window")  # fmt: skip

    def __init__(
        self, session: Session, *, window: int, hold_limit: int, send: Callable[[bytes], None],
        encode: Encode, queue: SessionQueue, clock: Callable[[], float], v5: bool = False,
    ) -> None:  # fmt: skip
        """Serve ``session``'s flows over one connection."""
        self.session = session
        self.window = window
        """Unacknowledged QoS 1/2 deliveries allowed at once."""
        self.hold_limit = hold_limit
        """QoS 2 messages from the client that may await their PUBREL at once."""
        self.v5 = v5
        self.backlog = False
        """Whether messages wait in the session's queue (later ones queue behind them)."""
        self._send = send
        self._encode = encode
        self._queue = queue
        self._clock = clock

    # --- outbound -----------------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Send a message now if the window has room and nothing waits, else queue it."""
        session = self.session
        if self.backlog or (message.qos and len(session.inflight_out) >= self.window):
            self._queue.put(session, message)
            self.backlog = True
            return
        self._send_new(message)

    def resume(self) -> None:
        """Send again what the session had in flight, then what waits for it."""
        session = self.session
        for packet_id, message in list(session.inflight_out.items()):
            if message.qos == 2 and message.pubrec_packet is not None:
                self._send(encode_ack(PUBREL, packet_id))  # PUBREC came: PUBREL, not PUBLISH
            else:
                self._publish(message, packet_id, dup=True)
        self.backlog = bool(self._queue.size(session))
        self._pump()

    def acknowledged(self, packet_id: int, qos: int) -> None:
        """PUBACK (``qos`` 1) or PUBCOMP (``qos`` 2): the delivery is done; the window has room.

        An acknowledgement of the wrong kind breaks the flow of section 4.3.2 or 4.3.3.
        """
        message = self.session.inflight_out.get(packet_id)
        if message is None:
            return  # an id not in flight (acknowledged twice, or never ours): nothing to end
        if message.qos != qos:
            ack = "PUBACK" if qos == 1 else "PUBCOMP"
            raise ProtocolViolation(
                f"{ack} for packet id {packet_id}, a QoS {message.qos} delivery",
                "MQTT-4.3.2" if message.qos == 1 else "MQTT-4.3.3", code=rc.PROTOCOL_ERROR,
            )  # fmt: skip
        if qos == 2 and message.pubrec_packet is None:
            raise ProtocolViolation(f"PUBCOMP for packet id {packet_id} before its PUBREC",
                                    "MQTT-4.3.3", code=rc.PROTOCOL_ERROR)  # fmt: skip
        del self.session.inflight_out[packet_id]
        self._pump()

    def received(self, packet_id: int, *, refused: bool = False) -> None:
        """PUBREC: the client has the QoS 2 message; PUBREL goes back.

        ``refused`` (MQTT 5, a reason code of 0x80 or more): the client will not take it; the
        flow ends there, without PUBREL, and the packet id is free again. For an id not in
        flight, PUBREL all the same, as mosquitto answers (MQTT 5 does with 0x92), so that the
        client's flow can end.
        """
        inflight = self.session.inflight_out
        message = inflight.get(packet_id)
        if message is not None and message.qos == 1:
            raise ProtocolViolation(f"PUBREC for packet id {packet_id}, a QoS 1 delivery",
                                    "MQTT-4.3.2", code=rc.PROTOCOL_ERROR)  # fmt: skip
        if refused:
            if message is not None:
                del inflight[packet_id]
                self._pump()
            return
        if message is not None:
            message.pubrec_packet = True  # PUBREL is resent on reconnect, not PUBLISH
        self._send(encode_ack(PUBREL, packet_id))

    def _pump(self) -> None:
        """Fill the window from the session's queue; expired MQTT 5 messages are dropped."""
        session = self.session
        queue = self._queue
        now = self._clock()
        while len(session.inflight_out) < self.window:
            message = queue.take(session)
            if message is None:
                self.backlog = False
                queue.drained(session.client_id)
                return
            props = getattr(message, "props", None)
            if props is not None and props.expired(now):
                continue  # MQTT 5 [MQTT-3.3.2-5]
            self._send_new(message)

    def _send_new(self, message: Message) -> None:
        if not message.qos:
            self._publish(message, None)
            return
        packet_id = self.session.next_packet_id
        message.packet_id = packet_id
        # Kept until acknowledged, and resent on reconnect [MQTT-4.3.2-1, MQTT-4.4.0-1].
        self.session.inflight_out[packet_id] = message
        self._publish(message, packet_id)

    def _publish(self, message: Message, packet_id: int | None, *, dup: bool = False) -> None:
        data = self._encode(message, packet_id, dup)
        if data is None:
            if packet_id is not None:
                self.session.inflight_out.pop(packet_id, None)  # dropped as if delivered
            return
        self._send(data)

    # --- inbound ------------------------------------------------------------------------------

    def hold(self, message: Incoming) -> None:
        """Keep a client's QoS 2 message until its PUBREL, once however often it is resent.

        Each waits in memory; a client that never sends PUBREL must not grow the broker
        without bound (MQTT 5 calls this receive maximum, 0x93).
        """
        held = self.session.inflight_in
        if message.packet_id in held:
            return
        if len(held) >= self.hold_limit:
            raise ProtocolViolation(
                f"more than {self.hold_limit} QoS 2 messages awaiting PUBREL",
                "MQTT-3.3.4-9" if self.v5 else "server limit --max-queued",
                code=rc.RECEIVE_MAXIMUM_EXCEEDED,
            )
        held[message.packet_id] = message

    def release(self, packet_id: int) -> Incoming | None:
        """PUBREL: hand back the held message to route now (None if it was not held)."""
        message: Incoming | None = self.session.inflight_in.pop(packet_id, None)
        return message
