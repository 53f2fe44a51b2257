"""broker/connect.py in memory: a CONNECT of either version becomes one request, or a refusal."""

from __future__ import annotations

import mqtt5
import pytest

from broker import connect
from broker.framing import Framer
from broker.protocol import Frame, ProtocolViolation
from broker.settings import Limits
from tests import mqtt_raw as m

LIMITS = Limits(max_inflight=20, max_keepalive=600)


def frame_of(data: bytes) -> Frame:
    """The one whole frame of ``data``."""
    framer = Framer(1 << 20)
    framer.feed(data)
    frame = framer.next_frame()
    assert frame is not None
    return frame


def test_a_311_connect_is_a_request_with_the_brokers_window() -> None:
    request = connect.read(frame_of(m.connect("a", keepalive=30)), LIMITS, now=0.0)
    assert isinstance(request, connect.Request)
    assert (request.v5, request.window, request.connect.client_id) == (False, 20, "a")
    assert request.connect.keep_alive == 30
    assert connect.connack(request, LIMITS, present=True, assigned=None) == b"\x20\x02\x01\x00"


def test_an_mqtt5_connect_brings_its_limits_and_gets_a_server_keep_alive() -> None:
    will = mqtt5.Will("w", payload=b"bye", will_delay_interval=5, content_type="text")
    packet = mqtt5.ConnectPacket("b", keep_alive=0, receive_max=3, max_packet_size=500,
                                 session_expiry_interval=60, will=will)  # fmt: skip
    request = connect.read(frame_of(packet.write()), LIMITS, now=100.0)
    assert isinstance(request, connect.Request)
    assert (request.v5, request.window, request.expiry, request.max_out) == (True, 3, 60, 500)
    assert request.connect.keep_alive == request.server_keep_alive == 600  # asked for none
    assert request.will_delay == 5
    assert request.will_props is not None
    assert request.will_props.content_type == "text"
    reply, _ = mqtt5.read(
        memoryview(connect.connack(request, LIMITS, present=False, assigned="auto-1"))
    )
    assert isinstance(reply, mqtt5.ConnAckPacket)
    assert (reply.server_keep_alive, reply.assigned_client_id) == (600, "auto-1")
    assert reply.topic_alias_max == connect.TOPIC_ALIAS_MAXIMUM


@pytest.mark.parametrize(
    ("data", "reply", "why"),
    [
        (m.connect("c", level=3), b"\x20\x02\x00\x01", "this broker speaks MQTT 3.1.1 and 5.0"),
        (m.connect("c", level=6), b"\x20\x03\x00\x84\x00", "this broker speaks MQTT 3.1.1 and 5.0"),
        (m.connect("", clean=False), b"\x20\x02\x00\x02", "empty client id without clean session"),
        (mqtt5.ConnectPacket("d", authentication_method="SCRAM").write(), None,
         "authentication method 'SCRAM' is not offered"),
    ],
    ids=["level-3", "level-6", "empty-id-persistent", "enhanced-auth"],
)  # fmt: skip
def test_what_is_refused_before_authentication(data: bytes, reply: bytes | None, why: str) -> None:
    refusal = connect.read(frame_of(data), LIMITS, now=0.0)
    assert isinstance(refusal, connect.Refusal)
    assert why in refusal.why
    if reply is not None:
        assert refusal.reply == reply
    else:
        assert refusal.reply is not None
        answer, _ = mqtt5.read(memoryview(refusal.reply))
        assert isinstance(answer, mqtt5.ConnAckPacket)
        assert answer.reason_code == mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD


def test_a_malformed_connect_is_a_protocol_violation() -> None:
    good = m.connect("e", username="u")
    with pytest.raises(ProtocolViolation):
        connect.read(frame_of(good[:-1] + b"\xff"), LIMITS, now=0.0)  # truncated user name


def test_a_client_that_fails_to_log_in_is_told_in_its_version() -> None:
    old = connect.read(frame_of(m.connect("f")), LIMITS, now=0.0)
    new = connect.read(frame_of(mqtt5.ConnectPacket("g", username="u").write()), LIMITS, now=0.0)
    assert isinstance(old, connect.Request)
    assert isinstance(new, connect.Request)
    assert connect.not_authorized(old) == b"\x20\x02\x00\x05"
    answer, _ = mqtt5.read(memoryview(connect.not_authorized(new)))
    assert isinstance(answer, mqtt5.ConnAckPacket)
    assert answer.reason_code == mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD
