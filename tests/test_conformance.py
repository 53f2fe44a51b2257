"""MQTT 3.1.1 conformance of our broker, on the wire, with packets built by hand.

Each test names the normative statement of the OASIS MQTT 3.1.1 specification it checks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import Spawner, free_port, rss_kib

_ids = itertools.count()


def uid(prefix: str) -> str:
    """A client id or topic unique within this module's broker."""
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def broker_port(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
                ) -> Iterator[int]:  # fmt: skip
    """One broker per event loop, on its own free port; tests use unique ids and topics."""
    spawner = Spawner(tmp_path_factory.mktemp("conformance"))
    port = free_port()
    spawner.broker(port, "--handshake-timeout", "2", "--max-packet-size", "65536",
                   "--deny-subscribe", "secret/#,$SYS/#",
                   "--event-loop", request.param)  # fmt: skip
    yield port
    spawner.cleanup()


@pytest.fixture
def client(broker_port: int) -> Iterator[RawClient]:
    """A raw client, connected with a clean session."""
    c = RawClient(broker_port)
    assert c.connect(uid("c")) == (False, 0)
    yield c
    c.close()


def new(broker_port: int, client_id: str = "", **kwargs: object) -> RawClient:
    """Connect another raw client and check CONNACK accepted it."""
    c = RawClient(broker_port)
    _, code = c.connect(client_id or uid("c"), **kwargs)
    assert code == 0
    return c


def test_amqtt_is_the_version_our_overrides_were_written_for() -> None:
    # broker/handler.py and broker/server.py replace amqtt 0.12.1 internals by name. Another
    # version may rename them and silently undo a fix: re-check every override before bumping.
    assert version("amqtt") == "0.12.1"


# --- 1. keepalive -----------------------------------------------------------------------------


def test_silent_client_is_closed_after_one_and_a_half_keepalives_and_its_will_published(
    broker_port: int,
) -> None:
    """[MQTT-3.1.2-24] and [MQTT-3.1.2-8]."""
    watcher = new(broker_port)
    will_topic = uid("will")
    assert watcher.subscribe(1, (will_topic, 0)) == [0]
    silent = RawClient(broker_port)
    silent.connect(uid("silent"), keepalive=1, will=(will_topic, b"gone", 0, False))
    start = time.monotonic()
    assert silent.closed_within(8)
    elapsed = time.monotonic() - start
    # Not before 1.5 x keepalive (load only delays a close, so this bound is exact); the upper
    # bound is wide because three pytest workers load two cores, and only catches "much later".
    assert 1.4 <= elapsed < 5.0, elapsed
    got = watcher.message()
    assert (got.topic, got.payload) == (will_topic, b"gone")


def test_pingreq_keeps_a_client_alive(broker_port: int) -> None:
    """[MQTT-3.1.2-23]: any packet within the keepalive resets it (PINGREQ here)."""
    c = RawClient(broker_port)
    c.connect(uid("alive"), keepalive=1)
    for _ in range(4):  # 4 x 0.5 s = 2 s > 1.5 x keepalive
        assert not c.closed_within(0.5)
        c.send(m.PINGREQ_PACKET)
    assert c.expect(m.PINGRESP).kind == m.PINGRESP


# --- 2. persistent sessions -------------------------------------------------------------------


def test_persistent_session_is_resumed_with_its_subscriptions(broker_port: int) -> None:
    """[MQTT-3.2.2-2] session present, and [MQTT-3.1.2-4] the state is kept."""
    cid, topic = uid("persist"), uid("t")
    first = RawClient(broker_port)
    assert first.connect(cid, clean=False) == (False, 0)
    assert first.subscribe(1, (topic, 1)) == [1]
    first.send(m.DISCONNECT_PACKET)
    assert first.closed_within(5)
    again = RawClient(broker_port)
    assert again.connect(cid, clean=False) == (True, 0)
    publisher = new(broker_port)
    publisher.send(m.publish(topic, b"still subscribed"))
    got = again.message()
    assert (got.topic, got.payload) == (topic, b"still subscribed")


def test_clean_session_discards_the_stored_session(broker_port: int) -> None:
    """[MQTT-3.1.2-6] and [MQTT-3.2.2-1]: clean session 1 gets session present 0."""
    cid = uid("persist")
    first = RawClient(broker_port)
    first.connect(cid, clean=False)
    first.subscribe(1, (uid("t"), 1))
    first.send(m.DISCONNECT_PACKET)
    assert first.closed_within(5)
    clean = RawClient(broker_port)
    assert clean.connect(cid, clean=True) == (False, 0)
    clean.send(m.DISCONNECT_PACKET)
    assert clean.closed_within(5)
    after = RawClient(broker_port)
    assert after.connect(cid, clean=False) == (False, 0)


