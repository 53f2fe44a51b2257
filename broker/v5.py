"""MQTT 5.0 packets: the ``mqtt5`` codec, with the checks it leaves to us done first.

``mqtt5`` (a sans-I/O codec in Rust, by aiomqtt's author) decodes and encodes every MQTT 5
packet. It does not check the UTF-8 strings it reads: an invalid one makes ``mqtt5.read`` print
a traceback and raise a ``PanicException`` (a BaseException). So before a frame reaches it, we
walk the frame's structure and check every string, with the same rules as our 3.1.1 codec
(section 1.5.4 of MQTT 5.0 is 1.5.3 of 3.1.1): invalid UTF-8, U+0000, control characters and
non-characters are a malformed packet. Topic names and filters are checked as in 3.1.1 too.

Pure: bytes in, packets or ProtocolViolation out.
"""

from __future__ import annotations

from typing import Final, cast

import mqtt5

from broker.protocol import (
    AUTH,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Frame,
    ProtocolViolation,
    check_filter,
    check_publish_at,
    check_text,
    decoded_topic_name,
    read_binary,
    read_string,
    topic_name,
)
from broker.reasons import PROTOCOL_ERROR, TOPIC_ALIAS_INVALID
from broker.records import Props, Publish, Subscribe, Unsubscribe, Wanted

Packet = (
    mqtt5.ConnectPacket | mqtt5.PublishPacket | mqtt5.PubAckPacket | mqtt5.PubRecPacket
    | mqtt5.PubRelPacket | mqtt5.PubCompPacket | mqtt5.SubscribePacket
    | mqtt5.UnsubscribePacket | mqtt5.PingReqPacket | mqtt5.DisconnectPacket | mqtt5.AuthPacket
)  # fmt: skip

# Property identifiers by type (MQTT 5.0 section 2.2.2.2).
_BYTE: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_TWO: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_FOUR: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT: Final = frozenset({0x0B})
_STRING: Final = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BINARY: Final = frozenset({0x09, 0x16})
_PAIR: Final = 0x26

CLIENT_TO_SERVER: Final = frozenset(
    {CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
     DISCONNECT, AUTH}
)  # fmt: skip


def _varint(body: bytes, offset: int, what: str) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        if offset >= len(body):
            raise ProtocolViolation(f"{what}: truncated variable byte integer", "MQTT-1.5.5")
        byte = body[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
    raise ProtocolViolation(f"{what}: variable byte integer longer than 4 bytes", "MQTT-1.5.5")


def _properties(body: bytes, offset: int, what: str) -> int:
    """Check a property list's strings; return the offset after it.

    Every property must end inside the list: ``mqtt5`` would read a string that runs past it
    into the payload, unchecked.
    """
    length, offset = _varint(body, offset, f"{what} properties")
    end = offset + length
    if end > len(body):
        raise ProtocolViolation(f"{what}: properties longer than the packet", "MQTT-2.2.2")
    while offset < end:
        ident = body[offset]
        offset += 1
        if ident in _STRING:
            _, offset = read_string(body, offset, f"{what} property 0x{ident:02X}")
        elif ident == _PAIR:
            _, offset = read_string(body, offset, f"{what} user property name")
            _, offset = read_string(body, offset, f"{what} user property value")
        elif ident in _BINARY:
            _, offset = read_binary(body, offset, f"{what} property 0x{ident:02X}")
        elif ident in _BYTE:
            offset += 1
        elif ident in _TWO:
            offset += 2
        elif ident in _FOUR:
            offset += 4
        elif ident in _VARINT:
            _, offset = _varint(body, offset, f"{what} subscription identifier")
        else:
            raise ProtocolViolation(f"{what}: unknown property 0x{ident:02X}", "MQTT-2.2.2-2")
        if offset > end:
            raise ProtocolViolation(f"{what}: truncated property 0x{ident:02X}", "MQTT-2.2.2")
    return end


def _check_strings(frame: Frame) -> None:
    """Walk the packet and check every string and topic in it, before ``mqtt5`` reads it."""
    kind, body = frame.packet_type, frame.body
    name = frame.name
    if kind == CONNECT:
        _, offset = read_string(body, 0, "protocol name")
        flags = body[offset + 1] if offset + 1 < len(body) else 0
        offset = _properties(body, offset + 4, name)
        _, offset = read_string(body, offset, "client identifier")
        if flags & 0x04:
            offset = _properties(body, offset, "will")
            topic, offset = read_string(body, offset, "will topic")
            topic_name(topic)
            _, offset = read_binary(body, offset, "will payload")
        if flags & 0x80:
            _, offset = read_string(body, offset, "user name")
    elif kind == PUBLISH:
        _check_publish_frame(frame)
    elif kind in (SUBSCRIBE, UNSUBSCRIBE):
        offset = _properties(body, 2, name)
        while offset < len(body):
            topic_filter, offset = read_string(body, offset, f"{name} topic filter")
            what = name
            if topic_filter.startswith("$share/"):  # $share/GROUP/filter
                what = f"{name} {topic_filter!r}"  # "$share/g": the filter is its empty part
                topic_filter = topic_filter.removeprefix("$share/").partition("/")[2]
            check_filter(topic_filter, what)
            offset += 1 if kind == SUBSCRIBE else 0
    elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP) and len(body) > 3:
        _properties(body, 3, name)
    elif kind in (DISCONNECT, AUTH) and len(body) > 1:
        _properties(body, 1, name)


def _check_publish_frame(frame: Frame) -> None:
    body = frame.body
    if len(body) < 2:
        raise ProtocolViolation("PUBLISH topic: truncated length", "MQTT-1.5.3")
    offset = 2 + (body[0] << 8 | body[1])
    if offset > 2:  # not empty: an empty topic comes with a topic alias
        decoded_topic_name(body[:offset])  # checked once per distinct topic
    if frame.flags & 0b0110:
        offset += 2
    # The hot path: a property list of ASCII bytes only holds no invalid UTF-8, so only its
    # lengths are walked (a string must not run past the list into the payload, where the
    # codec would read it unchecked and panic); what is left to check is a control character
    # in one of its strings, done on the decoded packet (:func:`_check_publish_strings`).
    if offset < len(body) and body[offset] < 0x80:
        end = offset + 1 + body[offset]
        if end <= len(body) and body[offset + 1 : end].isascii():
            _property_lengths(body, offset + 1, end)
            return
    _properties(body, offset, "PUBLISH")


_SIZE: Final = {
    **dict.fromkeys(_BYTE, 1),
    **dict.fromkeys(_TWO, 2),
    **dict.fromkeys(_FOUR, 4),
    **dict.fromkeys(_STRING | _BINARY, 0),
    _PAIR: -1,
    **dict.fromkeys(_VARINT, -2),
}
"""Property identifier -> its size: fixed bytes, 0 one length-prefixed field, -1 two (a user
property), -2 a variable byte integer."""


def _property_lengths(body: bytes, offset: int, end: int) -> None:
    """Check that every property of an ASCII list ends inside it, reading only lengths.

    The hot path of MQTT 5 PUBLISH properties (our pings carry three): ASCII strings cannot
    be invalid UTF-8, but one whose length runs past the list would be read by ``mqtt5`` from
    the payload, unchecked.
    """
    size_of = _SIZE
    while offset < end:
        ident = body[offset]
        size = size_of.get(ident)
        offset += 1
        if size is None:
            raise ProtocolViolation(f"PUBLISH: unknown property 0x{ident:02X}", "MQTT-2.2.2-2")
        if size > 0:
            offset += size
        elif size == -2:
            _, offset = _varint(body, offset, "PUBLISH subscription identifier")
        else:
            for _ in range(2 if size == -1 else 1):
                if offset + 2 > end:
                    offset = end + 1
                    break
                offset += 2 + (body[offset] << 8 | body[offset + 1])
        if offset > end:
            raise ProtocolViolation(f"PUBLISH: truncated property 0x{ident:02X}", "MQTT-2.2.2")


def plain_publish(frame: Frame) -> Publish | None:
    """Read a PUBLISH without properties the way our 3.1.1 codec reads one; else None.

    Such a PUBLISH is the 3.1.1 one with a zero where the property length goes: the same
    checks apply, topic names included, and nothing is left for ``mqtt5`` to decode. Most
    telemetry looks like this. Anything else (properties, a topic alias, a malformed packet)
    returns None, for :func:`read`. ``raw`` is set when the packet, as received, is what an
    MQTT 5 QoS 0 subscriber gets (QoS 0, RETAIN 0).
    """
    raw, start, flags = frame.raw, frame.offset, frame.flags
    if start + 2 > len(raw):
        return None
    end = start + 2 + (raw[start] << 8 | raw[start + 1])
    qos = (flags >> 1) & 0b11
    at = end + 2 if qos else end  # the property length
    if end == start + 2 or at >= len(raw) or raw[at] != 0 or qos == 3:
        return None
    return check_publish_at(flags, raw, start, properties=True)


def read(frame: Frame) -> Packet:
    """Check and decode one whole MQTT 5 frame from a client."""
    if frame.packet_type not in CLIENT_TO_SERVER:
        raise ProtocolViolation(f"{frame.name} may only be sent by a server", "MQTT-2.1.2")
    _check_strings(frame)
    try:
        packet, used = mqtt5.read(memoryview(frame.raw))
    except (IndexError, ValueError) as exc:  # a whole frame: too short is malformed too
        raise ProtocolViolation(f"malformed {frame.name}: {exc}", "MQTT-1.3 (v5)") from None
    except BaseException as exc:  # mqtt5 panics on what it cannot convert
        if type(exc).__name__ != "PanicException":
            raise
        raise ProtocolViolation(f"malformed {frame.name}", "MQTT-1.3 (v5)") from None
    if used != len(frame.raw):
        raise ProtocolViolation(f"{frame.name} has bytes after its end", "MQTT-1.3 (v5)")
    if isinstance(packet, mqtt5.PublishPacket):
        _check_publish_strings(packet)
    return cast("Packet", packet)


def read_publish(frame: Frame, now: float) -> Publish:
    """Check and decode an MQTT 5 PUBLISH into the record both versions share.

    Without properties it is read as 3.1.1 reads it (:func:`plain_publish`); ``raw`` is kept
    when the packet, as received, is what an MQTT 5 QoS 0 subscriber gets. Its message expiry
    too: it is routed in the same callback, so the time left, rounded up [MQTT-3.3.2-6], is
    still the interval it came with.
    """
    plain = plain_publish(frame)
    if plain is not None:
        return plain
    packet = cast("mqtt5.PublishPacket", read(frame))
    qos, alias, retain = int(packet.qos), packet.topic_alias, packet.retain
    same = frame.raw if qos == 0 and not retain and alias is None else None
    return Publish(packet.topic, packet.payload, qos, retain, packet.packet_id if qos else None,
                   same, props_of(packet, now), alias)  # fmt: skip


def check(frame: Frame) -> Packet | Subscribe | Unsubscribe:
    """Check and decode a client's MQTT 5 packet other than PUBLISH.

    A SUBSCRIBE or UNSUBSCRIBE comes back as the record both versions share.
    """
    packet = read(frame)
    if isinstance(packet, mqtt5.SubscribePacket):
        # Checked whole before any filter is subscribed: a protocol error subscribes none.
        for topic_filter in packet.topic_filters:
            _check_shared(topic_filter)
        wanted = tuple(
            Wanted(f.pattern, int(f.max_qos), f.no_local, f.retain_as_published,
                   int(f.retain_handling)) for f in packet.topic_filters
        )  # fmt: skip
        return Subscribe(packet.packet_id, wanted, packet.subscription_id)
    if isinstance(packet, mqtt5.UnsubscribePacket):
        return Unsubscribe(packet.packet_id, tuple(packet.patterns))
    return packet


