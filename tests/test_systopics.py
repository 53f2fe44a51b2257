"""$SYS topics: the broker's figures under mosquitto's names, retained, and moving with use."""

from __future__ import annotations

import time

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import Spawner


def latest(client: RawClient, topic: str, wanted: int, within: float = 10.0) -> int:
    """Read $SYS updates until ``topic`` reaches ``wanted``; return its value."""
    deadline = time.monotonic() + within
    value = -1
    while time.monotonic() < deadline:
        message = client.message(max(0.1, deadline - time.monotonic()))
        if message.topic == topic:
            value = int(message.payload)
            if value >= wanted:
                return value
    raise AssertionError(f"{topic} stayed at {value}, below {wanted}")


def test_sys_topics_count_what_happens(spawn: Spawner, port: int) -> None:
    spawn.broker(port, "--sys-interval", "0.2")
    watcher = RawClient(port)
    assert watcher.connect("sys-watcher") == (False, 0)
    assert watcher.subscribe(1, ("$SYS/broker/#", 0)) == [0]
    first = watcher.message(5)  # retained ones first, then an update each 0.2 s
    assert first.topic.startswith("$SYS/broker/")
    publisher = RawClient(port)
    assert publisher.connect("sys-publisher") == (False, 0)
    publisher.send(b"".join(m.publish("t/sys", b"x") for _ in range(5)))
    assert publisher.barrier() == []
    assert latest(watcher, "$SYS/broker/messages/received", 5) >= 5
    assert latest(watcher, "$SYS/broker/clients/connected", 2) == 2
    late = RawClient(port)
    assert late.connect("sys-late") == (False, 0)
    assert late.subscribe(1, ("$SYS/broker/version", 0)) == [0]
    version = late.message(5)  # retained: there at once
    assert version.retain
    assert version.payload.startswith(b"mqtt-pingpong broker (amqtt ")


def test_a_plain_wildcard_does_not_see_sys(spawn: Spawner, port: int) -> None:
    """[MQTT-4.7.2-1]: '#' does not match topics that start with '$'."""
    spawn.broker(port, "--sys-interval", "0.1")
    everything = RawClient(port)
    assert everything.connect("hash") == (False, 0)
    assert everything.subscribe(1, ("#", 0)) == [0]
    sys = RawClient(port)
    assert sys.connect("sys") == (False, 0)
    assert sys.subscribe(1, ("$SYS/broker/uptime", 0)) == [0]
    sys.message(5)
    sys.message(5)  # at least one update went out meanwhile
    assert everything.barrier() == []


def test_sys_topics_are_there_right_after_start(spawn: Spawner, port: int) -> None:
    """As mosquitto: `mosquitto_sub -t '$SYS/#'` right after start prints at once, not after
    the first interval (10 s by default)."""
    spawn.broker(port)
    watcher = RawClient(port)
    assert watcher.connect("sys-early") == (False, 0)
    assert watcher.subscribe(1, ("$SYS/broker/version", 0)) == [0]
    started = time.monotonic()
    message = watcher.message(3)
    assert message.retain
    assert message.payload.startswith(b"mqtt-pingpong broker")
    assert time.monotonic() - started < 3
