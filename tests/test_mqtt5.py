"""MQTT 5.0 beside 3.1.1 on one listener, on the wire: packets built with the ``mqtt5`` codec.

Each test names the section or statement of the MQTT 5.0 specification it checks.
"""

from __future__ import annotations

import itertools
import re
import signal
from collections.abc import Iterator

import mqtt5
import pytest

from tests import mqtt_raw as m
from tests.mqtt_raw import V5, RawClient
from tests.support import Proc, Spawner, free_port, wait_until

_ids = itertools.count()
Q0, Q1, Q2 = mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE


def uid(prefix: str) -> str:
    """A client id or topic unique within this module's broker."""
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Proc]]:
    """One broker for the module; tests use unique ids and topics."""
    spawner = Spawner(tmp_path_factory.mktemp("mqtt5"))
    port = free_port()
    proc = spawner.broker(port, "--max-inflight", "5", "--deny-subscribe", "secret/#")
    yield port, proc
    spawner.cleanup()


@pytest.fixture
def port(broker: tuple[int, Proc]) -> int:
    """The module broker's port."""
    return broker[0]


def client(port: int, client_id: str = "", **kwargs: object) -> V5:
    """A connected MQTT 5 client."""
    c = V5(port)
    assert c.connect(client_id or uid("v5"), **kwargs).reason_code == 0
    return c


def f(pattern: str, qos: mqtt5.QoS = Q0, **options: object) -> mqtt5.TopicFilter:
    """A topic filter with options."""
    return mqtt5.TopicFilter(pattern, max_qos=qos, **options)  # type: ignore[arg-type]


# --- connecting -------------------------------------------------------------------------------


def test_connack_announces_the_brokers_limits_and_features(port: int) -> None:
    """Section 3.2.2.3: receive maximum, maximum packet size, topic alias maximum and the
    availability flags; an empty client id gets one assigned [MQTT-3.2.2-16]."""
    c = V5(port)
    connack = c.connect("", clean_start=True)
    assert connack.reason_code == 0
    assert connack.assigned_client_id
    assert connack.assigned_client_id.startswith("auto-")
    assert connack.max_packet_size == 2 * 1024 * 1024
    assert connack.receive_max == 1000
    assert connack.topic_alias_max > 0
    assert connack.retain_available
    assert connack.wildcard_subscription_available
    assert connack.subscription_id_available
    assert connack.shared_subscription_available


def test_enhanced_authentication_is_refused_with_0x8c(port: int) -> None:
    """Section 4.12: a CONNECT with an authentication method the server does not support."""
    c = V5(port)
    connack = c.connect(uid("auth"), authentication_method="SCRAM-SHA-1")
    assert connack.reason_code == mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD
    assert c.raw.closed_within(3)


def test_a_take_over_tells_the_old_connection_0x8e(port: int) -> None:
    """[MQTT-3.1.4-3] and section 3.14.2.1: Session taken over."""
    cid = uid("twin")
    first = client(port, cid)
    client(port, cid)
    assert first.disconnect_reason() == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
    # Section 3.14.2.2.2: a reason string, for people diagnosing.
    assert first.disconnect.reason_str is not None
    assert re.fullmatch(r"session taken over by a connection from 127\.0\.0\.1:\d+",
                        first.disconnect.reason_str)  # fmt: skip


def test_a_silent_client_is_told_0x8d(port: int) -> None:
    """[MQTT-3.1.2-22]: keep alive timeout, 1.5 x the keep alive."""
    c = client(port, keep_alive=1)
    assert c.disconnect_reason(8) == mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT
    assert c.disconnect.reason_str == "silent for more than 1.5 s [MQTT-3.1.2-24]"


def test_the_largest_packet_size_limit_is_announced(spawn: Spawner) -> None:
    """--max-packet-size up to the largest packet MQTT can encode goes into every CONNACK
    (a four-byte integer, section 3.2.2.3.6); the broker's log has no error."""
    port = free_port()
    proc = spawn.broker(port, "--max-packet-size", "268435460")
    assert V5(port).connect(uid("largest")).max_packet_size == 268_435_460
    assert RawClient(port).connect(uid("v311")) == (False, 0)
    assert "ERROR" not in proc.err()