# --- 3. offline queueing and redelivery -------------------------------------------------------


def test_qos1_and_qos2_are_queued_for_an_offline_persistent_session(broker_port: int) -> None:
    """[MQTT-3.1.2-5]: QoS 1/2 messages arriving while disconnected are kept and delivered."""
    cid, topic = uid("offline"), uid("t")
    sub = RawClient(broker_port)
    sub.connect(cid, clean=False)
    assert sub.subscribe(1, (topic, 2)) == [2]
    sub.send(m.DISCONNECT_PACKET)
    assert sub.closed_within(5)
    publisher = new(broker_port)
    publisher.send(m.publish(topic, b"q1", qos=1, packet_id=7))
    assert publisher.expect(m.PUBACK).packet_id == 7
    publisher.send(m.publish(topic, b"q0", qos=0))
    publisher.send(m.publish(topic, b"q2", qos=2, packet_id=8))
    assert publisher.expect(m.PUBREC).packet_id == 8
    publisher.send(m.ack(m.PUBREL, 8))
    assert publisher.expect(m.PUBCOMP).packet_id == 8
    publisher.barrier()
    back = RawClient(broker_port)
    assert back.connect(cid, clean=False) == (True, 0)
    first, second = back.message(), back.message()
    assert [(first.payload, first.qos), (second.payload, second.qos)] == [(b"q1", 1), (b"q2", 2)]
    assert not first.retain
    assert not second.retain  # [MQTT-3.3.1-9]
    back.send(m.ack(m.PUBACK, first.packet_id or 0))
    back.send(m.ack(m.PUBREC, second.packet_id or 0))
    assert back.expect(m.PUBREL).packet_id == second.packet_id
    back.send(m.ack(m.PUBCOMP, second.packet_id or 0))
    assert back.barrier() == []  # the QoS 0 message was not queued


def test_unacknowledged_qos1_is_resent_with_dup_on_reconnect(broker_port: int) -> None:
    """[MQTT-4.4.0-1] and [MQTT-3.3.1-1]: resend unacknowledged PUBLISH with DUP set."""
    cid, topic = uid("redeliver"), uid("t")
    sub = RawClient(broker_port)
    sub.connect(cid, clean=False)
    sub.subscribe(1, (topic, 1))
    new(broker_port).send(m.publish(topic, b"ack me", qos=1, packet_id=3))
    first = sub.message()
    assert (first.payload, first.qos, first.dup) == (b"ack me", 1, False)
    sub.close()  # no PUBACK
    back = RawClient(broker_port)
    assert back.connect(cid, clean=False) == (True, 0)
    again = back.message()
    assert (again.payload, again.qos, again.dup) == (b"ack me", 1, True)
    assert again.packet_id == first.packet_id
    back.send(m.ack(m.PUBACK, again.packet_id or 0))
    assert back.barrier() == []


def test_slow_puback_does_not_drop_a_qos1_delivery(broker_port: int) -> None:
    """At least once: amqtt dropped a QoS 1 delivery after 5 s without PUBACK."""
    cid, topic = uid("slow"), uid("t")
    sub = RawClient(broker_port)
    sub.connect(cid, clean=False, keepalive=0)
    sub.subscribe(1, (topic, 1))
    new(broker_port).send(m.publish(topic, b"patience", qos=1, packet_id=4))
    first = sub.message()
    assert not sub.closed_within(6.0)  # past amqtt's 5 s; nothing else arrives meanwhile
    sub.close()
    back = RawClient(broker_port)
    assert back.connect(cid, clean=False) == (True, 0)
    again = back.message()
    assert (again.payload, again.dup, again.packet_id) == (b"patience", True, first.packet_id)


# --- 4. retained messages ---------------------------------------------------------------------


def test_retained_messages_do_not_leak_to_clients_without_a_subscription(
    broker_port: int, client: RawClient
) -> None:
    """[MQTT-3.3.1-6]: retained messages go only to a client's own new subscriptions."""
    topic = uid("leak")
    other = new(broker_port)
    other.subscribe(1, (f"{topic}/#", 0))
    client.send(m.publish(f"{topic}/x", b"kept", retain=True))
    assert other.message().payload == b"kept"
    newcomer = new(broker_port)
    assert newcomer.barrier() == []
    assert newcomer.subscribe(1, (f"{topic}/+", 1)) == [1]
    got = newcomer.message()
    assert (got.topic, got.payload, got.retain) == (f"{topic}/x", b"kept", True)


