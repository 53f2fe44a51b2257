"""The MQTT 3.1.1 codec: whole frames in, checked packets out; packets in, bytes out.

Pure: no sockets, no clock, no amqtt. Every check is a statement of the specification; a
violation raises :class:`ProtocolViolation`, and the connection closes, as the specification
requires of a server. :mod:`broker.framing` cuts the byte stream into frames first.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from typing import Final

from broker.reasons import MALFORMED_PACKET, TOPIC_NAME_INVALID
from broker.records import Connect, Publish, Subscribe, Unsubscribe, Wanted, Will

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
AUTH: Final = 15
"""MQTT 5 only; reserved in 3.1.1."""

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

    def __init__(self, reason: str, statement: str, code: int = MALFORMED_PACKET) -> None:
        """Record why, and which statement (``MQTT-x.y.z-n``) was broken.

        ``code`` is the reason an MQTT 5 client is told in DISCONNECT (0x81: malformed packet).
        """
        super().__init__(f"{reason} [{statement}]")
        self.reason = reason
        self.statement = statement
        self.code = code


# Frame is made for every packet: a plain slotted dataclass, as records.Publish is.
@dataclass(slots=True)
class Frame:
    """One whole packet as read off the wire."""

    packet_type: int
    flags: int
    raw: bytes
    """The whole packet, fixed header included."""
    offset: int
    """Where the body starts in ``raw`` (after the fixed header)."""

    @property
    def body(self) -> bytes:
        """The packet without its fixed header."""
        return self.raw[self.offset :]

    @property
    def name(self) -> str:
        """The packet type's name."""
        return NAMES[self.packet_type]


def read_string(body: bytes, offset: int, what: str) -> tuple[str, int]:
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
    check_text(text, what)
    return text, end


def check_text(text: str, what: str) -> None:
    """Refuse what valid UTF-8 may still hold: U+0000, control and non-characters (1.5.3)."""
    if text.isascii() and text.isprintable():
        return  # U+0020-U+007E only, as most names are: 40 ns, where the search takes 420
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        char = ord(bad.group())
        if char == 0:
            raise ProtocolViolation(f"{what}: contains U+0000", "MQTT-1.5.3-2")
        kind = "a control character" if char <= 0x9F else "a non-character"
        raise ProtocolViolation(f"{what}: contains {kind}, U+{char:04X}", "MQTT-1.5.3")


# Section 1.5.3: U+0000 must not appear; control characters (U+0001-U+001F, U+007F-U+009F) and
# non-characters (U+FDD0-U+FDEF, U+nFFFE and U+nFFFF) may be refused, and are, as mosquitto
# does: no sane client sends them, and they end up in logs and terminals.
_FORBIDDEN: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)


def _packet_id(body: bytes, offset: int, what: str) -> int:
    if offset + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated packet identifier", "MQTT-2.3.1")
    (packet_id,) = struct.unpack_from("!H", body, offset)
    if packet_id == 0:
        raise ProtocolViolation(f"{what}: packet identifier 0", "MQTT-2.3.1-1")
    return int(packet_id)


def check(frame: Frame, *, connected: bool) -> Publish | Subscribe | Unsubscribe | None:
    """Raise ProtocolViolation if ``frame`` breaks the specification for a client packet.

    A PUBLISH, SUBSCRIBE or UNSUBSCRIBE comes back decoded, so that nothing parses it twice.
    """
    kind, flags = frame.packet_type, frame.flags
    if kind == PUBLISH and connected:  # the hot path first
        return check_publish_at(flags, frame.raw, frame.offset)
    body = frame.body
    if kind in (0, 15):
        raise ProtocolViolation(f"reserved packet type {kind}", "MQTT-2.2.1")
    if kind in SERVER_TO_CLIENT:
        raise ProtocolViolation(f"{frame.name} may only be sent by a server", "MQTT-2.2.1")
    if kind == CONNECT and connected:
        raise ProtocolViolation("second CONNECT", "MQTT-3.1.0-2")
    if kind != CONNECT and not connected:
        raise ProtocolViolation(f"first packet is {frame.name}, not CONNECT", "MQTT-3.1.0-1")
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
        return decode_subscribe(body)
    elif kind == UNSUBSCRIBE:
        return decode_unsubscribe(body)
    return None


@functools.lru_cache(maxsize=4096)
def decoded_topic_name(encoded: bytes) -> str:
    """Decode and check a topic name (length prefix included); remembered, as topics repeat."""
    topic, _ = read_string(encoded, 0, "PUBLISH topic")
    return topic_name(topic)


def topic_name(topic: str) -> str:
    """Check a decoded topic name: not empty, no wildcards (sections 4.7.1 and 4.7.3)."""
    if not topic:
        raise ProtocolViolation("PUBLISH with an empty topic", "MQTT-4.7.3-1")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(
            f"PUBLISH topic {topic!r} has a wildcard", "MQTT-3.3.2-2", code=TOPIC_NAME_INVALID
        )
    return topic