def test_a_keep_alive_over_the_cap_is_replaced_by_the_server_keep_alive(spawn: Spawner) -> None:
    """Section 3.2.2.3.14: a client asking for more than --max-keepalive, or for none, is told
    the broker's in CONNACK and held to it; one within it is left alone, as 3.1.1 clients are
    (as mosquitto's max_keepalive)."""
    port = free_port()
    spawn.broker(port, "--max-keepalive", "2")
    within = V5(port).connect(uid("within"), keep_alive=1)
    assert within.server_keep_alive is None
    old = RawClient(port)
    assert old.connect(uid("v311"), keepalive=0) == (False, 0)
    capped = [V5(port), V5(port)]
    for c, asked in zip(capped, (0, 60), strict=True):
        assert c.connect(uid("capped"), keep_alive=asked).server_keep_alive == 2
    for c in capped:
        # Silent: closed after 1.5 x the server keep alive, not the 90 s one asked for.
        assert c.disconnect_reason(8) == mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT
        assert c.disconnect.reason_str == "silent for more than 3 s [MQTT-3.1.2-24]"
    # 3.1.1: no keep alive asked, none imposed; silent as long as the others, still served.
    assert not old.closed_within(0.5)
    assert old.barrier() == []


def test_a_reason_string_never_makes_a_packet_larger_than_the_client_accepts(port: int) -> None:
    """[MQTT-3.14.2-3]: the reason string is left out when the packet would exceed the client's
    maximum packet size; the reason code still tells."""
    c = client(port, keep_alive=1, max_packet_size=16)
    assert c.disconnect_reason(8) == mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT
    assert c.disconnect.reason_str is None


def test_a_malformed_packet_is_told_0x81_and_the_broker_stays_well(
    broker: tuple[int, Proc],
) -> None:
    """Section 1.5.4 and 4.13: invalid UTF-8 in a user property is a malformed packet. The
    codec panics on such strings; the broker checks them first."""
    port, proc = broker
    c = client(port)
    good = mqtt5.PublishPacket("t", b"x", user_properties=[("key", "vv")]).write()
    c.raw.send(good.replace(b"vv", b"\xff\xfe"))
    assert c.disconnect_reason() == mqtt5.DisconnectReasonCode.MALFORMED_PACKET
    # The reason string is the broker's log line, for the client's side of the story.
    why = c.disconnect.reason_str
    assert why
    wait_until(lambda: f"closed: {why}." in proc.err(), 5, "the broker's log line")
    assert client(port).barrier() == []
    assert "Traceback" not in proc.err()
    assert "PanicException" not in proc.err()


# --- v5 and 3.1.1 together ------------------------------------------------------------------


def test_a_311_subscriber_gets_a_v5_message_without_properties_and_back(port: int) -> None:
    """Both versions on one listener; properties exist only in MQTT 5."""
    topic = uid("mixed")
    old = RawClient(port)
    assert old.connect(uid("v311")) == (False, 0)
    assert old.subscribe(1, (topic, 0)) == [0]
    new = client(port)
    assert new.subscribe(f(topic)) == [0]
    new.send(mqtt5.PublishPacket(topic, b"from v5", user_properties=[("k", "v")]))
    assert old.message().payload == b"from v5"
    assert new.publish().payload == b"from v5"
    old.send(m.publish(topic, b"from 3.1.1"))
    got = new.publish()
    assert (got.payload, got.user_properties) == (b"from 3.1.1", [])


# --- publishing -----------------------------------------------------------------------------


