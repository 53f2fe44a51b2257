"""Strict MQTT 3.1.1 framing and validation in front of amqtt's packet decoders.

amqtt 0.12.1 reads a packet straight off the socket and tolerates most protocol violations: it
reads any remaining length it is told, logs and continues after malformed packets, ignores
reserved flag bits, accepts a second CONNECT, and never enforces keepalive. Here every packet is
first read whole (bounded by a maximum size), checked against the statements of the
specification it could break, and only then decoded by amqtt from memory. A violation closes the
connection, as the specification requires of a server.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from amqtt.adapters import ReaderAdapter

# Packet types (MQTT 3.1.1 section 2.2.1).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

NAMES: Final = {
    0: "reserved(0)", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
    6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "reserved(15)",
}  # fmt: skip

SERVER_TO_CLIENT: Final = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})

DEFAULT_MAX_PACKET_SIZE: Final = 2 * 1024 * 1024
"""Largest packet (fixed header included) the broker reads; a bigger one closes the connection."""


class ProtocolViolation(Exception):  # noqa: N818 - a violation is what the spec calls it
    """A client broke a statement of the MQTT 3.1.1 specification; the server closes it."""

    def __init__(self, reason: str, statement: str) -> None:
        """Record why, and which normative statement (``MQTT-x.y.z-n``) was broken."""
        super().__init__(f"{reason} [{statement}]")
        self.reason = reason
        self.statement = statement


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole packet as read off the wire."""

    packet_type: int
    flags: int
    body: bytes
    raw: bytes
    """The fixed header and body, for amqtt's decoders."""

    @property
    def name(self) -> str:
        """The packet type's name."""
        return NAMES[self.packet_type]


async def read_frame(reader: ReaderAdapter, max_size: int) -> Frame:
    """Read one packet; raise EOFError at a clean end of stream, ProtocolViolation on bad framing.

    The remaining length is checked against ``max_size`` before the body is read, so a client
    that declares 256 MB costs nothing.
    """
    header = await reader.read(2)  # every packet has at least a type byte and a length byte
    if len(header) < 2:
        raise EOFError
    first = header[:1]
    length = header[1] & 0x7F
    if header[1] & 0x80:
        header = bytearray(header)
        multiplier = 128
        for _ in range(3):
            byte = await reader.read(1)
            if not byte:
                raise EOFError
            header += byte
            length += (byte[0] & 0x7F) * multiplier
            if not byte[0] & 0x80:
                break
            multiplier *= 128
        else:
            raise ProtocolViolation("remaining length longer than 4 bytes", "MQTT-2.2.3")
    if len(header) + length > max_size:
        raise ProtocolViolation(
            f"packet of {len(header) + length} bytes exceeds the {max_size}-byte maximum",
            "MQTT-1.5.4 / server limit",
        )
    body = await reader.read(length) if length else b""
    if len(body) != length:
        raise EOFError
    return Frame(first[0] >> 4, first[0] & 0x0F, body, bytes(header) + body)


def frame_complete(buffer: bytes | bytearray) -> bool:
    """Whether ``buffer`` starts with a whole packet, so reading it would not wait."""
    length, multiplier = 0, 1
    for i in range(1, min(len(buffer), 5)):
        byte = buffer[i]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return len(buffer) >= i + 1 + length
        multiplier *= 128
    return False  # not even a whole fixed header (or a bad one, which read_frame reports)


def _string(body: bytes, offset: int, what: str) -> tuple[str, int]:
    """Decode a UTF-8 string at ``offset``; enforce [MQTT-1.5.3-1] and [MQTT-1.5.3-2]."""
    if offset + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated length", "MQTT-1.5.3")
    (size,) = struct.unpack_from("!H", body, offset)
    end = offset + 2 + size
    if end > len(body):
        raise ProtocolViolation(f"{what}: truncated string", "MQTT-1.5.3")
    try:
        text = body[offset + 2 : end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what}: invalid UTF-8", "MQTT-1.5.3-1") from None
    if "\x00" in text:
        raise ProtocolViolation(f"{what}: contains U+0000", "MQTT-1.5.3-2")
    return text, end


def _packet_id(body: bytes, offset: int, what: str) -> int:
    if offset + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated packet identifier", "MQTT-2.3.1")
    (packet_id,) = struct.unpack_from("!H", body, offset)
    if packet_id == 0:
        raise ProtocolViolation(f"{what}: packet identifier 0", "MQTT-2.3.1-1")
    return int(packet_id)


def check(frame: Frame, *, connected: bool) -> Publish | None:
    """Raise ProtocolViolation if ``frame`` breaks the specification for a client packet.

    A PUBLISH comes back decoded, so that the hot path needs no second parse.
    """
    kind, flags, body = frame.packet_type, frame.flags, frame.body
    if kind in (0, 15):
        raise ProtocolViolation(f"reserved packet type {kind}", "MQTT-2.2.1")
    if kind in SERVER_TO_CLIENT:
        raise ProtocolViolation(f"{frame.name} may only be sent by a server", "MQTT-2.2.1")
    if kind == CONNECT and connected:
        raise ProtocolViolation("second CONNECT", "MQTT-3.1.0-2")
    if kind != CONNECT and not connected:
        raise ProtocolViolation(f"first packet is {frame.name}, not CONNECT", "MQTT-3.1.0-1")
    if kind == PUBLISH:
        return _check_publish(flags, body)
    expected = 0b0010 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
    if flags != expected:
        statement = {PUBREL: "MQTT-3.6.1-1", SUBSCRIBE: "MQTT-3.8.1-1",
                     UNSUBSCRIBE: "MQTT-3.10.1-1"}.get(kind, "MQTT-2.2.2-2")  # fmt: skip
        raise ProtocolViolation(f"{frame.name} with reserved flags {flags:04b}", statement)
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if len(body) != 2:
            raise ProtocolViolation(f"{frame.name} remaining length {len(body)}, not 2", "MQTT-2.2")
        _packet_id(body, 0, frame.name)
    elif kind in (PINGREQ, DISCONNECT) and body:
        raise ProtocolViolation(f"{frame.name} with a body", "MQTT-2.2")
    elif kind == SUBSCRIBE:
        _check_subscribe(body)
    elif kind == UNSUBSCRIBE:
        _check_unsubscribe(body)
    return None


