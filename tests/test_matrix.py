"""The interoperability matrix: clients nobody here wrote, every version, every QoS, both ways.

Publishers and subscribers are paho-mqtt (3.1.1 and 5, in threads) and ``mosquitto_pub`` /
``mosquitto_sub`` (``-V 311`` and ``-V 5``, as processes). Every publisher kind, at QoS 0, 1
and 2, sends to every subscriber kind, subscribed at QoS 0, 1 and 2: 4 x 3 x 4 x 3 = 144 cells,
each on its own topic, all through one broker, exchanged once for the module and then checked
cell by cell. Our own echo_client stands in the middle in both versions and at every QoS.

Each cell proves: the payload arrives byte for byte (``\\x00`` and ``\\xff`` included), exactly
once, at the lower of the two QoS levels; both sides finished the flow (the publisher had its
PUBACK or PUBCOMP; the subscriber sent its PUBACK or PUBCOMP); and the broker logged no ERROR.
"Exactly once" is checked against a fence: after every publisher's flow is complete, a last
message goes to each subscriber; everything published before it was routed before it.
"""

from __future__ import annotations

import itertools
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mqtt5
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests import mqtt_raw as m
from tests.mqtt_raw import V5, RawClient
from tests.support import ECHO_READY, Proc, Spawner, free_port, tool, wait_until

KINDS = ["paho-3.1.1", "paho-5", "mosquitto-3.1.1", "mosquitto-5"]
QOS = [0, 1, 2]
CELLS = [
    (pub, pub_qos, sub, sub_qos)
    for pub, pub_qos, sub, sub_qos in itertools.product(KINDS, QOS, KINDS, QOS)
]
FENCE = b"fence"
LINE_BUFFERED = ["stdbuf", "-oL"]
"""mosquitto_sub's stdout is block-buffered when it is not a terminal; its lines are read live."""


def settle(predicate: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``predicate``; return whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def payload_of(topic: str) -> bytes:
    """A cell's payload: every awkward byte, then the topic, so each cell's is its own."""
    return b"\x00\xff\x80\r\n\x1b" + topic.encode() + b"\x00"


def topic_of(pub: str, pub_qos: int, sub: str, sub_qos: int) -> str:
    """The topic of one cell, under its subscriber's wildcard."""
    return f"mx/{sub}/{sub_qos}/{pub}/{pub_qos}"


def version(kind: str) -> str:
    """'3.1.1' or '5'."""
    return kind.rsplit("-", 1)[1]


def cell_id(cell: tuple[str, int, str, int]) -> str:
    """A cell's name: publisher, its QoS, subscriber, the subscription's QoS."""
    pub, pub_qos, sub, sub_qos = cell
    return f"{pub}-q{pub_qos}-to-{sub}-q{sub_qos}"


@dataclass
class Got:
    """What a subscriber received on one topic."""

    payloads: list[tuple[bytes, int]] = field(default_factory=list)


class PahoSubscriber:
    """A paho subscriber in its own network thread; it keeps every message by topic."""

    def __init__(self, port: int, kind: str, topic_filter: str, qos: int) -> None:
        """Connect, subscribe, and return once the SUBACK has granted ``qos``."""
        v5 = version(kind) == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"mx-sub-{kind}-{qos}",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        self.got: dict[str, Got] = {}
        self.lock = threading.Lock()
        subacked: queue.Queue[list[Any]] = queue.Queue()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: subacked.put(list(codes))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, f"{kind} CONNACK")
        self.client.subscribe(topic_filter, qos)
        codes = subacked.get(timeout=5)
        assert [getattr(c, "value", c) for c in codes] == [qos]

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self.lock:
            got = self.got.setdefault(message.topic, Got())
            got.payloads.append((bytes(message.payload), message.qos))

    def in_flight(self) -> int:
        """QoS 2 messages paho still holds for a PUBREL (paho's own table)."""
        return len(self.client._in_messages)

    def close(self) -> None:
        """Disconnect and stop the thread."""
        self.client.disconnect()
        self.client.loop_stop()