def check_publish(frame: Frame) -> Publish:
    """Check and decode a PUBLISH from a connected client (the hot path's check)."""
    return check_publish_at(frame.flags, frame.raw, frame.offset)


def check_publish_at(flags: int, raw: bytes, start: int, *, properties: bool = False) -> Publish:
    """Check and decode a PUBLISH; ``properties``: MQTT 5's, an empty list (one zero byte)."""
    qos = (flags >> 1) & 0b11
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3", "MQTT-3.3.1-4")
    if qos == 0 and flags & 0b1000:
        raise ProtocolViolation("PUBLISH with DUP set at QoS 0", "MQTT-3.3.1-2")
    if start + 2 > len(raw):
        raise ProtocolViolation("PUBLISH topic: truncated length", "MQTT-1.5.3")
    offset = start + 2 + (raw[start] << 8 | raw[start + 1])
    if offset > len(raw):
        raise ProtocolViolation("PUBLISH topic: truncated string", "MQTT-1.5.3")
    topic = decoded_topic_name(raw[start:offset])
    packet_id = None
    if qos:
        packet_id = _packet_id(raw, offset, "PUBLISH")
        offset += 2
    if properties:
        offset += 1
    return Publish(topic, raw[offset:], qos, bool(flags & 1), packet_id, None if flags else raw)


def _filters(body: bytes, what: str, *, with_qos: bool) -> list[tuple[str, int]]:
    """Decode a SUBSCRIBE/UNSUBSCRIBE payload: its (topic filter, requested QoS) pairs."""
    offset = 2
    found: list[tuple[str, int]] = []
    while offset < len(body):
        topic_filter, offset = read_string(body, offset, f"{what} topic filter")
        check_filter(topic_filter, what)
        requested = 0
        if with_qos:
            if offset >= len(body):
                raise ProtocolViolation(f"{what} filter without a QoS byte", "MQTT-3.8.3")
            requested = body[offset]
            if requested & 0b11111100 or requested == 3:
                raise ProtocolViolation(
                    f"{what} with requested QoS byte {requested}", "MQTT-3.8.3-4"
                )
            offset += 1
        found.append((topic_filter, requested))
    return found


def check_filter(topic_filter: str, what: str) -> None:
    """Refuse a malformed filter: a malformed packet (section 4.7.1), not a SUBACK 0x80."""
    if not topic_filter:
        raise ProtocolViolation(f"{what} with an empty topic filter", "MQTT-4.7.3-1")
    if "#" in topic_filter and not (
        topic_filter == "#" or (topic_filter.endswith("/#") and topic_filter.count("#") == 1)
    ):
        raise ProtocolViolation(
            f"{what} filter {topic_filter!r}: '#' must be last and alone in its level",
            "MQTT-4.7.1-2",
        )
    if "+" in topic_filter and any(
        "+" in level and level != "+" for level in topic_filter.split("/")
    ):
        raise ProtocolViolation(
            f"{what} filter {topic_filter!r}: '+' must be alone in its level", "MQTT-4.7.1-3"
        )


def decode_subscribe(body: bytes) -> Subscribe:
    """Decode the body of a SUBSCRIBE; raise ProtocolViolation if it is malformed."""
    packet_id = _packet_id(body, 0, "SUBSCRIBE")
    filters = _filters(body, "SUBSCRIBE", with_qos=True)
    if not filters:
        raise ProtocolViolation("SUBSCRIBE with no topic filter", "MQTT-3.8.3-3")
    return Subscribe(packet_id, tuple([Wanted(name, qos) for name, qos in filters]))


def decode_unsubscribe(body: bytes) -> Unsubscribe:
    """Decode the body of an UNSUBSCRIBE; raise ProtocolViolation if it is malformed."""
    packet_id = _packet_id(body, 0, "UNSUBSCRIBE")
    filters = _filters(body, "UNSUBSCRIBE", with_qos=False)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE with no topic filter", "MQTT-3.10.3-2")
    return Unsubscribe(packet_id, tuple(name for name, _ in filters))


def packet_id_of(frame: Frame) -> int:
    """Return the packet id of a checked PUBACK, PUBREC, PUBREL or PUBCOMP (either version)."""
    start = frame.offset
    return frame.raw[start] << 8 | frame.raw[start + 1]


# --- CONNECT ----------------------------------------------------------------------------------


class UnsupportedProtocol(Exception):  # noqa: N818 - named for what the client asked for
    """A CONNECT for a protocol other than MQTT 3.1.1; ``level`` is None for a foreign name."""

    def __init__(self, name: str, level: int | None) -> None:
        """Record the protocol name and level the client asked for."""
        shown = name if level is None else f"{name} level {level}"
        if level == 5:
            shown += " (MQTT 5.0)"
        elif level == 3:
            shown += " (MQTT 3.1)"
        super().__init__(f"unsupported protocol {shown}")
        self.level = level