def test_properties_are_forwarded_as_published(port: int) -> None:
    """[MQTT-3.3.2-15..20]: response topic, correlation data, user properties in order, content
    type, payload format indicator unaltered; message expiry with the time left."""
    topic = uid("props")
    sub = client(port)
    sub.subscribe(f(topic, Q1))
    pub = client(port)
    users = [("b", "2"), ("a", "1"), ("a", "0")]
    pub.send(mqtt5.PublishPacket(
        topic, b"ping", qos=Q1, packet_id=3, response_topic="reply/me",
        correlation_data=b"\x00id", user_properties=users, content_type="text/plain",
        payload_format_indicator=1, message_expiry_interval=30,
    ))  # fmt: skip
    assert pub.expect(mqtt5.PubAckPacket).reason_code == 0  # type: ignore[attr-defined]
    got = sub.publish()
    assert (got.response_topic, got.correlation_data, got.user_properties) == (
        "reply/me", b"\x00id", users
    )  # fmt: skip
    assert (got.content_type, got.payload_format_indicator) == ("text/plain", 1)
    assert got.message_expiry_interval is not None
    assert 28 <= got.message_expiry_interval <= 30


def test_puback_and_pubrec_say_when_nobody_subscribed(port: int) -> None:
    """Sections 3.4.2.1 and 3.5.2.1: 0x10 No matching subscribers; a QoS 2 flow goes on."""
    c = client(port)
    c.send(mqtt5.PublishPacket(uid("nobody"), b"x", qos=Q1, packet_id=1))
    puback = c.expect(mqtt5.PubAckPacket)
    assert puback.reason_code == mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS  # type: ignore[attr-defined]
    c.send(mqtt5.PublishPacket(uid("nobody"), b"x", qos=Q2, packet_id=2))
    pubrec = c.expect(mqtt5.PubRecPacket)
    assert pubrec.reason_code == mqtt5.PubRecReasonCode.NO_MATCHING_SUBSCRIBERS  # type: ignore[attr-defined]
    c.send(mqtt5.PubRelPacket(2))
    assert c.expect(mqtt5.PubCompPacket).reason_code == 0  # type: ignore[attr-defined]


def test_a_payload_marked_utf8_that_is_not_gets_0x99(port: int) -> None:
    """[MQTT-3.3.2-4] and section 3.3.2.3.2."""
    topic = uid("pfi")
    sub = client(port)
    sub.subscribe(f(topic))
    c = client(port)
    c.send(mqtt5.PublishPacket(topic, b"\xff\xfe", qos=Q1, packet_id=2, payload_format_indicator=1))
    assert c.expect(mqtt5.PubAckPacket).reason_code == 0x99  # type: ignore[attr-defined]
    assert sub.barrier() == []  # not delivered


def test_topic_aliases_from_a_client(port: int) -> None:
    """Section 3.3.2.3.4: an alias set with a topic stands for it later; one over the maximum
    is a protocol error, 0x94 [MQTT-3.3.2-9]."""
    topic = uid("alias")
    sub = client(port)
    sub.subscribe(f(topic))
    c = client(port)
    c.send(mqtt5.PublishPacket(topic, b"one", topic_alias=3),
           mqtt5.PublishPacket("", b"two", topic_alias=3))  # fmt: skip
    assert [sub.publish().payload, sub.publish().payload] == [b"one", b"two"]
    c.send(mqtt5.PublishPacket(topic, b"x", topic_alias=60000))
    assert c.disconnect_reason() == mqtt5.DisconnectReasonCode.TOPIC_ALIAS_INVALID


# --- subscribing ----------------------------------------------------------------------------


def test_no_local(port: int) -> None:
    """[MQTT-3.8.3-3]: not sent back to the connection that published it."""
    topic, marker = uid("local"), uid("marker")
    c = client(port)
    assert c.subscribe(f(topic, no_local=True), f(marker)) == [0, 0]
    c.send(mqtt5.PublishPacket(topic, b"mine"), mqtt5.PublishPacket(marker, b"marker"))
    assert c.publish().payload == b"marker"  # "mine" would have come first


