"""MQTT 5 PUBLISH properties at the cost of what they carry.

paho's :class:`~paho.mqtt.properties.Properties` builds its tables anew for every instance and
finds a property by scanning all 27 names, removing their spaces each time, on every assignment,
every read off the wire and every pack. A ping carries three properties and its echo one, so
that was about 13 % of a fleet's CPU and a quarter of echo_client's (cProfile of a 300-device
fleet: 2 million ``str.replace`` calls for 8,294 pings).

:class:`PublishProperties` is a paho ``Properties`` (same attributes, ``str``, ``json``,
``pack`` output) that shares one set of tables and looks names up in dicts built once. Whether it
packs and unpacks exactly as paho does is checked at import against paho's own code
(:data:`FAST`); were it to differ (a paho release changing the format), :func:`publish_properties`
returns paho's own class and nothing changes but the speed.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from paho.mqtt import properties as paho
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

_TABLES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
"""paho's tables, built once and shared: paho reads them and never changes them."""

_SHARED = {name: getattr(_TABLES, name) for name in ("packetType", "types", "names", "properties")}

_NAMES = {name: name.replace(" ", "") for name in _TABLES.names}
"""Each property's name as paho spells it, to its attribute name (spaces removed)."""

_BY_IDENT: dict[int, tuple[str, int, bool]] = {
    ident: (_NAMES[name], _TABLES.properties[ident][0], _TABLES.allowsMultiple(_NAMES[name]))  # type: ignore[no-untyped-call]
    for name, ident in _TABLES.names.items()
}
"""Identifier to (attribute name, paho's type index, may occur more than once)."""


def _read_pair(buffer: bytes, left: int) -> tuple[tuple[str, str], int]:
    key, used = paho.readUTF(buffer, left)  # type: ignore[no-untyped-call]
    value, more = paho.readUTF(buffer[used:], left - used)  # type: ignore[no-untyped-call]
    return (key, value), used + more


_TYPE = {name: _TABLES.types.index(name) for name in _TABLES.types}
_WRITE: dict[int, Any] = {
    _TYPE["Byte"]: lambda value: bytes([value]),
    _TYPE["Two Byte Integer"]: paho.writeInt16,
    _TYPE["Four Byte Integer"]: paho.writeInt32,
    _TYPE["Variable Byte Integer"]: VariableByteIntegers.encode,
    _TYPE["Binary Data"]: paho.writeBytes,
    _TYPE["UTF-8 Encoded String"]: paho.writeUTF,
    _TYPE["UTF-8 String Pair"]: lambda pair: paho.writeUTF(pair[0]) + paho.writeUTF(pair[1]),  # type: ignore[no-untyped-call]
}
"""paho's encoder of each property type (what its ``writeProperty`` picks by comparisons)."""
_READ: dict[int, Any] = {
    _TYPE["Byte"]: lambda buffer, _left: (buffer[0], 1),
    _TYPE["Two Byte Integer"]: lambda buffer, _left: (paho.readInt16(buffer), 2),  # type: ignore[no-untyped-call]
    _TYPE["Four Byte Integer"]: lambda buffer, _left: (paho.readInt32(buffer), 4),  # type: ignore[no-untyped-call]
    _TYPE["Variable Byte Integer"]: lambda buffer, _left: VariableByteIntegers.decode(buffer),  # type: ignore[no-untyped-call]
    _TYPE["Binary Data"]: paho.readBytes,
    _TYPE["UTF-8 Encoded String"]: paho.readUTF,
    _TYPE["UTF-8 String Pair"]: _read_pair,
}
"""paho's decoder of each property type (what its ``readProperty`` picks by comparisons)."""

_PACKING = [
    (attribute, VariableByteIntegers.encode(ident), _WRITE[kind], multiple)  # type: ignore[no-untyped-call]
    for ident, (attribute, kind, multiple) in _BY_IDENT.items()
]
"""For each property in the order paho packs in (its names table's): attribute, encoded
identifier, encoder, list or not."""

_PLAIN = frozenset(
    attribute
    for ident, (attribute, _kind, multiple) in _BY_IDENT.items()
    if PacketTypes.PUBLISH in _TABLES.properties[ident][1]
    and not multiple
    and ident not in (1, 35)  # paho checks the range of these
)
"""PUBLISH properties that paho stores as given, without a check: assigned directly."""