def test_retained_set_and_clear(broker_port: int, client: RawClient) -> None:
    """[MQTT-3.3.1-5], [MQTT-3.3.1-10] and [MQTT-3.3.1-9]."""
    topic = uid("retained")
    live = new(broker_port)
    live.subscribe(1, (topic, 0))
    client.send(m.publish(topic, b"v1", retain=True))
    assert live.message().retain is False  # [MQTT-3.3.1-9]: live delivery has RETAIN 0
    late = new(broker_port)
    late.subscribe(1, (topic, 0))
    assert late.message().payload == b"v1"
    client.send(m.publish(topic, b"", retain=True))  # clears it
    assert live.message().payload == b""
    later = new(broker_port)
    later.subscribe(1, (topic, 0))
    assert later.barrier() == []


# --- 5. QoS downgrade -------------------------------------------------------------------------


@pytest.mark.parametrize(("publish_qos", "granted", "delivered"),
                         [(0, 2, 0), (1, 2, 1), (2, 1, 1), (2, 0, 0), (1, 0, 0)])  # fmt: skip
def test_delivery_qos_is_the_minimum_of_publish_and_granted(
    broker_port: int, client: RawClient, publish_qos: int, granted: int, delivered: int
) -> None:
    """[MQTT-3.8.4-6] and section 3.3.5."""
    topic = uid("qos")
    sub = new(broker_port)
    assert sub.subscribe(1, (topic, granted)) == [granted]
    client.send(m.publish(topic, b"x", qos=publish_qos, packet_id=9))
    if publish_qos == 2:
        assert client.expect(m.PUBREC).packet_id == 9
        client.send(m.ack(m.PUBREL, 9))
    got = sub.message()
    assert got.qos == delivered


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(
    broker_port: int, client: RawClient
) -> None:
    """[MQTT-3.3.5-1]."""
    topic = uid("overlap")
    sub = new(broker_port)
    assert sub.subscribe(1, (f"{topic}/#", 0), (f"{topic}/a", 1)) == [0, 1]
    client.send(m.publish(f"{topic}/a", b"once", qos=1, packet_id=2))
    got = sub.message()
    assert (got.payload, got.qos) == (b"once", 1)
    sub.send(m.ack(m.PUBACK, got.packet_id or 0))
    assert sub.barrier() == []


# --- 6. protocol violations close the connection ----------------------------------------------