def test_retain_as_published_and_retain_handling(port: int) -> None:
    """Section 3.8.3.1: RAP keeps RETAIN on live deliveries; retain handling 1 sends retained
    messages only for a new subscription, 2 never."""
    topic = uid("rap")
    pub = client(port)
    pub.send(mqtt5.PublishPacket(topic, b"kept", retain=True))
    pub.barrier()
    keep = client(port)
    assert keep.subscribe(f(topic, retain_as_published=True)) == [0]
    assert keep.publish().retain  # the retained message, on subscribing
    pub.send(mqtt5.PublishPacket(topic, b"live", retain=True))
    got = keep.publish()
    assert (got.payload, got.retain) == (b"live", True)  # RAP: as published
    plain = client(port)
    never = mqtt5.RetainHandling.SEND_NEVER
    assert plain.subscribe(f(topic, retain_handling=never, retain_as_published=False)) == [0]
    once = client(port)
    handling = mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS
    assert once.subscribe(f(topic, retain_handling=handling)) == [0]
    assert once.publish().payload == b"live"
    assert once.subscribe(f(topic, retain_handling=handling)) == [0]
    assert once.barrier() == []  # not again: the subscription existed
    assert plain.barrier() == []
    pub.send(mqtt5.PublishPacket(topic, b"live 2", retain=True))
    got = plain.publish()
    assert (got.payload, got.retain) == (b"live 2", False)  # [MQTT-3.3.1-12]: RAP 0


def test_subscription_identifiers_come_with_each_delivery(port: int) -> None:
    """[MQTT-3.3.4-3]: the identifiers of every matching subscription."""
    base = uid("ids")
    c = client(port)
    c.subscribe(f(f"{base}/#"), sub_id=7)
    c.subscribe(f(f"{base}/a"), sub_id=9)
    client(port).send(mqtt5.PublishPacket(f"{base}/a", b"x"))
    assert sorted(c.publish().subscription_ids) == [7, 9]


def test_shared_subscriptions_deliver_each_message_to_one_member(port: int) -> None:
    """Section 4.8.2: `$share/GROUP/filter`."""
    topic = uid("work")
    members = [client(port) for _ in range(2)]
    for member in members:
        assert member.subscribe(f(f"$share/g/{topic}")) == [0]
    pub = client(port)
    pub.send(*(mqtt5.PublishPacket(topic, b"%d" % i) for i in range(10)))
    pub.barrier()
    got = [[p.payload for p in member.barrier()] for member in members]  # type: ignore[attr-defined]
    assert sorted(got[0] + got[1]) == sorted(b"%d" % i for i in range(10))
    assert got[0]
    assert got[1]


def test_suback_and_unsuback_reason_codes(port: int) -> None:
    """Sections 3.9.3 and 3.11.3: 0x87 for the deny list, 0x11 no subscription existed."""
    c = client(port)
    assert c.subscribe(f("secret/a"), f(uid("ok"), Q2)) == [0x87, 2]
    c.send(mqtt5.UnsubscribePacket(2, [uid("never")]))
    unsuback = c.expect(mqtt5.UnsubAckPacket)
    assert [int(r) for r in unsuback.reason_codes] == [0x11]  # type: ignore[attr-defined]


# --- flow control ---------------------------------------------------------------------------


def test_the_clients_receive_maximum_bounds_what_is_in_flight(port: int) -> None:
    """[MQTT-3.3.4-7]: no more unacknowledged QoS 1/2 PUBLISHes than the client's maximum."""
    topic = uid("recv")
    sub = client(port, receive_max=2)
    sub.subscribe(f(topic, Q1))
    pub = client(port)
    pub.send(*(mqtt5.PublishPacket(topic, b"%d" % i, qos=Q1, packet_id=i + 1) for i in range(6)))
    first = [sub.publish(), sub.publish()]
    assert sub.barrier() == []  # two, no more
    sub.send(mqtt5.PubAckPacket(first[0].packet_id or 0))
    assert sub.publish().payload == b"2"