class PublishProperties(Properties):
    """A PUBLISH packet's properties; behaves as paho's ``Properties(PacketTypes.PUBLISH)``."""

    def __init__(self, packetType: int = PacketTypes.PUBLISH) -> None:  # noqa: N803 (paho's)
        """Empty properties; for a packet type other than PUBLISH, paho's own."""
        if packetType != PacketTypes.PUBLISH:
            # Another packet type: paho's own, whole (paho builds these through this class
            # too, once it is the one its decoder uses).
            Properties.__init__(self, packetType)  # type: ignore[no-untyped-call]
            return
        self.__dict__.update(_SHARED)

    def __setattr__(self, name: str, value: object) -> None:
        """Set a property: directly where paho would store the value as given."""
        if name in _PLAIN and self.packetType == PacketTypes.PUBLISH:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        """Encode the properties as paho does: its order, its encoders."""
        if self.packetType != PacketTypes.PUBLISH:
            return super().pack()  # type: ignore[no-any-return,no-untyped-call]
        given = self.__dict__
        parts: list[bytes] = []
        for attribute, head, write, multiple in _PACKING:
            if attribute in given:
                for value in given[attribute] if multiple else (given[attribute],):
                    parts += (head, write(value))
        buffer = b"".join(parts)
        return VariableByteIntegers.encode(len(buffer)) + buffer  # type: ignore[no-any-return,no-untyped-call]

    def unpack(self, buffer: bytes) -> tuple[Properties, int]:
        """Read properties off the wire as paho does; return them and the bytes they took.

        Properties that are not MQTT's, or not a PUBLISH's, or repeated where MQTT allows one,
        make the packet malformed, as MQTT says (section 2.2.2.2), and paho ends the connection
        as it does for any malformed packet. (paho's own code raised KeyError, MQTTException,
        struct.error or UnicodeDecodeError there, out of its read loop; the connection ended
        too, and aiomqtt reports both the same way.)
        """
        if self.packetType != PacketTypes.PUBLISH:
            return super().unpack(buffer)  # type: ignore[no-any-return,no-untyped-call]
        given = self.__dict__
        for attribute in _NAMES.values():
            given.pop(attribute, None)
        length, used = VariableByteIntegers.decode(buffer)  # type: ignore[no-untyped-call]
        view = buffer[used:]
        left = length
        while left > 0:
            ident, taken = VariableByteIntegers.decode(view)  # type: ignore[no-untyped-call]
            view = view[taken:]
            left -= taken
            if ident not in _BY_IDENT:
                raise MalformedPacket(f"unknown property identifier {ident} in PUBLISH")
            attribute, kind, multiple = _BY_IDENT[ident]
            try:
                value, taken = _READ[kind](view, left)
            except (IndexError, struct.error) as exc:
                raise MalformedPacket(f"truncated property {attribute} in PUBLISH") from exc
            except UnicodeDecodeError as exc:
                raise MalformedPacket(f"property {attribute} in PUBLISH is not UTF-8") from exc
            view = view[taken:]
            left -= taken
            if attribute in given and not multiple:
                raise MalformedPacket(f"property {attribute} more than once in PUBLISH")
            if attribute in _PLAIN:
                given[attribute] = value
                continue
            try:
                Properties.__setattr__(self, attribute, value)  # type: ignore[no-untyped-call]
            except MQTTException as exc:  # not a PUBLISH's property, or out of range
                raise MalformedPacket(str(exc)) from exc
        return self, length + used


def _same_as_paho() -> bool:
    """Whether PublishProperties packs, and reads back, every PUBLISH property as paho does."""
    samples: dict[str, Any] = {
        "PayloadFormatIndicator": 1,
        "MessageExpiryInterval": 3,
        "ContentType": "text/plain",
        "ResponseTopic": "/pong/7",
        "CorrelationData": b"1744796556.25",
        "SubscriptionIdentifier": 42,
        "TopicAlias": 9,
        "UserProperty": [("a", "1"), ("b", "2")],
    }
    for chosen in (samples, {"ResponseTopic": "/pong"}, {}):
        theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        ours = PublishProperties()
        for name, value in chosen.items():
            setattr(theirs, name, value)
            setattr(ours, name, value)
        packed = theirs.pack()  # type: ignore[no-untyped-call]
        if ours.pack() != packed or str(ours) != str(theirs):
            return False
        read_back = PublishProperties()
        read_theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if read_back.unpack(packed)[1] != read_theirs.unpack(packed)[1]:  # type: ignore[no-untyped-call]
            return False
        if read_back.json() != read_theirs.json():  # type: ignore[no-untyped-call]
            return False
    return True


FAST = _same_as_paho()
"""Whether :class:`PublishProperties` is exactly paho's format (checked at import)."""


def publish_properties() -> Properties:
    """Empty properties for a PUBLISH: the fast kind where it is exactly paho's."""
    if FAST:
        return PublishProperties()
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def ping_request(response_topic: str, payload: bytes, timeout: float | None) -> Properties:
    """Return a ping's MQTT 5 request/response properties (section 4.10).

    Where to answer; which ping it is (correlation data: its timestamp, without the spaces
    ``--size`` pads it with, as correlation data has a two-byte length and a payload may be
    longer); and, with ``timeout``, no echo once the ping has timed out (it would only count as
    late): a message expiry in whole seconds.
    """
    properties = publish_properties()
    properties.ResponseTopic = response_topic
    properties.CorrelationData = payload.rstrip(b" ")
    if timeout is not None:
        properties.MessageExpiryInterval = max(1, math.ceil(timeout))
    return properties
