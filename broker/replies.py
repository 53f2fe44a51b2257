"""What the broker sends a client, in the client's version: one encoder per version.

The handlers (:mod:`broker.client`) say what to answer, with MQTT 5's reason codes; the
encoder of the connection's version turns it into bytes. MQTT 3.1.1 has no reason codes on
acknowledgements and no DISCONNECT from the server, so its encoder leaves them out. The MQTT 5
packets are encoded through ``mqtt5``, except the common ones it would only slow down.

Pure: no sockets, no amqtt.
"""

from __future__ import annotations

import struct
import time
from typing import Final

import mqtt5

from broker import reasons as rc
from broker.protocol import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    UNSUBACK,
    encode_ack,
    encode_suback,
    remaining_length,
)
from broker.protocol import encode_publish as encode_publish_311
from broker.records import EMPTY, Props


def encode_publish(
    topic: str, payload: bytes, qos: int, packet_id: int | None, *, retain: bool, dup: bool,
    props: Props | None, subscription_ids: list[int] | None = None,
) -> bytes:  # fmt: skip
    """Encode a PUBLISH for an MQTT 5 client, its properties forwarded (expiry: what is left)."""
    if props is None and not subscription_ids:
        # No properties: the 3.1.1 encoding with an empty property list after the topic (and
        # the packet id), without a trip through the codec.
        raw_topic = topic.encode()
        head = struct.pack("!H", len(raw_topic)) + raw_topic
        if qos:
            head += struct.pack("!H", packet_id or 0)
        first = 0x30 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
        length = remaining_length(len(head) + 1 + len(payload))
        return bytes((first,)) + length + head + b"\x00" + payload
    p = props or EMPTY
    return mqtt5.PublishPacket(
        topic, payload, qos=mqtt5.QoS(qos), retain=retain, packet_id=packet_id if qos else None,
        duplicate=dup, payload_format_indicator=p.payload_format_indicator,
        message_expiry_interval=p.remaining(time.monotonic()), content_type=p.content_type,
        response_topic=p.response_topic, correlation_data=p.correlation_data,
        user_properties=list(p.user_properties), subscription_ids=subscription_ids or None,
    ).write()  # fmt: skip


def disconnect(reason: int, text: str | None = None, max_size: int | None = None) -> bytes:
    """Encode a DISCONNECT from the server with ``reason``, and ``text`` as its reason string.

    The reason string is left out where it would make the packet larger than the client
    accepts (``max_size``) [MQTT-3.14.2-3]. A DISCONNECT may carry one even when the client
    asked for no problem information [MQTT-3.1.2-29].
    """
    code = mqtt5.DisconnectReasonCode(reason)
    if text:
        data = mqtt5.DisconnectPacket(reason_code=code, reason_str=text).write()
        if max_size is None or len(data) <= max_size:
            return data
    return mqtt5.DisconnectPacket(reason_code=code).write()


_ACKS: Final = {
    PUBACK: (mqtt5.PubAckPacket, mqtt5.PubAckReasonCode),
    PUBREC: (mqtt5.PubRecPacket, mqtt5.PubRecReasonCode),
    PUBCOMP: (mqtt5.PubCompPacket, mqtt5.PubCompReasonCode),
}


def ack(kind: int, packet_id: int, reason: int) -> bytes:
    """Encode an MQTT 5 PUBACK, PUBREC or PUBCOMP with a reason code (section 3.4.2.1)."""
    packet, codes = _ACKS[kind]
    data: bytes = packet(packet_id, reason_code=codes(reason)).write()
    return data


def suback(packet_id: int, codes: list[int]) -> bytes:
    """Encode an MQTT 5 SUBACK: a granted QoS or a reason code per filter."""
    return mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(c) for c in codes]).write()


def unsuback(packet_id: int, codes: list[int]) -> bytes:
    """Encode an MQTT 5 UNSUBACK: a reason code per filter."""
    return mqtt5.UnsubAckPacket(packet_id, [mqtt5.UnsubAckReasonCode(c) for c in codes]).write()


class Replies:
    """MQTT 3.1.1's replies: the reason codes MQTT 5 would carry are left out."""

    @staticmethod
    def ack(kind: int, packet_id: int, reason: int = rc.SUCCESS) -> bytes:  # noqa: ARG004
        """PUBACK, PUBREC, PUBREL or PUBCOMP (3.1.1 has no reason code)."""
        return encode_ack(kind, packet_id)

    @staticmethod
    def suback(packet_id: int, codes: list[int]) -> bytes:
        """SUBACK: a granted QoS per filter, 0x80 for any refusal."""
        return encode_suback(packet_id, [c if c < 0x80 else rc.SUBACK_FAILURE_311 for c in codes])

    @staticmethod
    def unsuback(packet_id: int, codes: list[int]) -> bytes:  # noqa: ARG004
        """UNSUBACK (3.1.1 has no reason codes)."""
        return encode_ack(UNSUBACK, packet_id)

    @staticmethod
    def publish(
        topic: str, payload: bytes, qos: int, packet_id: int | None, *, retain: bool, dup: bool,
        props: Props | None, subscription_ids: list[int] | None = None,  # noqa: ARG004
    ) -> bytes:  # fmt: skip
        """PUBLISH (3.1.1 has no properties)."""
        return encode_publish_311(topic, payload, qos, packet_id or 0, retain=retain, dup=dup)

    @staticmethod
    def disconnect(reason: int, text: str | None = None, max_size: int | None = None) -> bytes:  # noqa: ARG004
        """Nothing: a 3.1.1 server closes the connection without a word."""
        return b""


class Replies5(Replies):
    """MQTT 5's replies, with their reason codes."""

    @staticmethod
    def ack(kind: int, packet_id: int, reason: int = rc.SUCCESS) -> bytes:
        """PUBACK, PUBREC, PUBREL or PUBCOMP: the two-byte form for success (section 3.4.2.1)."""
        return encode_ack(kind, packet_id) if reason == rc.SUCCESS else ack(kind, packet_id, reason)

    suback = staticmethod(suback)
    unsuback = staticmethod(unsuback)
    publish = staticmethod(encode_publish)
    disconnect = staticmethod(disconnect)