class MosquittoSubscriber:
    """``mosquitto_sub -d``: its debug lines show every packet of every flow."""

    def __init__(self, port: int, kind: str, topic_filter: str, qos: int, out: Path) -> None:
        """Start it, and return once it has printed the SUBACK."""
        self.out = out
        self.handle = out.open("wb")
        self.popen = subprocess.Popen(
            [*LINE_BUFFERED, tool("mosquitto_sub"), "-d", "-V",
             "311" if version(kind) == "3.1.1" else "5",
             "-p", str(port), "-i", f"mx-sub-{kind}-{qos}", "-q", str(qos), "-t", topic_filter,
             "-F", "MSG %q %t %x"],
            stdout=self.handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: "Subscribed (mid" in self.text(), 5, f"{kind} SUBACK")
            assert re.search(rf"Subscribed \(mid: \d+\): {qos}\b", self.text()), self.text()
        except BaseException:
            self.close()  # nobody else holds it yet: leave no process behind
            raise

    def text(self) -> str:
        """What it printed so far."""
        return self.out.read_text(errors="replace")

    @property
    def got(self) -> dict[str, Got]:
        """Every message it printed, by topic."""
        found: dict[str, Got] = {}
        for qos, topic, hexed in re.findall(r"^MSG (\d) (\S+) ([0-9a-f]*)$", self.text(), re.M):
            found.setdefault(topic, Got()).payloads.append((bytes.fromhex(hexed), int(qos)))
        return found

    def in_flight(self) -> int:
        """QoS 2 messages it received (PUBLISH) without sending their PUBCOMP."""
        text = self.text()
        received = set(re.findall(r"received PUBLISH \(d\d, q2, r\d, m(\d+),", text))
        completed = set(re.findall(r"sending PUBCOMP \(m(\d+)", text))
        return len(received - completed)

    def acknowledged(self) -> set[str]:
        """Message ids it answered with PUBACK (QoS 1)."""
        return set(re.findall(r"sending PUBACK \(m(\d+)", self.text()))

    def close(self) -> None:
        """Stop it."""
        self.popen.terminate()
        self.popen.wait(5)
        self.handle.close()


@dataclass
class Sent:
    """How a publisher's side of one cell ended."""

    completed: bool
    detail: str = ""