def test_nothing_larger_than_the_clients_maximum_packet_size(port: int) -> None:
    """[MQTT-3.1.2-25]: such a message is not sent to that client."""
    topic = uid("small")
    sub = client(port, max_packet_size=64)
    sub.subscribe(f(topic))
    pub = client(port)
    pub.send(mqtt5.PublishPacket(topic, bytes(100)), mqtt5.PublishPacket(topic, b"fits"))
    assert sub.publish().payload == b"fits"


# --- sessions and wills -------------------------------------------------------------------


def test_session_expiry(broker: tuple[int, Proc]) -> None:
    """Section 3.1.2.11: 0 ends the session with the connection; otherwise it is kept for that
    long, then ends."""
    port, proc = broker
    gone, kept = uid("gone"), uid("kept")
    client(port, gone, session_expiry_interval=0).send(mqtt5.DisconnectPacket())
    c = client(port, kept, session_expiry_interval=2)
    c.subscribe(f(f"{kept}/t", Q1))
    c.send(mqtt5.DisconnectPacket())
    assert c.raw.closed_within(3)
    assert V5(port).connect(gone).session_present is False
    back = V5(port)
    assert back.connect(kept, session_expiry_interval=1).session_present is True
    back.send(mqtt5.DisconnectPacket())
    proc.wait_for(rf"Session of client {kept} expired\.", timeout=10)
    assert V5(port).connect(kept).session_present is False


def test_disconnect_with_will_message_publishes_it_and_a_plain_one_does_not(port: int) -> None:
    """Section 3.14.2.1: 0x04 sends the will; 0x00 discards it [MQTT-3.1.2-10]."""
    topic = uid("will")
    watcher = client(port)
    watcher.subscribe(f(topic))
    for reason, payload in ((0x00, b"polite"), (0x04, b"asked")):
        c = client(port, will=mqtt5.Will(topic, payload=payload))
        c.send(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode(reason)))
        assert c.raw.closed_within(3)
    assert watcher.publish().payload == b"asked"
    assert watcher.barrier() == []


def test_a_delayed_will_waits_and_is_not_sent_if_the_client_returns(port: int) -> None:
    """Section 3.1.3.2.2: Will Delay Interval."""
    topic, cid = uid("delay"), uid("returning")
    watcher = client(port)
    watcher.subscribe(f(topic))
    will = mqtt5.Will(topic, payload=b"late", will_delay_interval=30)
    c = client(port, cid, will=will, session_expiry_interval=60)
    c.raw.close()  # lost: the will waits 30 s
    client(port, cid, session_expiry_interval=60)  # back in time: never sent
    assert watcher.barrier() == []
    soon = mqtt5.Will(topic, payload=b"soon", will_delay_interval=1)
    client(port, uid("leaving"), will=soon, session_expiry_interval=60).raw.close()
    assert watcher.publish(timeout=5).payload == b"soon"


def test_a_shutdown_tells_mqtt5_clients_0x8b(spawn: Spawner) -> None:
    """Section 3.14.2.1: Server shutting down."""
    port = free_port()
    proc = spawn.broker(port)
    c = client(port)
    proc.signal(signal.SIGTERM)
    assert c.disconnect_reason() == mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN
    assert proc.wait(10) == 0