def decode_connect(frame: Frame) -> Connect:
    """Check and decode a CONNECT (section 3.1).

    Raise UnsupportedProtocol for another protocol name or level (the caller answers the way
    [MQTT-3.1.2-1] and [MQTT-3.1.2-2] say), ProtocolViolation when it is malformed.
    """
    body = frame.body
    if frame.flags:
        raise ProtocolViolation("CONNECT with reserved flags", "MQTT-2.2.2-2")
    name, offset = read_string(body, 0, "protocol name")
    if offset + 4 > len(body):
        raise ProtocolViolation("CONNECT truncated", "MQTT-3.1.2")
    level, flags = body[offset], body[offset + 1]
    if name != "MQTT":
        raise UnsupportedProtocol(repr(name), None)
    if level != 4:
        raise UnsupportedProtocol("MQTT", level)
    if flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag set", "MQTT-3.1.2-3")
    has_will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0b11
    if will_qos == 3:
        raise ProtocolViolation("CONNECT will QoS 3", "MQTT-3.1.2-14")
    if not has_will and (will_qos or flags & 0x20):
        raise ProtocolViolation("will QoS or retain set without a will", "MQTT-3.1.2-13")
    (keep_alive,) = struct.unpack_from("!H", body, offset + 2)
    offset += 4
    client_id, offset = read_string(body, offset, "client identifier")
    will = None
    if has_will:
        topic, offset = read_string(body, offset, "will topic")
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolViolation(f"invalid will topic {topic!r}", "MQTT-3.3.2-2")
        message, offset = read_binary(body, offset, "will message")
        will = Will(topic, message, will_qos, bool(flags & 0x20))
    username, password = _credentials(body, offset, flags)
    return Connect(
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keep_alive=int(keep_alive),
        will=will,
        username=username,
        password=password,
    )


def _credentials(body: bytes, offset: int, flags: int) -> tuple[str | None, str | None]:
    """Decode the user name and password the flags announce; nothing may follow them."""
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolViolation("password flag set without the user name flag", "MQTT-3.1.2-22")
    username = password = None
    if flags & 0x80:
        if offset >= len(body):
            raise ProtocolViolation("user name flag set, but no user name", "MQTT-3.1.2-19")
        username, offset = read_string(body, offset, "user name")
    if flags & 0x40:
        if offset >= len(body):
            raise ProtocolViolation("password flag set, but no password", "MQTT-3.1.2-21")
        raw, offset = read_binary(body, offset, "password")
        password = raw.decode("utf-8", "replace")
    if offset != len(body):
        # What follows the last announced field: a user name or password the flags deny, or junk.
        statement = ("MQTT-3.1.2-18" if not flags & 0x80 else
                     "MQTT-3.1.2-20" if not flags & 0x40 else "MQTT-3.1.3")  # fmt: skip
        raise ProtocolViolation(
            f"CONNECT has {len(body) - offset} bytes after its last announced field", statement
        )
    return username, password


def read_binary(body: bytes, offset: int, what: str) -> tuple[bytes, int]:
    """Read two-byte-length binary data (section 1.5.5)."""
    if offset + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated length", "MQTT-3.1.3")
    (size,) = struct.unpack_from("!H", body, offset)
    end = offset + 2 + size
    if end > len(body):
        raise ProtocolViolation(f"{what}: truncated", "MQTT-3.1.3")
    return body[offset + 2 : end], end


# --- encoding ---------------------------------------------------------------------------------


def remaining_length(length: int) -> bytes:
    """Encode a remaining length, 1 to 4 bytes of 7 bits each (section 2.2.3)."""
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def encode_publish(
    topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, *, retain: bool = False,
    dup: bool = False,
) -> bytes:  # fmt: skip
    """Encode a PUBLISH (section 3.3); a QoS 0 one is built once and written to each subscriber."""
    raw_topic = topic.encode()
    first = PUBLISH << 4 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    if qos:
        head = struct.pack("!H", len(raw_topic)) + raw_topic + struct.pack("!H", packet_id)
    else:
        head = struct.pack("!H", len(raw_topic)) + raw_topic
    return bytes((first,)) + remaining_length(len(head) + len(payload)) + head + payload


def encode_ack(kind: int, packet_id: int) -> bytes:
    """Encode a PUBACK, PUBREC, PUBREL (flags 0010) or PUBCOMP, or an UNSUBACK."""
    flags = 0b0010 if kind == PUBREL else 0
    return struct.pack("!BBH", kind << 4 | flags, 2, packet_id)


def encode_connack(code: int, *, session_present: bool = False) -> bytes:
    """Encode a CONNACK (section 3.2)."""
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, code))


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    """Encode a SUBACK (section 3.9): one return code per filter, in order."""
    body = struct.pack("!H", packet_id) + bytes(codes)
    return bytes((SUBACK << 4,)) + remaining_length(len(body)) + body


PINGRESP_PACKET: Final = bytes((PINGRESP << 4, 0))
CONNACK_UNSUPPORTED_V5: Final = bytes((CONNACK << 4, 3, 0, 0x84, 0))
"""MQTT 5's CONNACK "Unsupported Protocol Version" (0x84), no properties: what a v5 client reads."""