def paho_publisher(port: int, kind: str) -> paho.Client:
    """A connected paho publisher (its network thread running)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"mx-pub-{kind}",
        protocol=paho.MQTTv5 if version(kind) == "5" else paho.MQTTv311,
    )
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    wait_until(client.is_connected, 5, f"{kind} publisher CONNACK")
    return client


def mosquitto_publish(port: int, cell: tuple[str, int, str, int], tmp: Path) -> Sent:
    """One ``mosquitto_pub -d`` run for a cell; complete when it exits 0 having seen its flow
    end (PUBACK, or PUBCOMP)."""
    kind, qos = cell[0], cell[1]
    topic = topic_of(*cell)
    data = tmp / f"{topic.replace('/', '_')}.bin"
    data.write_bytes(payload_of(topic))
    done = subprocess.run(
        [tool("mosquitto_pub"), "-d", "-V", "311" if version(kind) == "3.1.1" else "5",
         "-p", str(port), "-q", str(qos), "-t", topic, "-f", str(data)],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    finished = {0: "sending PUBLISH", 1: "received PUBACK", 2: "received PUBCOMP"}[qos]
    ok = done.returncode == 0 and finished in done.stdout
    return Sent(ok, f"exit {done.returncode}: {done.stdout}{done.stderr}")


@dataclass
class Exchange:
    """Everything the matrix saw: per cell, what arrived and how the publisher ended."""

    got: dict[tuple[str, int, str, int], list[tuple[bytes, int]]]
    sent: dict[tuple[str, int, str, int], Sent]
    in_flight: dict[tuple[str, int], int]
    puback_missing: dict[tuple[str, int], int]
    broker: Proc
    paho_out: dict[str, int]
    fenced: dict[tuple[str, int], bool]
    """Whether each subscriber got the fence (one cut off by the broker did not)."""


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchange]:
    """Run the whole matrix once: subscribe every kind at every QoS, then publish every cell."""
    tmp = tmp_path_factory.mktemp("matrix")
    spawner = Spawner(tmp)
    port = free_port()
    broker = spawner.broker(port)
    subscribers: dict[tuple[str, int], PahoSubscriber | MosquittoSubscriber] = {}
    publishers: dict[str, paho.Client] = {}
    try:
        for sub, sub_qos in itertools.product(KINDS, QOS):
            wildcard = f"mx/{sub}/{sub_qos}/#"
            subscribers[sub, sub_qos] = (
                PahoSubscriber(port, sub, wildcard, sub_qos) if sub.startswith("paho")
                else MosquittoSubscriber(port, sub, wildcard, sub_qos, tmp / f"{sub}-{sub_qos}.out")
            )  # fmt: skip
        sent: dict[tuple[str, int, str, int], Sent] = {}
        for kind in KINDS[:2]:
            publishers[kind] = paho_publisher(port, kind)
        # paho publishers: every message, each waited for until its flow is complete.
        for cell in CELLS:
            pub, pub_qos, sub, sub_qos = cell
            if pub.startswith("paho"):
                topic = topic_of(*cell)
                info = publishers[pub].publish(topic, payload_of(topic), pub_qos)
                info.wait_for_publish(5)
                sent[cell] = Sent(info.is_published(), f"rc {info.rc}")
        # mosquitto_pub: a process per message, a few at a time.
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = {
                cell: pool.submit(mosquitto_publish, port, cell, tmp)
                for cell in CELLS
                if cell[0].startswith("mosquitto")
            }
            for cell, future in futures.items():
                sent[cell] = future.result()
        # The fence: every flow above is complete, so each subscriber gets the fence last. A
        # subscriber cut off never gets it: that is recorded, and fails its own cells.
        fenced: dict[tuple[str, int], bool] = {}
        for (sub, sub_qos), subscriber in subscribers.items():
            fence_topic = f"mx/{sub}/{sub_qos}/fence"
            publishers["paho-5"].publish(fence_topic, FENCE, 2).wait_for_publish(5)
            fenced[sub, sub_qos] = settle(lambda s=subscriber, t=fence_topic: t in s.got, 5)
        # A subscriber's last acknowledgements may still be on their way: wait, bounded.
        for subscriber in subscribers.values():
            settle(lambda s=subscriber: s.in_flight() == 0, 2)
        got = {
            cell: subscribers[cell[2], cell[3]].got.get(topic_of(*cell), Got()).payloads
            for cell in CELLS
        }
        in_flight = {key: s.in_flight() for key, s in subscribers.items()}
        puback_missing = {}
        for key, s in subscribers.items():
            if isinstance(s, MosquittoSubscriber):
                received = set(re.findall(r"received PUBLISH \(d\d, q1, r\d, m(\d+),", s.text()))
                puback_missing[key] = len(received - s.acknowledged())
        paho_out = {kind: len(c._out_messages) for kind, c in publishers.items()}
        yield Exchange(got, sent, in_flight, puback_missing, broker, paho_out, fenced)
    finally:
        for subscriber in subscribers.values():
            subscriber.close()
        for client in publishers.values():
            client.disconnect()
            client.loop_stop()
        spawner.cleanup()


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_delivered_once_byte_for_byte_at_the_lower_qos_and_both_flows_complete(
    exchange: Exchange, cell: tuple[str, int, str, int]
) -> None:
    pub, pub_qos, sub, sub_qos = cell
    topic = topic_of(*cell)
    sent = exchange.sent[cell]
    assert sent.completed, f"the publisher's flow did not complete: {sent.detail}"
    assert exchange.fenced[sub, sub_qos], "the subscriber never got the fence: cut off?"
    assert exchange.got[cell] == [(payload_of(topic), min(pub_qos, sub_qos))]
    assert exchange.in_flight[sub, sub_qos] == 0, "QoS 2 left waiting for PUBREL/PUBCOMP"
    assert exchange.puback_missing.get((sub, sub_qos), 0) == 0, "QoS 1 never acknowledged"
    if pub.startswith("paho"):
        assert exchange.paho_out[pub] == 0, "paho still holds unacknowledged messages"
    assert " ERROR " not in exchange.broker.err()


# --- our own echo_client in the middle --------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", QOS)
def test_the_echo_client_returns_binary_payloads_once_at_its_qos(
    spawn: Spawner, port: int, protocol: str, qos: int
) -> None:
    """echo_client between a paho publisher (QoS 2) and a paho subscriber (QoS 2): the echo
    comes back byte for byte, once, at the echo client's QoS."""
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), "--protocol", protocol,
                       "--qos", str(qos), "--ping-topic", "mx/ping", "--pong-topic", "mx/pong",
                       name="echo")  # fmt: skip
    echo.wait_for(r"Subscribed to mx/ping, mx/ping/\+\.")
    sub = PahoSubscriber(port, "paho-5", "mx/pong", 2)
    pub = paho_publisher(port, "paho-3.1.1")
    try:
        payloads = [b"\x00\xff\x80 one", b"\x00\xff\x80 two", FENCE]
        for payload in payloads:
            pub.publish("mx/ping", payload, 2).wait_for_publish(5)
        wait_until(lambda: len(sub.got.get("mx/pong", Got()).payloads) >= 3, 10, "3 echoes")
        assert sub.got["mx/pong"].payloads == [(p, qos) for p in payloads]
        wait_until(lambda: sub.in_flight() == 0, 5, "the subscriber's flows to complete")
    finally:
        sub.close()
        pub.disconnect()
        pub.loop_stop()
    assert " ERROR " not in echo.err()


# --- MQTT 5 properties, end to end, between independent clients ------------------------------


def test_mqtt5_properties_from_paho_reach_mosquitto_sub_with_a_topic_alias(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    """User properties, content type, payload format, response topic, correlation data and
    message expiry go through as published; the second message uses only the topic alias the
    first set up; the subscription identifier comes with each delivery."""
    spawn.broker(port)
    with (tmp_path / "sub.out").open("wb") as out:
        sub = subprocess.Popen(
            [*LINE_BUFFERED, tool("mosquitto_sub"), "-d", "-V", "5", "-p", str(port),
             "-t", "mx/props", "-q", "2",
             "-D", "subscribe", "subscription-identifier", "7", "-C", "2",
             "-F", "MSG %t|%C|%F|%R|%D|%E|%P|%S|%x"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def text() -> str:
        return (tmp_path / "sub.out").read_text(errors="replace")

    try:
        wait_until(lambda: "Subscribed (mid" in text(), 5, "mosquitto_sub's SUBACK")
        pub = paho_publisher(port, "paho-5")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("k", "v"), ("k", "w")]
        props.ContentType = "text/plain"
        props.PayloadFormatIndicator = 1
        props.ResponseTopic = "mx/reply"
        props.CorrelationData = b"corr"
        props.MessageExpiryInterval = 3600
        props.TopicAlias = 1
        pub.publish("mx/props", "héllo".encode(), 2, properties=props).wait_for_publish(5)
        alias_only = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        alias_only.TopicAlias = 1
        pub.publish("", b"\x00\xff", 1, properties=alias_only).wait_for_publish(5)
        assert sub.wait(10) == 0
        pub.disconnect()
        pub.loop_stop()
    finally:
        if sub.poll() is None:
            sub.kill()
    # mosquitto_sub prints a QoS 2 message at its PUBREL, a QoS 1 one at once: either may come
    # first, so they are told apart by payload.
    lines = {bytes.fromhex(line.rsplit("|", 1)[1]): line.split("|")
             for line in re.findall(r"^MSG (.*)$", text(), re.M)}  # fmt: skip
    assert len(lines) == 2
    first, second = lines["héllo".encode()], lines[b"\x00\xff"]
    assert first[:5] == ["mx/props", "text/plain", "1", "mx/reply", "corr"]
    assert 3598 <= int(first[5]) <= 3600  # the expiry left
    assert first[6].split() == ["k:v", "k:w"]
    assert first[7] == "7"
    assert second[0] == "mx/props"  # the alias was resolved to its topic
    assert second[7] == "7"


def test_mqtt5_properties_from_mosquitto_pub_reach_paho(spawn: Spawner, port: int) -> None:
    """The same the other way, with mosquitto_pub's ``-D publish`` properties."""
    spawn.broker(port)
    got: queue.Queue[Any] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="mx-props-sub",
                         protocol=paho.MQTTv5)  # fmt: skip
    client.on_message = lambda _c, _u, message: got.put(message)
    subacked = threading.Event()
    client.on_subscribe = lambda *_a: subacked.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 5, "paho CONNACK")
        sub_props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
        sub_props.SubscriptionIdentifier = 42
        client.subscribe("mx/props2", 2, properties=sub_props)
        assert subacked.wait(5)
        subprocess.run(
            [tool("mosquitto_pub"), "-V", "5", "-p", str(port), "-t", "mx/props2", "-q", "2",
             "-m", "payload", "-D", "publish", "user-property", "who", "mosquitto",
             "-D", "publish", "content-type", "application/x",
             "-D", "publish", "response-topic", "mx/back",
             "-D", "publish", "correlation-data", "c1",
             "-D", "publish", "message-expiry-interval", "600",
             "-D", "publish", "payload-format-indicator", "1"],
            check=True, timeout=10,
        )  # fmt: skip
        message = got.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    p = message.properties
    assert (message.payload, message.qos) == (b"payload", 2)
    assert p.UserProperty == [("who", "mosquitto")]
    assert (p.ContentType, p.ResponseTopic, p.CorrelationData) == ("application/x", "mx/back",
                                                                   b"c1")  # fmt: skip
    assert p.PayloadFormatIndicator == 1
    assert 598 <= p.MessageExpiryInterval <= 600
    assert p.SubscriptionIdentifier == [42]