@dataclass(frozen=True, slots=True)
class Publish:
    """A checked PUBLISH, decoded without amqtt (the hot path)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None


def _check_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0b11
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3", "MQTT-3.3.1-4")
    if qos == 0 and flags & 0b1000:
        raise ProtocolViolation("PUBLISH with DUP set at QoS 0", "MQTT-3.3.1-2")
    topic, offset = _string(body, 0, "PUBLISH topic")
    if not topic:
        raise ProtocolViolation("PUBLISH with an empty topic", "MQTT-4.7.3-1")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(f"PUBLISH topic {topic!r} has a wildcard", "MQTT-3.3.2-2")
    packet_id = None
    if qos:
        packet_id = _packet_id(body, offset, "PUBLISH")
        offset += 2
    return Publish(topic, body[offset:], qos, bool(flags & 1), packet_id)


def _filters(body: bytes, what: str, *, with_qos: bool) -> int:
    """Walk a SUBSCRIBE/UNSUBSCRIBE payload; return how many topic filters it holds."""
    offset = 2
    count = 0
    while offset < len(body):
        topic_filter, offset = _string(body, offset, f"{what} topic filter")
        if not topic_filter:
            raise ProtocolViolation(f"{what} with an empty topic filter", "MQTT-4.7.3-1")
        if with_qos:
            if offset >= len(body):
                raise ProtocolViolation(f"{what} filter without a QoS byte", "MQTT-3.8.3")
            requested = body[offset]
            if requested & 0b11111100 or requested == 3:
                raise ProtocolViolation(
                    f"{what} with requested QoS byte {requested}", "MQTT-3.8.3-4"
                )
            offset += 1
        count += 1
    return count


def _check_subscribe(body: bytes) -> None:
    _packet_id(body, 0, "SUBSCRIBE")
    if _filters(body, "SUBSCRIBE", with_qos=True) == 0:
        raise ProtocolViolation("SUBSCRIBE with no topic filter", "MQTT-3.8.3-3")


def _check_unsubscribe(body: bytes) -> None:
    _packet_id(body, 0, "UNSUBSCRIBE")
    if _filters(body, "UNSUBSCRIBE", with_qos=False) == 0:
        raise ProtocolViolation("UNSUBSCRIBE with no topic filter", "MQTT-3.10.3-2")


def check_connect(frame: Frame) -> None:
    """Check the parts of CONNECT amqtt leaves unchecked: reserved flag, will QoS, strings."""
    body = frame.body
    if frame.flags:
        raise ProtocolViolation("CONNECT with reserved flags", "MQTT-2.2.2-2")
    name, offset = _string(body, 0, "protocol name")
    if offset + 4 > len(body):
        raise ProtocolViolation("CONNECT truncated", "MQTT-3.1.2")
    level, connect_flags = body[offset], body[offset + 1]
    if name != "MQTT" or level != 4:
        return  # amqtt answers these with CONNACK 0x01, as [MQTT-3.1.2-2] asks
    if connect_flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag set", "MQTT-3.1.2-3")
    will = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 0b11
    if will_qos == 3:
        raise ProtocolViolation("CONNECT will QoS 3", "MQTT-3.1.2-14")
    if not will and (will_qos or connect_flags & 0x20):
        raise ProtocolViolation("will QoS or retain set without a will", "MQTT-3.1.2-13")
    offset += 4
    _, offset = _string(body, offset, "client identifier")
    if will:
        topic, offset = _string(body, offset, "will topic")
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolViolation(f"invalid will topic {topic!r}", "MQTT-3.3.2-2")


def remaining_length(length: int) -> bytes:
    """Encode a remaining length, 1 to 4 bytes of 7 bits each (section 2.2.3)."""
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def encode_publish_qos0(topic: str, payload: bytes) -> bytes:
    """Encode a QoS 0 PUBLISH with RETAIN 0: built once per message, written to each subscriber."""
    raw_topic = topic.encode()
    length = remaining_length(2 + len(raw_topic) + len(payload))
    return b"\x30" + length + struct.pack("!H", len(raw_topic)) + raw_topic + payload


def encode_publish_qos1(topic: str, payload: bytes, packet_id: int, *, retain: bool) -> bytes:
    """Encode a first-time (DUP 0) QoS 1 PUBLISH (section 3.3)."""
    raw_topic = topic.encode()
    length = remaining_length(4 + len(raw_topic) + len(payload))
    first = b"\x33" if retain else b"\x32"
    return (
        first + length + struct.pack("!H", len(raw_topic)) + raw_topic
        + struct.pack("!H", packet_id) + payload
    )  # fmt: skip


def encode_puback(packet_id: int) -> bytes:
    """Encode a PUBACK (section 3.4)."""
    return struct.pack("!BBH", PUBACK << 4, 2, packet_id)