def test_a_packet_over_the_maximum_is_told_0x95(port: int) -> None:
    """[MQTT-3.2.2-15] and section 3.14.2.1: refused from its header, before its body."""
    c = client(port)
    c.raw.send(b"\x30" + m.remaining_length(268_435_455))
    assert c.disconnect_reason() == mqtt5.DisconnectReasonCode.PACKET_TOO_LARGE


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        ({"response_topic": "/reply/+"}, mqtt5.DisconnectReasonCode.PROTOCOL_ERROR),
        ({"response_topic": "/re\x01ply"}, mqtt5.DisconnectReasonCode.MALFORMED_PACKET),
        ({"content_type": "text/\x7f"}, mqtt5.DisconnectReasonCode.MALFORMED_PACKET),
        ({"user_properties": [("k", "v\x1b[31m")]}, mqtt5.DisconnectReasonCode.MALFORMED_PACKET),
    ],
    ids=[
        "wildcard-response-topic",
        "control-in-response-topic",
        "del-in-content-type",
        "escape-in-user-property",
    ],
)
def test_property_strings_of_a_publish_are_checked(
    port: int, properties: dict[str, object], reason: int
) -> None:
    """[MQTT-3.3.2-14]: a response topic is a topic name; section 1.5.4: control characters in
    any string close the connection, as in 3.1.1, also on the codec's fast path (ASCII)."""
    c = client(port)
    if properties.get("response_topic") == "/reply/+":
        # mqtt5 refuses to encode it: a valid one, then the wildcard in its place.
        c.raw.send(mqtt5.PublishPacket("t", b"x", response_topic="/reply/x").write()
                   .replace(b"/reply/x", b"/reply/+"))  # fmt: skip
    else:
        c.send(mqtt5.PublishPacket("t", b"x", **properties))  # type: ignore[arg-type]
    assert c.disconnect_reason() == reason


# --- the flows of issue 21: each once broke the connection with an internal error -----------


@pytest.mark.parametrize("short", [True, False], ids=["two-byte-pubrec", "pubrec-with-reason"])
def test_a_qos2_subscriber_gets_its_message_and_the_flow_completes(port: int, short: bool) -> None:
    """Section 4.3.3: PUBLISH, PUBREC, PUBREL, PUBCOMP, whichever form the PUBREC takes (a
    reason code compared as an int once cut the subscriber off here)."""
    topic = uid("q2")
    sub = client(port)
    assert sub.subscribe(f(topic, Q2)) == [2]
    pub = client(port)
    pub.send(mqtt5.PublishPacket(topic, b"\x00\xff", qos=Q2, packet_id=9))
    pub.expect(mqtt5.PubRecPacket)
    pub.send(mqtt5.PubRelPacket(9))
    pub.expect(mqtt5.PubCompPacket)
    got = sub.publish()
    assert (got.payload, int(got.qos)) == (b"\x00\xff", 2)
    assert got.packet_id is not None
    if short:
        sub.raw.send(m.ack(m.PUBREC, got.packet_id))
    else:
        sub.send(mqtt5.PubRecPacket(got.packet_id, reason_code=mqtt5.PubRecReasonCode.SUCCESS,
                                    reason_str="ok"))  # fmt: skip
    pubrel = sub.expect(mqtt5.PubRelPacket)
    assert pubrel.packet_id == got.packet_id  # type: ignore[attr-defined]
    sub.send(mqtt5.PubCompPacket(got.packet_id))
    assert sub.barrier() == []  # nothing more: delivered once


def test_a_pubrec_with_an_error_ends_the_flow_and_frees_the_window(port: int) -> None:
    """Section 4.3.3: a PUBREC of 0x80 or more ends the QoS 2 flow: no PUBREL, and the
    packet id and its place in the receive maximum are free again."""
    topic = uid("refuse")
    sub = client(port, receive_max=1)
    assert sub.subscribe(f(topic, Q2)) == [2]
    pub = client(port)
    for n in (1, 2):
        pub.send(mqtt5.PublishPacket(topic, b"m%d" % n, qos=Q2, packet_id=n))
        pub.expect(mqtt5.PubRecPacket)
        pub.send(mqtt5.PubRelPacket(n))
        pub.expect(mqtt5.PubCompPacket)
    first = sub.publish()
    assert first.payload == b"m1"
    assert first.packet_id is not None
    sub.send(mqtt5.PubRecPacket(first.packet_id, reason_code=mqtt5.PubRecReasonCode.QUOTA_EXCEEDED))
    second = sub.publish()  # the window of one had room again
    assert second.payload == b"m2"
    assert not any(isinstance(p, mqtt5.PubRelPacket) for p in sub.barrier())