def test_message_expiry_is_counted_down_while_a_message_waits(spawn: Spawner, port: int) -> None:
    """[MQTT-3.3.2-6]: the expiry forwarded is what is left of it. A retained message waits
    over a second; a subscriber then gets less than was published (mosquitto_pub in, paho out).
    [MQTT-3.3.2-5]: one whose expiry passed meanwhile is not delivered at all."""
    spawn.broker(port)
    for topic, expiry in (("mx/expiry/gone", "1"), ("mx/expiry/kept", "30")):
        subprocess.run(
            [tool("mosquitto_pub"), "-V", "5", "-p", str(port), "-t", topic, "-q", "1", "-r",
             "-m", topic.rsplit("/", 1)[1], "-D", "publish", "message-expiry-interval", expiry],
            check=True, timeout=10,
        )  # fmt: skip
    published = time.monotonic()
    # The property under test is time passing: wait until more than a second has.
    wait_until(lambda: time.monotonic() - published > 1.05, 3, "a second to pass", step=0.05)
    got: queue.Queue[Any] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = lambda _c, _u, message: got.put(message)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 5, "paho CONNACK")
        client.subscribe("mx/expiry/#", 1)
        message = got.get(timeout=5)
        # A fence: a live message after the retained ones; the expired one never came.
        client.publish("mx/expiry/live", b"live", 1).wait_for_publish(5)
        fence = got.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    assert message.payload == b"kept"
    assert message.retain
    assert message.properties.MessageExpiryInterval <= 29
    assert fence.payload == b"live"


# --- persistent sessions at QoS 2 --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["paho-3.1.1", "paho-5"])
def test_a_persistent_subscriber_away_gets_each_qos2_message_once_in_order(
    spawn: Spawner, port: int, kind: str
) -> None:
    """[MQTT-3.1.2-5], [MQTT-4.6.0-2]: QoS 2 messages published while a persistent subscriber
    is away wait for it; on its return it gets each exactly once, in the order published."""
    spawn.broker(port)
    v5 = version(kind) == "5"

    def connect() -> tuple[paho.Client, queue.Queue[Any]]:
        got: queue.Queue[Any] = queue.Queue()
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"mx-away-{kind}",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311, clean_session=None if v5 else False,
        )  # fmt: skip
        client.on_message = lambda _c, _u, message: got.put(message)
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 300
        client.connect("127.0.0.1", port, clean_start=False if v5 else 3, properties=props)
        client.loop_start()
        wait_until(client.is_connected, 5, f"{kind} CONNACK")
        return client, got

    client, _ = connect()
    subacked = threading.Event()
    client.on_subscribe = lambda *_a: subacked.set()
    client.subscribe("mx/away", 2)
    assert subacked.wait(5)
    client.disconnect()
    client.loop_stop()
    for n in range(5):
        subprocess.run(
            [tool("mosquitto_pub"), "-V", "5", "-p", str(port), "-t", "mx/away", "-q", "2",
             "-m", f"m{n}"],
            check=True, timeout=10,
        )  # fmt: skip
    client, got = connect()
    try:
        received = [got.get(timeout=5).payload for _ in range(5)]
        # A fence: a sixth message after the five; nothing may come between or again.
        subprocess.run(
            [tool("mosquitto_pub"), "-V", "5", "-p", str(port), "-t", "mx/away", "-q", "2",
             "-m", "fence"],
            check=True, timeout=10,
        )  # fmt: skip
        assert got.get(timeout=5).payload == b"fence"
        assert got.empty()
    finally:
        client.disconnect()
        client.loop_stop()
    assert received == [f"m{n}".encode() for n in range(5)]


def _raw(port: int, v5: bool, client_id: str) -> V5 | RawClient:
    """A raw client of either version, connected with a persistent session."""
    if v5:
        c = V5(port)
        assert c.connect(client_id, clean_start=False, session_expiry_interval=300).reason_code == 0
        return c
    raw = RawClient(port)
    raw.connect(client_id, clean=False)
    return raw


