"""CONNECT for both versions: the first packet read into one request, or a refusal. Pure.

The protocol level in CONNECT chooses the codec once per connection: 4 is ours (3.1.1), 5 goes
through ``mqtt5``. Both become one :class:`Request`: the :class:`~broker.protocol.Connect`
record the rest of the broker reads, with what MQTT 5 adds (receive maximum, session expiry,
maximum packet size, will properties and delay, a server keep alive). A CONNECT refused before
authentication is a :class:`Refusal`: the reply to send, if any, and the reason to log.
Authentication and the session come after, in the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import mqtt5

from broker import protocol, v5
from broker import reasons as rc
from broker.protocol import Frame, UnsupportedProtocol, encode_connack
from broker.records import Connect, Props, Will
from broker.settings import Limits

TOPIC_ALIAS_MAXIMUM = 32
"""Topic aliases an MQTT 5 client may set up per connection."""


@dataclass(slots=True)  # treated as immutable; not frozen, for speed (see broker/records.py)
class Request:
    """A CONNECT the broker can accept, once the client is authenticated."""

    connect: Connect
    v5: bool
    window: int
    """Unacknowledged QoS 1/2 deliveries allowed: --max-inflight, or less (receive maximum)."""
    expiry: int | None = None
    """MQTT 5: the session expiry interval the client asked for (seconds)."""
    max_out: int | None = None
    """MQTT 5: the largest packet the client accepts."""
    will_props: Props | None = None
    will_delay: int = 0
    server_keep_alive: int | None = None
    """MQTT 5: the keep alive the client must use instead of its own, when it asked for none
    or for more than --max-keepalive (section 3.2.2.3.14)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A CONNECT refused before authentication: what to answer (or nothing), and why."""

    reply: bytes | None
    why: str


def read(frame: Frame, limits: Limits, now: float) -> Request | Refusal:
    """Read the first packet of a connection, a CONNECT of either version.

    Raise ProtocolViolation when it is malformed (the connection then closes without CONNACK).
    """
    try:
        connect = protocol.decode_connect(frame)
    except UnsupportedProtocol as exc:
        if exc.level == 5:
            return _read_v5(frame, limits, now)
        reply = None
        if exc.level is not None and exc.level > 5:
            # In the form a newer client can read: MQTT 5's CONNACK, 0x84 (section 3.2.2.2).
            reply = protocol.CONNACK_UNSUPPORTED_V5
        elif exc.level is not None:
            reply = encode_connack(rc.UNACCEPTABLE_PROTOCOL_VERSION_311)  # [MQTT-3.1.2-2]
        return Refusal(reply, f"{exc}; this broker speaks MQTT 3.1.1 and 5.0")
    if not connect.client_id and not connect.clean_session:
        return Refusal(encode_connack(rc.IDENTIFIER_REJECTED_311),
                       "empty client id without clean session [MQTT-3.1.3-8]")  # fmt: skip
    return Request(connect, v5=False, window=limits.max_inflight)


def _read_v5(frame: Frame, limits: Limits, now: float) -> Request | Refusal:
    packet = v5.read(frame)
    assert isinstance(packet, mqtt5.ConnectPacket)  # noqa: S101 - a CONNECT frame
    if packet.authentication_method is not None:
        # Enhanced authentication (AUTH) is not offered [MQTT-4.12.0-1].
        reply = mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD)
        return Refusal(reply.write(), f"authentication method "
                       f"{packet.authentication_method!r} is not offered")  # fmt: skip
    will = packet.will
    keep_alive, cap, server_keep_alive = packet.keep_alive, limits.max_keepalive, None
    if keep_alive == 0 or keep_alive > cap:
        # MQTT 5 section 3.2.2.3.14: the client must use the server keep alive instead.
        keep_alive = server_keep_alive = cap
    password = packet.password
    connect = Connect(
        client_id=packet.client_id,
        clean_session=packet.clean_start,
        keep_alive=keep_alive,
        will=None if will is None else Will(
            will.topic, will.payload or b"", int(will.qos), will.retain
        ),
        username=packet.username,
        password=None if password is None else password.decode("utf-8", "replace"),
        session_expiry=packet.session_expiry_interval,
    )  # fmt: skip
    return Request(
        connect, v5=True, window=min(limits.max_inflight, packet.receive_max),
        expiry=packet.session_expiry_interval, max_out=packet.max_packet_size,
        will_props=None if will is None else v5.props_of(will, now),
        will_delay=0 if will is None else will.will_delay_interval,
        server_keep_alive=server_keep_alive,
    )  # fmt: skip


def connack(request: Request, limits: Limits, *, present: bool, assigned: str | None) -> bytes:
    """Encode the CONNACK accepting ``request``, in its version (MQTT 5: with our limits)."""
    if not request.v5:
        return encode_connack(0, session_present=present)
    return mqtt5.ConnAckPacket(
        session_present=present,
        assigned_client_id=assigned,
        receive_max=min(limits.max_queued, 65535),
        max_packet_size=limits.max_packet_size,
        topic_alias_max=TOPIC_ALIAS_MAXIMUM,
        server_keep_alive=request.server_keep_alive,
    ).write()


def not_authorized(request: Request) -> bytes:
    """Encode the CONNACK refusing a client that failed to authenticate, in its version."""
    if not request.v5:
        return encode_connack(rc.NOT_AUTHORIZED_311)
    code = rc.BAD_USER_NAME_OR_PASSWORD if request.connect.username else rc.NOT_AUTHORIZED
    return mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode(code)).write()