def _check_shared(wanted: mqtt5.TopicFilter) -> None:
    """Refuse an invalid shared subscription: a protocol error (0x82), as mosquitto answers.

    No Local set on one [MQTT-3.8.3-4], or no share name (section 4.8.2).
    """
    pattern = wanted.pattern
    if not pattern.startswith("$share/"):
        return
    if wanted.no_local:
        raise ProtocolViolation(f"shared subscription {pattern!r} with No Local set",
                                "MQTT-3.8.3-4", code=PROTOCOL_ERROR)  # fmt: skip
    if pattern.count("/") < 2 or not pattern.split("/", 2)[1]:
        raise ProtocolViolation(f"invalid shared subscription {pattern!r}", "MQTT-4.8.2-1",
                                code=PROTOCOL_ERROR)  # fmt: skip


class Aliases:
    """The topic aliases one MQTT 5 client set on its PUBLISHes (section 3.3.2.3.4)."""

    def __init__(self, maximum: int) -> None:
        """Accept aliases 1 to ``maximum`` (what CONNACK announced)."""
        self.maximum = maximum
        self._topics: dict[int, str] = {}

    def topic(self, publish: Publish) -> str:
        """Return the PUBLISH's topic, through its alias if it has one; remember a new one."""
        topic, alias = publish.topic, publish.alias
        if alias is None:
            if not topic:
                raise ProtocolViolation("PUBLISH with no topic and no alias", "MQTT-3.3.2-8",
                                        code=PROTOCOL_ERROR)  # fmt: skip
            return topic
        if not 0 < alias <= self.maximum:
            raise ProtocolViolation(f"topic alias {alias} not in 1..{self.maximum}",
                                    "MQTT-3.3.2-9", code=TOPIC_ALIAS_INVALID)  # fmt: skip
        if topic:
            self._topics[alias] = topic
            return topic
        if alias not in self._topics:
            raise ProtocolViolation(f"topic alias {alias} was never set", "MQTT-3.3.4",
                                    code=PROTOCOL_ERROR)  # fmt: skip
        return self._topics[alias]


def is_utf8(payload: bytes) -> bool:
    """Whether a payload marked as UTF-8 (payload format indicator 1) is (section 3.3.2.3.2)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_publish_strings(packet: mqtt5.PublishPacket) -> None:
    """Check a PUBLISH's property strings for what valid UTF-8 may still hold (section 1.5.4)."""
    for what, text in (("content type", packet.content_type),
                       ("response topic", packet.response_topic)):  # fmt: skip
        if text is not None:
            check_text(text, f"PUBLISH {what}")
    response = packet.response_topic
    if response is not None and ("+" in response or "#" in response or not response):
        # [MQTT-3.3.2-14]: the response topic is a topic name, and names have no wildcards.
        raise ProtocolViolation(f"response topic {response!r} is not a topic name",
                                "MQTT-3.3.2-14", code=PROTOCOL_ERROR)  # fmt: skip
    for key, value in packet.user_properties:
        check_text(key, "PUBLISH user property name")
        check_text(value, "PUBLISH user property value")


def props_of(publish: mqtt5.PublishPacket | mqtt5.Will, now: float) -> Props | None:
    """Return the properties of a received PUBLISH (or will), or None when it has none."""
    expiry = publish.message_expiry_interval
    indicator, content_type = publish.payload_format_indicator, publish.content_type
    response_topic, correlation = publish.response_topic, publish.correlation_data
    users = publish.user_properties
    if (expiry is None and not indicator and content_type is None and response_topic is None
            and correlation is None and not users):  # fmt: skip
        return None  # the common case, without building anything
    return Props(indicator, content_type, response_topic, correlation, tuple(users),
                 None if expiry is None else now + expiry)  # fmt: skip