def test_a_pubrec_to_a_qos1_delivery_is_a_protocol_error_with_any_reason_code(port: int) -> None:
    """Section 4.3.2: PUBREC answers QoS 2 only; as in 3.1.1, whatever its reason code."""
    topic = uid("wrongkind")
    sub = client(port)
    assert sub.subscribe(f(topic, Q1)) == [1]
    pub = client(port)
    pub.send(mqtt5.PublishPacket(topic, b"x", qos=Q1, packet_id=1))
    got = sub.publish()
    assert got.packet_id is not None
    sub.send(
        mqtt5.PubRecPacket(got.packet_id, reason_code=mqtt5.PubRecReasonCode.UNSPECIFIED_ERROR)
    )
    assert sub.disconnect_reason() == mqtt5.DisconnectReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("pattern", "reason", "why"),
    [
        ("$share/g/t/#", mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, "with No Local set"),
        ("$share//t", mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, "invalid shared subscription"),
        (
            "$share/g",
            mqtt5.DisconnectReasonCode.MALFORMED_PACKET,
            "SUBSCRIBE '$share/g' with an empty topic filter",
        ),
    ],
    ids=["no-local", "no-share-name", "no-filter"],
)
def test_an_invalid_shared_subscription_closes_the_connection_and_subscribes_nothing(
    port: int, pattern: str, reason: int, why: str
) -> None:
    """[MQTT-3.8.3-4]: No Local on a shared subscription is a protocol error; so is a share
    without a name [MQTT-4.8.2-1]; without a filter it is a malformed filter. No filter of that
    SUBSCRIBE is kept (No Local once escaped as an internal error, after the first filter was
    subscribed)."""
    topic = uid("shared")
    c = client(port)
    c.send(mqtt5.SubscribePacket(1, [f(topic), f(pattern, no_local=pattern == "$share/g/t/#")]))
    assert c.disconnect_reason() == reason
    assert why in (c.disconnect.reason_str or "")
    listener = client(port)
    assert listener.subscribe(f(topic)) == [0]
    client(port).send(mqtt5.PublishPacket(topic, b"once"))
    assert listener.publish().payload == b"once"


@pytest.mark.parametrize(
    "properties",
    [
        {"response_topic": "fz/a"},
        {"content_type": "text"},
        {"user_properties": [("k", "v")]},
        {"correlation_data": b"id"},
    ],
    ids=["response-topic", "content-type", "user-property", "correlation-data"],
)
def test_a_property_running_past_the_property_list_is_malformed_and_never_reaches_the_codec(
    broker: tuple[int, Proc], properties: dict[str, object]
) -> None:
    """Section 2.2.2: a property ends inside the property list. Lengthened by three bytes,
    the last string of an ASCII list runs into a payload of invalid UTF-8, which ``mqtt5``
    read unchecked and panicked on (a Rust backtrace on the broker's stderr)."""
    port, proc = broker
    c = client(port)
    data = mqtt5.PublishPacket("t", b"\xff\xfe\x80\x81", qos=Q1, packet_id=3,
                               **properties).write()  # type: ignore[arg-type]  # fmt: skip
    index = data.index(b"\xff\xfe\x80\x81") - len(next(iter(_values(properties)))) - 1
    c.raw.send(data[:index] + bytes([data[index] + 3]) + data[index + 1 :])
    assert c.disconnect_reason() == mqtt5.DisconnectReasonCode.MALFORMED_PACKET
    assert "truncated property" in (c.disconnect.reason_str or "")
    assert client(port).barrier() == []
    assert "panicked" not in proc.err()


def _values(properties: dict[str, object]) -> list[bytes]:
    """The last string or binary of a property set, encoded: what its length byte precedes."""
    value = next(iter(properties.values()))
    if isinstance(value, list):
        return [value[-1][-1].encode()]
    return [value if isinstance(value, bytes) else str(value).encode()]
