"""common.properties: paho's PUBLISH properties, byte for byte, at a fraction of the cost.

Every comparison is against paho's own ``Properties``: what ours packs, prints and reads back
must be what paho's does, for any set of PUBLISH properties; what paho would reject, ours rejects
too, and what MQTT calls malformed is a ``MalformedPacket``, which paho turns into a closed
connection. The clients' traffic through real brokers (test_matrix, test_clients_v5,
test_interop) runs on these classes too, on both the sending and the receiving side.
"""

from __future__ import annotations

import functools
import signal
import timeit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import aiomqtt_fixes
from common.properties import FAST, PublishProperties, publish_properties
from tests.hostile import hostile_broker, publish_after_suback
from tests.support import Spawner

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
PUBLISH_VALUES = {
    "PayloadFormatIndicator": st.sampled_from([0, 1]),
    "MessageExpiryInterval": st.integers(0, 2**32 - 1),
    "ContentType": text,
    "ResponseTopic": text,
    "CorrelationData": st.binary(max_size=40),
    "SubscriptionIdentifier": st.integers(1, 268_435_455),
    "TopicAlias": st.integers(1, 65_535),
    "UserProperty": st.lists(st.tuples(text, text), min_size=1, max_size=3),
}


def paho_properties(values: dict[str, object]) -> Properties:
    made = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(made, name, value)
    return made


def ours(values: dict[str, object]) -> PublishProperties:
    made = PublishProperties()
    for name, value in values.items():
        setattr(made, name, value)
    return made


def read(kind: type[Properties], packed: bytes) -> tuple[Properties, int]:
    made = kind(PacketTypes.PUBLISH)
    return made.unpack(packed)  # type: ignore[no-any-return,no-untyped-call]


def test_the_fast_kind_is_in_use_on_the_paho_we_pin() -> None:
    """Were a paho release to change its format or move its decoder's name, this says so
    (the clients would still work, at paho's speed)."""
    assert FAST
    assert isinstance(publish_properties(), PublishProperties)
    assert aiomqtt_fixes.READS_FAST
    assert _packet.Properties is PublishProperties  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=PUBLISH_VALUES))
def test_packs_prints_and_reads_as_paho_does(values: dict[str, object]) -> None:
    theirs, mine = paho_properties(values), ours(values)
    packed = theirs.pack()  # type: ignore[no-untyped-call]
    assert mine.pack() == packed
    assert str(mine) == str(theirs)
    assert mine.json() == theirs.json()  # type: ignore[no-untyped-call]
    assert mine.isEmpty() == theirs.isEmpty()  # type: ignore[no-untyped-call]
    read_mine, used_mine = read(PublishProperties, packed)
    read_theirs, used_theirs = read(Properties, packed)
    assert used_mine == used_theirs == len(packed)
    assert read_mine.json() == read_theirs.json() == theirs.json()  # type: ignore[no-untyped-call]
    assert read_mine.pack() == packed  # type: ignore[no-untyped-call]


def test_reading_again_forgets_what_was_read_before() -> None:
    reused = PublishProperties()
    reused.unpack(ours({"ResponseTopic": "/a", "CorrelationData": b"1"}).pack())
    reused.unpack(ours({"ContentType": "x"}).pack())
    assert reused.json() == {"ContentType": "x"}  # type: ignore[no-untyped-call]


def test_rejects_what_paho_rejects_on_assignment() -> None:
    for name, value in [("TopicAlias", 0), ("PayloadFormatIndicator", 2),
                        ("SessionExpiryInterval", 5), ("NoSuchThing", 1)]:  # fmt: skip
        with pytest.raises(MQTTException):
            setattr(Properties(PacketTypes.PUBLISH), name, value)  # type: ignore[no-untyped-call]
        with pytest.raises(MQTTException):
            setattr(PublishProperties(), name, value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x02\x7f\x00", "unknown property identifier 127"),
        (b"\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x02", "MessageExpiryInterval more than once"),
        (
            b"\x05\x11\x00\x00\x00\x05",
            "SessionExpiryInterval does not apply to packet type Publish",
        ),
        (b"\x03\x23\x00\x00", "TopicAlias property value must be in the range 1-65535"),
        (b"\x03\x02\x00\x00", "truncated property MessageExpiryInterval"),
        (b"\x04\x08\x00\x01\xff", "property ResponseTopic in PUBLISH is not UTF-8"),
    ],
    ids=["unknown", "repeated", "not a PUBLISH's", "out of range", "truncated", "not UTF-8"],
)
def test_malformed_properties_are_a_malformed_packet(body: bytes, reason: str) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 (paho raises whatever it meets)
        read(Properties, body)
    with pytest.raises(MalformedPacket, match=reason):
        read(PublishProperties, body)


def test_other_packet_types_are_paho_s_own() -> None:
    """paho's decoder builds every packet type's properties through the class it names."""
    theirs = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    mine = PublishProperties(PacketTypes.CONNACK)
    for made in (theirs, mine):
        made.ReceiveMaximum = 10
        made.AssignedClientIdentifier = "abc"
    assert mine.pack() == theirs.pack()  # type: ignore[no-untyped-call]
    with pytest.raises(MQTTException):
        mine.ResponseTopic = "/pong"  # a PUBLISH's property, not a CONNACK's
    again = PublishProperties(PacketTypes.CONNACK)
    again.unpack(theirs.pack())  # type: ignore[no-untyped-call]
    assert again.json() == theirs.json()  # type: ignore[no-untyped-call]


def test_a_ping_s_properties_cost_a_fraction_of_paho_s() -> None:
    """What the fleet does per ping: build three properties and pack them; the echo reads
    them. Both measured here, in turn, so that the machine's speed cancels.

    Each is timed in 7 turns, the two kinds alternating, and its best turn counts: measured
    one kind after the other, a burst of load on a CI machine covered all of one kind's
    turns once (0.50 of paho's cost, against 0.16 usually).
    """

    def ping(kind: type[Properties]) -> None:
        made = kind(PacketTypes.PUBLISH)
        made.ResponseTopic = "/pong/ping_client-1234-17"
        made.CorrelationData = b"1744796556.123456"
        made.MessageExpiryInterval = 2
        read(kind, made.pack())  # type: ignore[no-untyped-call]

    turns: dict[type[Properties], list[float]] = {Properties: [], PublishProperties: []}
    for _ in range(7):
        for kind, times in turns.items():
            times.append(timeit.timeit(functools.partial(ping, kind), number=300))
    theirs, mine = min(turns[Properties]), min(turns[PublishProperties])
    assert mine < theirs / 2, (mine, theirs)


BAD_PROPERTIES = b"\x30\x0d" + b"\x00\x05/pong" + b"\x02\x7f\x00" + b"123"
"""A PUBLISH on /pong whose properties name an identifier MQTT does not have (0x7f)."""


def test_a_broker_sending_malformed_properties_is_a_lost_connection(
    spawn: Spawner, port: int
) -> None:
    """The client notices, says so in one line, reconnects in 100 ms, and stays calm."""
    with hostile_broker(port, publish_after_suback(BAD_PROPERTIES)) as broker:
        probe = spawn.start("ping_client", "--port", str(port))
        probe.wait_for(r"Lost connection to 127\.0\.0\.1:\d+: .+\. Retrying every 100 ms\.")
        probe.wait_for(r"Reconnected to 127\.0\.0\.1:\d+ after 0\.1\d\d s")
        assert broker.connections >= 2
        probe.signal(signal.SIGINT)
        probe.wait()
    log = probe.err()
    assert " ERROR " not in log, log
    assert "Traceback" not in log, log
