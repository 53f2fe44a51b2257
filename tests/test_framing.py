"""The pure parts of the wire, in-process: framing (broker/framing.py) and the codec (protocol).

In the manner of h11's tests: the same bytes fed whole, byte by byte, split anywhere and merged
with others give the same frames; every prefix of a packet needs more data; errors are exact
and sticky.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import protocol
from broker.framing import Framer
from broker.protocol import Frame, ProtocolViolation
from broker.records import Publish, Subscribe, Wanted, Will
from tests import mqtt_raw as m

MAX = 1 << 20

# Topic names a client may publish to: non-empty UTF-8, no wildcards, no U+0000 or surrogates.
topics = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Cn"], exclude_characters="\x00+#"),
    min_size=1, max_size=40,
)  # fmt: skip
payloads = st.binary(max_size=300)
publishes = st.builds(
    lambda topic, payload, qos, packet_id, retain: (topic, payload, qos, packet_id, retain),
    topics, payloads, st.integers(0, 2), st.integers(1, 65535), st.booleans(),
)  # fmt: skip


def encoded(topic: str, payload: bytes, qos: int, packet_id: int, retain: bool) -> bytes:
    """A PUBLISH as a client sends it."""
    return protocol.encode_publish(topic, payload, qos, packet_id, retain=retain)


def frames_of(chunks: list[bytes], max_size: int = MAX) -> list[Frame]:
    """Feed ``chunks`` one at a time; collect every frame."""
    framer = Framer(max_size)
    found = []
    for chunk in chunks:
        framer.feed(chunk)
        while (frame := framer.next_frame()) is not None:
            found.append(frame)
    assert framer.buffered == 0
    return found


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(publishes, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_a_stream_split_anywhere_gives_the_same_packets(
    packets: list[tuple[str, bytes, int, int, bool]], cuts: list[int]
) -> None:
    stream = b"".join(encoded(*packet) for packet in packets)
    whole = frames_of([stream])
    assert frames_of(split(stream, cuts)) == whole
    decoded = [protocol.check(frame, connected=True) for frame in whole]
    assert decoded == [
        Publish(t, p, q, r, i if q else None, None if q or r else encoded(t, p, q, i, r))
        for t, p, q, i, r in packets
    ]


@given(publishes)
def test_every_prefix_of_a_packet_needs_more_data(
    packet: tuple[str, bytes, int, int, bool],
) -> None:
    topic, payload, qos, packet_id, retain = packet
    data = protocol.encode_publish(topic, payload, qos, packet_id, retain=retain)
    for end in range(len(data)):
        framer = Framer(MAX)
        framer.feed(data[:end])
        assert framer.next_frame() is None
    assert frames_of([data[i : i + 1] for i in range(len(data))])  # byte by byte


@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=10))
def test_arbitrary_bytes_give_frames_or_a_violation_never_anything_else(
    data: bytes, cuts: list[int]
) -> None:
    framer = Framer(4096)
    try:
        for chunk in split(data, cuts):
            framer.feed(chunk)
            while (frame := framer.next_frame()) is not None:
                with contextlib.suppress(ProtocolViolation):
                    protocol.check(frame, connected=True)
    except ProtocolViolation:
        with pytest.raises(ProtocolViolation):  # sticky
            framer.next_frame()


def test_an_oversized_packet_is_refused_before_its_body_arrives() -> None:
    framer = Framer(1024)
    framer.feed(b"\x30" + m.remaining_length(268_435_455))
    with pytest.raises(ProtocolViolation) as caught:
        framer.next_frame()
    assert str(caught.value) == (
        "packet of 268435460 bytes exceeds the 1024-byte maximum [MQTT-1.5.4 / server limit]"
    )
    assert framer.buffered == 0
    framer.feed(m.PINGREQ_PACKET)
    with pytest.raises(ProtocolViolation):  # the error is sticky
        framer.next_frame()


def test_a_packet_of_exactly_the_maximum_passes() -> None:
    data = protocol.encode_publish("t", bytes(100))
    assert frames_of([data], max_size=len(data))
    with pytest.raises(ProtocolViolation, match="exceeds the"):
        frames_of([data], max_size=len(data) - 1)


def test_a_remaining_length_over_four_bytes_is_a_violation() -> None:
    with pytest.raises(
        ProtocolViolation, match=r"remaining length longer than 4 bytes \[MQTT-2.2.3\]"
    ):
        frames_of([b"\x30\xff\xff\xff\xff\x01"])


@pytest.mark.parametrize(
    "length", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455]
)
def test_remaining_length_boundaries(length: int) -> None:
    """Section 2.2.3: 1 to 4 bytes; the same encoding as the test client's."""
    assert protocol.remaining_length(length) == m.remaining_length(length)


strings = st.text(st.characters(exclude_categories=["Cs", "Cc", "Cn"], exclude_characters="\x00"),
                  max_size=23)  # fmt: skip
wills = st.tuples(topics, st.binary(max_size=50), st.integers(0, 2), st.booleans())


@given(strings, st.booleans(), st.integers(0, 65535), st.none() | wills, st.none() | strings)
def test_connect_decodes_what_a_client_encodes(
    client_id: str, clean: bool, keepalive: int,
    will: tuple[str, bytes, int, bool] | None, username: str | None,
) -> None:  # fmt: skip
    data = m.connect(client_id, clean=clean, keepalive=keepalive, will=will, username=username,
                     password="pw" if username is not None else None)  # fmt: skip
    (frame,) = frames_of([data])
    connect = protocol.decode_connect(frame)
    assert (connect.client_id, connect.clean_session, connect.keep_alive) == (
        client_id, clean, keepalive,
    )  # fmt: skip
    assert connect.will == (None if will is None else Will(*will))
    assert connect.username == username
    assert connect.password == (None if username is None else "pw")


def test_connect_of_another_protocol_says_which() -> None:
    (frame,) = frames_of([m.connect("x", level=5)])
    with pytest.raises(protocol.UnsupportedProtocol, match="unsupported protocol MQTT level 5"):
        protocol.decode_connect(frame)


@given(
    st.integers(1, 65535), st.lists(st.tuples(topics, st.integers(0, 2)), min_size=1, max_size=5)
)
def test_subscribe_decodes_what_a_client_encodes(
    packet_id: int, filters: list[tuple[str, int]]
) -> None:
    (frame,) = frames_of([m.subscribe(packet_id, *filters)])
    wanted = tuple(Wanted(topic_filter, qos) for topic_filter, qos in filters)
    assert protocol.check(frame, connected=True) == Subscribe(packet_id, wanted)


@pytest.mark.parametrize("kind", [m.PUBACK, m.PUBREC, m.PUBREL, m.PUBCOMP, m.UNSUBACK])
def test_acks_encode_as_the_specification_says(kind: int) -> None:
    assert protocol.encode_ack(kind, 0x1234) == m.ack(kind, 0x1234)


def test_suback_and_connack_encode_as_the_specification_says() -> None:
    assert protocol.encode_suback(7, [0, 1, 0x80]) == m.packet(m.SUBACK, 0, b"\x00\x07\x00\x01\x80")
    assert protocol.encode_connack(0, session_present=True) == b"\x20\x02\x01\x00"
    assert protocol.encode_connack(5) == b"\x20\x02\x00\x05"


@given(topics, st.sampled_from([*range(1, 0x20), *range(0x7F, 0xA0), 0xFDD0, 0xFFFE, 0x10FFFF]))
def test_control_characters_and_non_characters_are_refused_in_any_string(
    topic: str, char: int
) -> None:
    """Section 1.5.3: a receiver may close on them; mosquitto does, and so do we."""
    bad = topic + chr(char)
    for data in (protocol.encode_publish(bad, b"x"), m.subscribe(1, (bad, 0)),
                 m.connect(bad), m.connect("c", username=bad)):  # fmt: skip
        (frame,) = frames_of([data])
        with pytest.raises(ProtocolViolation, match=rf"contains .*U\+{char:04X} \[MQTT-1\.5\.3\]"):
            decode(frame)


def decode(frame: Frame) -> object:
    """Decode a client's packet as the broker does: CONNECT first, the rest once connected."""
    if frame.packet_type == m.CONNECT:
        return protocol.decode_connect(frame)
    return protocol.check(frame, connected=True)


@given(publishes, st.booleans())
def test_a_v5_publish_without_properties_reads_as_the_codec_reads_it(
    publish: tuple[str, bytes, int, int, bool], with_properties: bool
) -> None:
    """broker.v5.plain_publish, the MQTT 5 hot path, agrees with the ``mqtt5`` codec on every
    PUBLISH without properties, and leaves every other one to the codec."""
    import mqtt5  # noqa: PLC0415 - the MQTT 5 half of this module's subject

    from broker import v5  # noqa: PLC0415

    topic, payload, qos, packet_id, retain = publish
    extra = {"user_properties": [("k", "v")]} if with_properties else {}
    raw = mqtt5.PublishPacket(
        topic, payload, qos=mqtt5.QoS(qos), retain=retain, packet_id=packet_id if qos else None,
        **extra,  # type: ignore[arg-type]
    ).write()  # fmt: skip
    (frame,) = frames_of([raw])
    plain = v5.plain_publish(frame)
    if with_properties:
        assert plain is None
        return
    decoded = v5.read(frame)
    assert isinstance(decoded, mqtt5.PublishPacket)
    assert plain is not None
    assert (plain.topic, plain.payload, plain.qos, plain.retain, plain.packet_id) == (
        decoded.topic, decoded.payload, int(decoded.qos), decoded.retain, decoded.packet_id,
    )  # fmt: skip
    assert plain.raw == (raw if qos == 0 and not retain else None)
