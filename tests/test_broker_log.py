"""The broker's log says what happened: how a client went, and what arrived on the wrong port."""

from __future__ import annotations

import socket

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import Spawner


def test_a_vanished_client_and_a_goodbye_are_told_apart(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port)
    lost = RawClient(port)
    assert lost.connect("vanishes", will=("status/vanishes", b"gone", 0, False)) == (False, 0)
    lost.close()  # no DISCONNECT: the will is due
    broker.wait_for(r"Client vanishes disconnected from \S+: connection lost \(no DISCONNECT\); "
                    r"will published on status/vanishes\.")  # fmt: skip
    polite = RawClient(port)
    assert polite.connect("leaves", will=("status/leaves", b"gone", 0, False)) == (False, 0)
    polite.send(m.DISCONNECT_PACKET)
    broker.wait_for(r"Client leaves disconnected from \S+: it sent DISCONNECT\.")
    assert "will published on status/leaves" not in broker.err()


def test_a_client_closed_by_the_broker_says_why(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port)
    bad = RawClient(port)
    assert bad.connect("breaks") == (False, 0)
    bad.send(m.publish("a/+", b"x"))  # a wildcard in a topic name: a protocol violation
    broker.wait_for(r"Client breaks closed: PUBLISH topic 'a/\+' has a wildcard .*\n.*"
                    r"Client breaks disconnected from \S+: closed by the broker\.")  # fmt: skip


def test_an_http_request_on_the_mqtt_port_is_told_what_the_port_is(
    spawn: Spawner, port: int
) -> None:
    broker = spawn.broker(port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"This is an MQTT port" in answer
    broker.wait_for(r"Closed \S+: an HTTP request \(GET /mqtt HTTP/1\.1\) on the MQTT TCP port; "
                    r"MQTT over WebSockets is not enabled on this broker\.")  # fmt: skip
    assert "first packet is" not in broker.err()
    # And the broker goes on serving MQTT.
    assert RawClient(port).connect("after-http") == (False, 0)