VIOLATIONS = {
    "truncated PUBLISH topic [MQTT-1.5.3]": m.packet(m.PUBLISH, 0, b"\x00\x10ab"),
    "SUBSCRIBE filter without QoS byte [MQTT-3.8.3]": m.packet(
        m.SUBSCRIBE, 2, b"\x00\x01" + m.string("a")
    ),
    "PUBACK with 3-byte body [MQTT-2.2]": m.packet(m.PUBACK, 0, b"\x00\x01\x00"),
    "PINGREQ with flags set [MQTT-2.2.2-2]": m.packet(m.PINGREQ, 1, b""),
    "SUBSCRIBE with flags 0000 [MQTT-3.8.1-1]": m.packet(
        m.SUBSCRIBE, 0, b"\x00\x01" + m.string("a") + b"\x00"
    ),
    "PUBREL with flags 0000 [MQTT-3.6.1-1]": m.packet(m.PUBREL, 0, b"\x00\x01"),
    "PUBLISH with QoS 3 [MQTT-3.3.1-4]": m.packet(m.PUBLISH, 0b0110, m.string("a") + b"\x00\x01"),
    "PUBLISH to a + topic [MQTT-3.3.2-2]": m.publish("a/+/b", b"x"),
    "PUBLISH to a # topic [MQTT-3.3.2-2]": m.publish("a/#", b"x"),
    "PUBLISH topic invalid UTF-8 [MQTT-1.5.3-1]": m.publish(b"a/\xff\xfe", b"x"),
    "PUBLISH topic with U+0000 [MQTT-1.5.3-2]": m.publish("a/\x00b", b"x"),
    "PUBLISH QoS 1 with packet id 0 [MQTT-2.3.1-1]": m.publish("a", b"x", qos=1, packet_id=0),
    "SUBSCRIBE with packet id 0 [MQTT-2.3.1-1]": m.subscribe(0, ("a", 0)),
    "SUBSCRIBE with no topic filter [MQTT-3.8.3-3]": m.packet(m.SUBSCRIBE, 2, b"\x00\x05"),
    "SUBSCRIBE filter with U+0000 [MQTT-1.5.3-2]": m.subscribe(1, ("a\x00", 0)),
    "SUBSCRIBE requesting QoS 3 [MQTT-3.8.3-4]": m.subscribe(1, ("a", 3)),
    "UNSUBSCRIBE with no topic filter [MQTT-3.10.3-2]": m.packet(m.UNSUBSCRIBE, 2, b"\x00\x05"),
    "second CONNECT [MQTT-3.1.0-2]": m.connect("again"),
    "CONNACK from a client [MQTT-2.2.1]": m.packet(m.CONNACK, 0, b"\x00\x00"),
    "SUBACK from a client [MQTT-2.2.1]": m.packet(m.SUBACK, 0, b"\x00\x01\x00"),
    "UNSUBACK from a client [MQTT-2.2.1]": m.packet(m.UNSUBACK, 0, b"\x00\x01"),
    "PINGRESP from a client [MQTT-2.2.1]": m.packet(m.PINGRESP, 0, b""),
    "reserved packet type 0 [MQTT-2.2.1]": m.packet(0, 0, b""),
    "reserved packet type 15 [MQTT-2.2.1]": m.packet(15, 0, b""),
    "remaining length over 4 bytes [MQTT-2.2.3]": b"\x30\xff\xff\xff\xff\x01",
    # Topic filters (section 4.7.1): malformed, so the packet is, and no SUBACK 0x80 comes.
    "SUBSCRIBE filter a/#/b [MQTT-4.7.1-2]": m.subscribe(1, ("a/#/b", 0)),
    "SUBSCRIBE filter a# [MQTT-4.7.1-2]": m.subscribe(1, ("a#", 0)),
    "SUBSCRIBE filter a+/b [MQTT-4.7.1-3]": m.subscribe(1, ("a+/b", 0)),
    "SUBSCRIBE with an empty filter [MQTT-4.7.3-1]": m.subscribe(1, ("ok", 0), ("", 0)),
    "UNSUBSCRIBE filter a/#/b [MQTT-4.7.1-2]": m.unsubscribe(2, "a/#/b"),
    "UNSUBSCRIBE filter +a [MQTT-4.7.1-3]": m.unsubscribe(2, "+a"),
    # Strings (section 1.5.3): a receiver may close on control and non-characters; mosquitto does.
    "PUBLISH topic with U+0001 [MQTT-1.5.3]": m.publish("a\x01", b"x"),
    "PUBLISH topic with U+001F [MQTT-1.5.3]": m.publish("a/\x1f", b"x"),
    "PUBLISH topic with U+007F [MQTT-1.5.3]": m.publish("a\x7f", b"x"),
    "PUBLISH topic with U+0085 [MQTT-1.5.3]": m.publish("a\x85", b"x"),
    "PUBLISH topic with U+FFFF [MQTT-1.5.3]": m.publish("a\uffff", b"x"),
    "PUBLISH topic with U+FDD0 [MQTT-1.5.3]": m.publish("a\ufdd0", b"x"),
    "PUBLISH topic with a surrogate [MQTT-1.5.3-1]": m.publish(b"a/\xed\xa0\x80", b"x"),
    "SUBSCRIBE filter with U+001B [MQTT-1.5.3]": m.subscribe(1, ("a/\x1b[31m", 0)),
    "UNSUBSCRIBE filter with U+0000 [MQTT-1.5.3-2]": m.unsubscribe(2, "a\x00"),
}