def _send(c: V5 | RawClient, packet: object, raw: bytes) -> None:
    """Send ``packet`` (MQTT 5) or ``raw`` (3.1.1), as the client speaks."""
    if isinstance(c, V5):
        c.send(packet)
    else:
        c.send(raw)


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_a_qos2_publish_dropped_between_pubrec_and_pubrel_completes_once_after_reconnect(
    spawn: Spawner, port: int, v5: bool
) -> None:
    """[MQTT-4.4.0-1], [MQTT-4.3.3-2]: the publisher had its PUBREC and lost the connection;
    it reconnects and sends PUBREL; the subscriber (paho) gets the message exactly once."""
    spawn.broker(port)
    sub = PahoSubscriber(port, "paho-5", "mx/cut-pub", 2)
    try:
        pub = _raw(port, v5, f"mx-cut-pub-{v5}")
        _send(pub, mqtt5.PublishPacket("mx/cut-pub", b"\x00once\xff", qos=mqtt5.QoS(2),
                                           packet_id=11),
              m.publish("mx/cut-pub", b"\x00once\xff", qos=2, packet_id=11))  # fmt: skip
        if isinstance(pub, V5):
            pub.expect(mqtt5.PubRecPacket)
            pub.raw.close()
        else:
            pub.expect(m.PUBREC)
            pub.close()
        pub = _raw(port, v5, f"mx-cut-pub-{v5}")
        _send(pub, mqtt5.PubRelPacket(11), m.ack(m.PUBREL, 11))
        if isinstance(pub, V5):
            pub.expect(mqtt5.PubCompPacket)
        else:
            pub.expect(m.PUBCOMP)
        wait_until(lambda: "mx/cut-pub" in sub.got, 5, "the message")
        # A fence from another publisher: nothing may come again before it.
        fence = paho_publisher(port, "paho-3.1.1")
        fence.publish("mx/cut-pub", FENCE, 2).wait_for_publish(5)
        wait_until(lambda: len(sub.got["mx/cut-pub"].payloads) >= 2, 5, "the fence")
        fence.disconnect()
        fence.loop_stop()
        assert sub.got["mx/cut-pub"].payloads == [(b"\x00once\xff", 2), (FENCE, 2)]
    finally:
        sub.close()


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_a_qos2_delivery_dropped_between_pubrec_and_pubrel_completes_once_after_reconnect(
    spawn: Spawner, port: int, v5: bool
) -> None:
    """[MQTT-4.4.0-1]: the subscriber sent PUBREC and lost the connection before PUBREL; on
    its return the broker sends PUBREL, not the PUBLISH again, and the flow ends with PUBCOMP."""
    spawn.broker(port)
    sub = _raw(port, v5, f"mx-cut-sub-{v5}")
    if isinstance(sub, V5):
        assert sub.subscribe(mqtt5.TopicFilter("mx/cut-sub", max_qos=mqtt5.QoS(2))) == [2]
    else:
        assert sub.subscribe(1, ("mx/cut-sub", 2)) == [2]
    pub = paho_publisher(port, "paho-5")
    pub.publish("mx/cut-sub", b"\x00once\xff", 2).wait_for_publish(5)
    if isinstance(sub, V5):
        got = sub.publish()
        assert got.payload == b"\x00once\xff"
        packet_id = got.packet_id
        assert packet_id is not None
        sub.send(mqtt5.PubRecPacket(packet_id))
        sub.expect(mqtt5.PubRelPacket)
        sub.raw.close()
    else:
        message = m.decode_publish(sub.expect(m.PUBLISH))
        assert message.payload == b"\x00once\xff"
        assert message.packet_id is not None
        packet_id = message.packet_id
        sub.send(m.ack(m.PUBREC, packet_id))
        sub.expect(m.PUBREL)
        sub.close()
    sub = _raw(port, v5, f"mx-cut-sub-{v5}")
    if isinstance(sub, V5):
        pubrel = sub.expect(mqtt5.PubRelPacket)
        assert pubrel.packet_id == packet_id  # type: ignore[attr-defined]
        sub.send(mqtt5.PubCompPacket(packet_id))
        before: list[object] = sub.barrier()
    else:
        assert sub.expect(m.PUBREL).packet_id == packet_id
        sub.send(m.ack(m.PUBCOMP, packet_id))
        before = list(sub.barrier())
    pub.disconnect()
    pub.loop_stop()
    assert before == []  # no PUBLISH again: delivered once


# --- our clients against another broker ---------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_our_clients_at_qos2_against_mosquitto_answer_every_ping_exactly_once(
    spawn: Spawner, mosquitto: int, protocol: str
) -> None:
    port = str(mosquitto)
    echo = spawn.start("echo_client", "--port", port, "--qos", "2", "--protocol", protocol,
                       name="echo")  # fmt: skip
    echo.wait_for(ECHO_READY)
    result = spawn.run("ping_client", "--port", port, "--qos", "2", "--protocol", protocol,
                       "--count", "20", "--interval", "0.02")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b20 sent, 20 received, 0 lost\b", result.stdout), result.stdout
    assert " 0 duplicate," in result.stdout
    assert "falling back" not in result.stderr + echo.err()
    assert " ERROR " not in result.stderr + echo.err()


# --- the matrix as docs/conformance.md shows it -------------------------------------------------


def conformance_table() -> str:
    """The matrix as a Markdown grid: publishers down, subscriptions across, delivered QoS."""
    columns = [(kind, qos) for kind in KINDS for qos in QOS]
    head = "| publisher, QoS \\\\ subscriber, QoS | " + " | ".join(
        f"{kind.replace('-', ' ')} q{qos}" for kind, qos in columns
    )
    lines = [head + " |", "|---" * (len(columns) + 1) + "|"]
    for pub, pub_qos in columns:
        cells = [f"q{min(pub_qos, sub_qos)} ✓" for _, sub_qos in columns]
        lines.append(f"| {pub.replace('-', ' ')} q{pub_qos} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_docs_conformance_shows_this_matrix() -> None:
    """docs/conformance.md shows every cell this module checks, with the QoS it delivers."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    assert conformance_table() in doc, "docs/conformance.md is out of date; paste:\n" + (
        conformance_table()
    )