@pytest.mark.parametrize("bad", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
def test_protocol_violation_closes_the_connection(broker_port: int, bad: bytes) -> None:
    victim = new(broker_port)
    victim.send(bad)
    assert victim.closed_within(3)
    # ... and the broker goes on serving everyone else.
    assert new(broker_port).barrier() == []


@pytest.mark.parametrize(
    "first",
    [m.PINGREQ_PACKET, m.publish("a", b"x"), m.subscribe(1, ("a", 0)), b"GET / HTTP/1.1\r\n\r\n"],
    ids=["PINGREQ", "PUBLISH", "SUBSCRIBE", "HTTP"],
)
def test_first_packet_must_be_connect(broker_port: int, first: bytes) -> None:
    """[MQTT-3.1.0-1]: the server closes a connection whose first packet is not CONNECT."""
    c = RawClient(broker_port)
    c.send(first)
    assert c.closed_within(3)


def test_a_connection_that_never_sends_connect_is_closed(broker_port: int) -> None:
    """Section 3.1.4: a server should close a connection that sends no CONNECT in time."""
    c = RawClient(broker_port)
    start = time.monotonic()
    assert c.closed_within(5)
    assert time.monotonic() - start >= 1.9  # the module's broker allows 2 s


def test_will_message_of_a_violator_is_published(broker_port: int) -> None:
    """[MQTT-3.1.2-8]: the will is published when the server closes for a protocol error."""
    watcher = new(broker_port)
    topic = uid("will")
    watcher.subscribe(1, (topic, 0))
    bad = new(broker_port, will=(topic, b"violator", 0, False))
    bad.send(m.publish("a/#", b"x"))
    assert bad.closed_within(3)
    assert watcher.message().payload == b"violator"


# --- strict CONNECT -------------------------------------------------------------------------


def raw_connect(flags: int, payload: bytes) -> bytes:
    """A level-4 CONNECT with these connect flags and this payload, as given."""
    body = m.string("MQTT") + bytes([4, flags]) + b"\x00\x3c" + payload
    return m.packet(m.CONNECT, 0, body)


BAD_CONNECTS = {
    "user name flag 0, a user name present [MQTT-3.1.2-18]": raw_connect(
        0x02, m.string("c") + m.string("alice")
    ),
    "user name flag 1, no user name [MQTT-3.1.2-19]": raw_connect(0x82, m.string("c")),
    "password flag 0, a password present [MQTT-3.1.2-20]": raw_connect(
        0x82, m.string("c") + m.string("alice") + m.string("secret")
    ),
    "password flag 1, no password [MQTT-3.1.2-21]": raw_connect(
        0xC2, m.string("c") + m.string("alice")
    ),
    "password flag 1, user name flag 0 [MQTT-3.1.2-22]": raw_connect(
        0x42, m.string("c") + m.string("secret")
    ),
    "bytes after the last field [MQTT-3.1.3]": raw_connect(0x02, m.string("c") + b"\x00"),
    "client id with U+0000 [MQTT-1.5.3-2]": m.connect("c\x00d"),
    "client id with a surrogate [MQTT-1.5.3-1]": raw_connect(0x02, m.string(b"c\xed\xbf\xbf")),
    "client id with U+0007 [MQTT-1.5.3]": m.connect("c\x07"),
    "will topic with U+0000 [MQTT-1.5.3-2]": m.connect("c", will=("w\x00", b"x", 0, False)),
    "will topic with a surrogate [MQTT-1.5.3-1]": raw_connect(
        0x06, m.string("c") + m.string(b"w\xed\xa0\x80") + m.string(b"x")
    ),
    "user name with U+0000 [MQTT-1.5.3-2]": m.connect("c", username="al\x00ice"),
    "user name with a surrogate [MQTT-1.5.3-1]": raw_connect(
        0x82, m.string("c") + m.string(b"al\xed\xa0\x80")
    ),
    "user name with U+FFFE [MQTT-1.5.3]": m.connect("c", username="alice\ufffe"),
}


@pytest.mark.parametrize("bad", list(BAD_CONNECTS.values()), ids=list(BAD_CONNECTS))
def test_a_malformed_connect_is_closed_without_connack(broker_port: int, bad: bytes) -> None:
    """Section 3.1 and 4.8: a malformed CONNECT closes the connection; no CONNACK is sent."""
    c = RawClient(broker_port)
    c.send(bad)
    with pytest.raises(m.Closed):  # the first thing to come back is the close: no CONNACK
        c.receive(3)
    assert new(broker_port).barrier() == []


# --- acknowledgements of the wrong kind -----------------------------------------------------


def delivered_to(broker_port: int, qos: int) -> tuple[RawClient, int]:
    """A subscriber that has just been sent one message at ``qos``; its packet id."""
    topic = uid("ack")
    sub = new(broker_port)
    assert sub.subscribe(1, (topic, qos)) == [qos]
    publisher = new(broker_port)
    publisher.send(m.publish(topic, b"x", qos=qos, packet_id=5))
    if qos == 2:
        assert publisher.expect(m.PUBREC).packet_id == 5
        publisher.send(m.ack(m.PUBREL, 5))
    message = sub.message()
    assert message.qos == qos
    return sub, message.packet_id or 0


@pytest.mark.parametrize(
    ("qos", "answer"),
    [(1, m.PUBREC), (1, m.PUBCOMP), (2, m.PUBACK), (2, m.PUBCOMP)],
    ids=["PUBREC to QoS 1", "PUBCOMP to QoS 1", "PUBACK to QoS 2", "PUBCOMP before PUBREL"],
)
def test_an_acknowledgement_of_the_wrong_kind_closes_the_connection(
    broker_port: int, qos: int, answer: int
) -> None:
    """Sections 4.3.2 and 4.3.3 give each QoS its flow; 3.1.1 names no other answer to a
    packet outside it than section 4.8's: a protocol violation closes the connection."""
    sub, packet_id = delivered_to(broker_port, qos)
    sub.send(m.ack(answer, packet_id))
    assert sub.closed_within(3)


def test_a_pubrec_for_an_unknown_id_gets_a_pubrel(client: RawClient) -> None:
    """As mosquitto answers, and as MQTT 5 does (with reason 0x92): the flow can finish."""
    client.send(m.ack(m.PUBREC, 4321))
    assert client.expect(m.PUBREL).packet_id == 4321
    assert client.barrier() == []


def test_a_qos2_publish_resent_before_pubrel_is_delivered_once(
    broker_port: int, client: RawClient
) -> None:
    """[MQTT-4.3.3-2]: resends with DUP before PUBREL get PUBREC again and no second delivery;
    after PUBCOMP nothing is left: the same id carries the next message."""
    topic = uid("once")
    sub = new(broker_port)
    sub.subscribe(1, (topic, 0))
    client.send(m.publish(topic, b"one", qos=2, packet_id=9))
    for _ in range(4):
        assert client.expect(m.PUBREC).packet_id == 9
        client.send(m.publish(topic, b"one", qos=2, packet_id=9, dup=True))
    assert client.expect(m.PUBREC).packet_id == 9
    client.send(m.ack(m.PUBREL, 9))
    assert client.expect(m.PUBCOMP).packet_id == 9
    assert sub.message().payload == b"one"
    assert sub.barrier() == []  # delivered once
    client.send(m.publish(topic, b"two", qos=2, packet_id=9))
    assert client.expect(m.PUBREC).packet_id == 9
    client.send(m.ack(m.PUBREL, 9))
    assert client.expect(m.PUBCOMP).packet_id == 9
    assert sub.message().payload == b"two"
    assert sub.barrier() == []


# --- 7. packet size bound ---------------------------------------------------------------------


def test_declared_256_mb_packet_is_refused_without_memory_growth(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port, "--max-packet-size", "1048576")
    before = rss_kib(broker.popen.pid)
    for _ in range(20):
        c = new(port)
        # 268,435,455: the largest remaining length MQTT can express, 256 MB.
        c.send(b"\x30" + m.remaining_length(268_435_455) + b"\x00\x01a")
        assert c.closed_within(3)
    assert new(port).barrier() == []
    assert rss_kib(broker.popen.pid) - before < 5 * 1024
    assert broker.count(r"exceeds the 1048576-byte maximum") == 20


def test_packets_up_to_the_bound_still_pass(spawn: Spawner, port: int) -> None:
    spawn.broker(port, "--max-packet-size", "70000")
    sub = new(port)
    sub.subscribe(1, ("big", 0))
    payload = bytes(65536)
    new(port).send(m.publish("big", payload))
    assert sub.message().payload == payload


# --- 8. client take-over ----------------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_second_connection_with_same_id_closes_the_first(broker_port: int, clean: bool) -> None:
    """[MQTT-3.1.4-2]."""
    cid, topic = uid("twin"), uid("t")
    first = new(broker_port, cid, clean=clean)
    second = RawClient(broker_port)
    assert second.connect(cid, clean=clean) == (not clean, 0)
    assert first.closed_within(3)
    assert second.subscribe(1, (topic, 0)) == [0]
    new(broker_port).send(m.publish(topic, b"to the new one"))
    assert second.message().payload == b"to the new one"


# --- 10. subscription deny list ---------------------------------------------------------------


def test_denied_filters_get_0x80_and_the_rest_are_granted(client: RawClient) -> None:
    """Section 3.9.3: 0x80 is failure, per filter, in the same SUBACK."""
    codes = client.subscribe(5, ("secret/a", 0), ("ok/a", 1), ("secret/#", 2), ("$SYS/x", 0))
    assert codes == [0x80, 1, 0x80, 0x80]


# --- what must keep working -------------------------------------------------------------------


def test_wildcards_match_and_dollar_topics_are_not_matched_by_them(
    broker_port: int, client: RawClient
) -> None:
    """Section 4.7.1 and [MQTT-4.7.2-1]."""
    base = uid("wild")
    sub = new(broker_port)
    assert sub.subscribe(1, (f"{base}/+/x", 0), (f"{base}/deep/#", 0), ("+/tail", 0)) == [0, 0, 0]
    dollar = new(broker_port)
    assert dollar.subscribe(1, ("$app/#", 0)) == [0]
    topics = (f"{base}/a/x", f"{base}/a/y", f"{base}/deep", f"{base}/deep/1/2", "$app/tail",
              f"{base}/tail")  # fmt: skip
    for topic in topics:
        client.send(m.publish(topic, topic.encode()))
    # Deliveries keep publish order, so $app/tail, had it matched "+/tail", would come
    # before base/tail; a/y matches nothing.
    got = [sub.message().topic for _ in range(4)]
    assert got == [f"{base}/a/x", f"{base}/deep", f"{base}/deep/1/2", f"{base}/tail"]
    assert dollar.message().topic == "$app/tail"


def test_qos1_and_qos2_publish_flows(broker_port: int, client: RawClient) -> None:
    """Sections 4.3.2 and 4.3.3, both directions."""
    topic = uid("flow")
    sub = new(broker_port)
    sub.subscribe(1, (topic, 2))
    client.send(m.publish(topic, b"one", qos=1, packet_id=11))
    assert client.expect(m.PUBACK).packet_id == 11
    got = sub.message()
    sub.send(m.ack(m.PUBACK, got.packet_id or 0))
    client.send(m.publish(topic, b"two", qos=2, packet_id=12))
    assert client.expect(m.PUBREC).packet_id == 12
    client.send(m.ack(m.PUBREL, 12))
    assert client.expect(m.PUBCOMP).packet_id == 12
    got = sub.message()
    assert (got.payload, got.qos) == (b"two", 2)
    sub.send(m.ack(m.PUBREC, got.packet_id or 0))
    assert sub.expect(m.PUBREL).packet_id == got.packet_id
    sub.send(m.ack(m.PUBCOMP, got.packet_id or 0))
    assert sub.barrier() == []


def test_will_on_abnormal_disconnect_and_none_on_a_clean_one(broker_port: int) -> None:
    """[MQTT-3.1.2-8] and [MQTT-3.1.2-10]."""
    topic = uid("will")
    watcher = new(broker_port)
    watcher.subscribe(1, (topic, 0))
    polite = new(broker_port, will=(topic, b"polite", 0, False))
    polite.send(m.DISCONNECT_PACKET)
    assert polite.closed_within(3)
    rude = new(broker_port, will=(topic, b"rude", 0, False))
    rude.close()
    assert watcher.message().payload == b"rude"
    assert watcher.barrier() == []


def test_no_will_when_disconnect_comes_in_the_same_segment_as_connect(broker_port: int) -> None:
    """[MQTT-3.1.2-10], when the broker reads DISCONNECT before it starts waiting for one.

    amqtt's client loop learned of the DISCONNECT through a future that was already gone and
    published the will; seen as soon as the reader no longer lost time per packet.
    """
    topic = uid("will")
    watcher = new(broker_port)
    watcher.subscribe(1, (topic, 0))
    for _ in range(5):
        hasty = RawClient(broker_port)
        hasty.send(m.connect(uid("hasty"), will=(topic, b"hasty", 0, False)) + m.DISCONNECT_PACKET)
        assert hasty.expect(m.CONNACK).body[1] == 0  # accepted
        assert hasty.closed_within(3)
    assert watcher.barrier() == []


def test_unsubscribe_stops_delivery(broker_port: int, client: RawClient) -> None:
    """Section 3.10 and [MQTT-3.10.4-4]."""
    topic, marker = uid("unsub"), uid("marker")
    sub = new(broker_port)
    sub.subscribe(1, (topic, 0), (marker, 0))
    client.send(m.publish(topic, b"before"))
    assert sub.message().payload == b"before"
    sub.send(m.unsubscribe(2, topic))
    assert sub.expect(m.UNSUBACK).packet_id == 2
    client.send(m.publish(topic, b"after"))
    client.send(m.publish(marker, b"marker"))
    assert sub.message().payload == b"marker"  # "after" would have come first


def test_zero_length_client_id(broker_port: int) -> None:
    """[MQTT-3.1.3-6]/[MQTT-3.1.3-7] accepted with clean session; [MQTT-3.1.3-8] refused."""
    assert RawClient(broker_port).connect("", clean=True) == (False, 0)
    assert RawClient(broker_port).connect("", clean=False) == (False, 2)


def test_unsupported_protocol_level_gets_connack_1(broker_port: int) -> None:
    """[MQTT-3.1.2-2]."""
    c = RawClient(broker_port)
    assert c.connect(uid("old"), level=3) == (False, 1)


def test_an_unknown_newer_protocol_is_refused_in_mqtt5s_form(broker_port: int) -> None:
    """MQTT 5.0 section 3.2.2.2: CONNACK 0x84 (Unsupported Protocol Version), then close."""
    c = RawClient(broker_port)
    body = m.string("MQTT") + bytes([6, 2]) + b"\x00\x3c" + b"\x00" + m.string(uid("v6"))
    c.send(m.packet(m.CONNECT, 0, body))
    connack = c.receive(3)
    assert (connack.kind, connack.body) == (m.CONNACK, b"\x00\x84\x00")
    assert c.closed_within(3)


# --- order under a burst: the broker holds writes while it works through buffered packets ---


def test_a_burst_in_one_segment_arrives_whole_and_in_order(broker_port: int) -> None:
    """[MQTT-4.6.0-6] ordered topics, when one read brings many packets (broker/handler.Cork)."""
    topic = uid("burst")
    sub0, sub1 = new(broker_port), new(broker_port)
    sub0.subscribe(1, (topic, 0))
    sub1.subscribe(1, (topic, 1))
    pub = new(broker_port)
    payloads = [f"{i:04d}".encode() for i in range(300)]
    burst = b"".join(
        m.publish(topic, p, qos=i % 2, packet_id=i % 60000 + 1) for i, p in enumerate(payloads)
    )
    pub.send(burst)  # one write: the broker reads many packets at once
    assert [sub0.message(5).payload for _ in payloads] == payloads
    got = []
    for _ in payloads:
        message = sub1.message(5)
        got.append(message.payload)
        if message.packet_id is not None:  # the QoS 1 ones
            sub1.send(m.ack(m.PUBACK, message.packet_id))
    assert got == payloads
    acks = [pub.expect(m.PUBACK).packet_id for i in range(len(payloads)) if i % 2]
    assert acks == [i % 60000 + 1 for i in range(len(payloads)) if i % 2]
    for client in (pub, sub0, sub1):
        assert client.barrier() == []


def test_replies_keep_their_place_among_held_writes(broker_port: int) -> None:
    """A PINGRESP (written by amqtt) comes after the PUBACKs of the publishes sent before it."""
    topic = uid("place")
    pub = new(broker_port)
    pub.send(
        b"".join(m.publish(topic, b"x", qos=1, packet_id=i) for i in (1, 2, 3))
        + m.PINGREQ_PACKET
        + b"".join(m.publish(topic, b"y", qos=1, packet_id=i) for i in (4, 5))
    )
    kinds = [(p.kind, p.packet_id if p.kind == m.PUBACK else None) for p in
             (pub.receive(5) for _ in range(6))]  # fmt: skip
    assert kinds == [
        (m.PUBACK, 1), (m.PUBACK, 2), (m.PUBACK, 3), (m.PINGRESP, None), (m.PUBACK, 4),
        (m.PUBACK, 5),
    ]  # fmt: skip


def test_a_fan_out_reaches_every_subscriber_every_time(broker_port: int) -> None:
    """One publish to more subscribers than the broker gathers writes for (4, 8, 16, then 32).

    Each of 100 subscribers must get all 6 messages, QoS 0 and 1. The 32nd connection marked
    for a write was once written before its packet was added, and kept it, and every later one
    it was sent, unwritten: a fan-out of 1,000 reached about 31 subscribers after a few messages.
    """
    topic = uid("fan")
    subscribers = [new(broker_port) for _ in range(100)]
    for sub in subscribers:
        assert sub.subscribe(1, (topic, 1)) == [1]
    publisher = new(broker_port)
    sent = [(f"m{n}".encode(), n % 2) for n in range(6)]
    for n, (payload, qos) in enumerate(sent):
        publisher.send(m.publish(topic, payload, qos=qos, packet_id=n + 1))
    for index, sub in enumerate(subscribers):
        got = [sub.message() for _ in sent]
        assert [(g.payload, g.qos) for g in got] == sent, f"subscriber {index}"
    for sub in [*subscribers, publisher]:
        sub.close()
