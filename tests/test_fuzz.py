"""Random well-formed MQTT 5 and 3.1.1 sequences from three clients against one broker.

A hypothesis state machine drives three raw clients over real sockets: each connects in either
version (clean or persistent, a client id from a small pool so that sessions are taken over and
resumed), subscribes (wildcards, shared subscriptions, No Local, retain handling, subscription
identifiers), publishes at every QoS with random properties and topic aliases, acknowledges
what it receives with random reason codes (errors included) or not at all, unsubscribes, pings,
says DISCONNECT with a random reason, or just drops the connection. One packet in twenty has one
byte changed. After each sequence every client's packets have been handled (a PINGREQ answered
behind them) and the broker must have logged no internal error, no panic, no traceback, nothing
on stderr that is not a log line, and no ERROR; at the end it still serves a round trip.

The run is bounded: a fixed number of sequences (``FUZZ_EXAMPLES``, default 500) of at most 30
steps each, a few seconds in all.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import mqtt5
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests import mqtt_raw as m
from tests.support import Proc, Spawner, free_port, wait_until

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING) +broker: ")

CLIENT_IDS = ["fz-a", "fz-b", "fz-c", ""]
TOPICS = ["fz/a", "fz/b", "fz/a/deep", "other"]
FILTERS = ["fz/a", "fz/#", "+/a", "fz/+/deep", "#", "$share/g/fz/#", "$share/h/+/a"]
TEXT = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn")),
            max_size=8),
)  # fmt: skip
DAMAGE = ("none",) * 18 + ("byte", "property")
"""One packet in twenty is damaged: one byte changed, or (an MQTT 5 PUBLISH) one byte of its
property list raised a little, which most often makes a length run too far."""
PAYLOAD = st.one_of(st.binary(max_size=12), st.just(b"\xff\xfe\x80bad"))


def _codes(kind: type) -> list[object]:
    """Every reason code of one of mqtt5's reason-code enums (they are not iterable)."""
    return [getattr(kind, n) for n in dir(kind) if n.isupper() and not n.startswith("_")]


PUBACK_CODES = _codes(mqtt5.PubAckReasonCode)
PUBREC_CODES = _codes(mqtt5.PubRecReasonCode)
PUBCOMP_CODES = _codes(mqtt5.PubCompReasonCode)
PUBREL_CODES = _codes(mqtt5.PubRelReasonCode)
DISCONNECT_CODES = [
    mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION,
    mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE,
    mqtt5.DisconnectReasonCode.UNSPECIFIED_ERROR,
    mqtt5.DisconnectReasonCode.MESSAGE_RATE_TOO_HIGH,
]


_SIZES = {0x01: 1, 0x02: 4, 0x23: 2}
"""The fixed-size properties a PUBLISH may carry (payload format, expiry, topic alias)."""


def _nudge_property(data: bytes, qos: int, seed: int) -> bytes:
    """Lengthen one string or binary property of an MQTT 5 PUBLISH by a few bytes.

    Its length then runs past the property list, into the payload, which is what the codec
    reads unchecked. A PUBLISH without such a property is returned unchanged.
    """
    header = 2
    while data[header - 1] & 0x80:
        header += 1
    start = header + 2 + (data[header] << 8 | data[header + 1]) + (2 if qos else 0)
    if data[start] & 0x80:
        return data
    offset, end, lengths = start + 1, start + 1 + data[start], []
    while offset < end:
        ident = data[offset]
        offset += 1
        if ident in _SIZES:
            offset += _SIZES[ident]
            continue
        for _ in range(2 if ident == 0x26 else 1):  # a user property is two strings
            lengths.append(offset + 1)  # the low byte of the length
            offset += 2 + (data[offset] << 8 | data[offset + 1])
    if not lengths:
        return data
    index = lengths[seed % len(lengths)]
    return data[:index] + bytes([(data[index] + 1 + (seed >> 4) % 8) & 0xFF]) + data[index + 1 :]


class Peer:
    """One raw client: its socket, its version, and what it has received but not answered."""

    def __init__(self, port: int, version: int) -> None:
        """Open the TCP connection."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.version = version
        self.buffer = b""
        self.closed = False
        self.aliases: set[int] = set()

    def send(self, data: bytes) -> None:
        """Send bytes; a connection the broker closed is noted, not an error."""
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def poll(self) -> list[tuple[int, int, bytes]]:
        """Read what has arrived without waiting; return whole packets (kind, flags, body)."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    break
                self.buffer += chunk
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(True)
        return self._frames()

    def _frames(self) -> list[tuple[int, int, bytes]]:
        out: list[tuple[int, int, bytes]] = []
        while len(self.buffer) >= 2:
            length, shift, index = 0, 0, 1
            while index < len(self.buffer) and index < 5:
                byte = self.buffer[index]
                length |= (byte & 0x7F) << shift
                index += 1
                if not byte & 0x80:
                    break
                shift += 7
            else:
                return out
            if len(self.buffer) < index + length:
                return out
            first = self.buffer[0]
            out.append((first >> 4, first & 0x0F, self.buffer[index : index + length]))
            self.buffer = self.buffer[index + length :]
        return out

    def barrier(self, timeout: float = 5.0) -> None:
        """Wait until the broker has handled everything sent so far (or closed the link)."""
        self.send(m.packet(m.PINGREQ, 0, b""))
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.05)
        while not self.closed and time.monotonic() < deadline:
            if any(kind == m.PINGRESP for kind, _, _ in self._frames()):
                return
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.buffer += chunk
        if not self.closed:
            raise AssertionError("the broker did not answer a PINGREQ within 5 s")

    def close(self) -> None:
        """Close the socket (no DISCONNECT)."""
        self.closed = True
        self.sock.close()


class BrokerFuzz(RuleBasedStateMachine):
    """Three clients, random well-formed traffic, a broker that must stay well."""

    port = 0
    broker: Proc | None = None
    checked = 0
    """How far into the broker's stderr the previous sequences were checked."""

    def __init__(self) -> None:
        """No client connected yet."""
        super().__init__()
        self.peers: list[Peer | None] = [None, None, None]
        self.packet_id = 0

    # --- helpers --------------------------------------------------------------------------

    def _pid(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    def _send(self, slot: int, data: bytes, corrupt: int | None = None) -> None:
        peer = self.peers[slot]
        if peer is None:
            return
        header = 2
        while header < len(data) and data[header - 1] & 0x80:
            header += 1
        if corrupt is not None and len(data) > header:
            # One byte of the body changed: the packet keeps its length, so the broker reads it
            # whole (a changed length would only make it wait for more).
            # Mostly among the first bytes, where the topic's and the properties' lengths are,
            # and mostly nudged up a little, which turns a length into one that runs too far.
            span = len(data) - header if corrupt & 0x100 else min(len(data) - header, 24)
            index = header + (corrupt >> 9) % span
            value = corrupt & 0xFF if corrupt & 0x200 else data[index] + 1 + (corrupt & 7)
            data = data[:index] + bytes([value & 0xFF]) + data[index + 1 :]
        peer.send(data)

    def _live(self, slot: int) -> Peer:
        """The slot's client; one the broker closed (or that dropped) connects again first."""
        peer = self.peers[slot]
        if peer is None or peer.closed:
            version = 5 if slot != 1 else 4
            self.connect(slot=slot, version=version, client=slot, clean=True, expiry=0, will=False)
            peer = self.peers[slot]
        assert peer is not None
        return peer

    # --- rules ----------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        """Begin with one client of each version connected."""
        self.connect(slot=0, version=5, client=0, clean=True, expiry=0, will=False)
        self.connect(slot=1, version=4, client=1, clean=True, expiry=0, will=False)

    @rule(
        slot=st.integers(0, 2),
        version=st.sampled_from([4, 5]),
        client=st.integers(0, len(CLIENT_IDS) - 1),
        clean=st.booleans(),
        expiry=st.sampled_from([0, 0, 5, 0xFFFFFFFF]),
        will=st.booleans(),
    )
    def connect(
        self, *, slot: int, version: int, client: int, clean: bool, expiry: int, will: bool
    ) -> None:
        """Connect (again) in slot ``slot``: the previous connection there is dropped."""
        old = self.peers[slot]
        if old is not None:
            old.close()
        peer = Peer(self.port, version)
        self.peers[slot] = peer
        client_id = CLIENT_IDS[client]
        if version == 5:
            last = mqtt5.Will("fz/will", payload=b"gone", qos=mqtt5.QoS.AT_LEAST_ONCE,
                              user_properties=[("k", "v")]) if will else None  # fmt: skip
            peer.send(
                mqtt5.ConnectPacket(
                    client_id, clean_start=clean, session_expiry_interval=expiry, will=last,
                    keep_alive=60, receive_max=3, topic_alias_max=4,
                ).write()
            )  # fmt: skip
        else:
            peer.send(m.connect(client_id or "", clean=clean or not client_id, keepalive=60,
                                will=("fz/will", b"gone", 1, False) if will else None))  # fmt: skip

    @rule(
        slot=st.integers(0, 2),
        filters=st.lists(st.sampled_from(FILTERS), min_size=1, max_size=3, unique=True),
        qos=st.integers(0, 2),
        no_local=st.booleans(),
        retain_handling=st.integers(0, 2),
        subscription_id=st.one_of(st.none(), st.integers(1, 1000)),
        damage=st.sampled_from(DAMAGE),
        seed=st.integers(0, 1 << 20),
    )
    def subscribe(
        self, *, slot: int, filters: list[str], qos: int, no_local: bool, retain_handling: int,
        subscription_id: int | None, damage: str, seed: int,
    ) -> None:  # fmt: skip
        """SUBSCRIBE to one to three filters."""
        peer = self._live(slot)
        if peer.version == 5:
            wanted = [
                mqtt5.TopicFilter(f, max_qos=mqtt5.QoS(qos), no_local=no_local,
                                  retain_handling=mqtt5.RetainHandling(retain_handling))
                for f in filters
            ]  # fmt: skip
            data = mqtt5.SubscribePacket(self._pid(), wanted,
                                         subscription_id=subscription_id).write()  # fmt: skip
        else:
            data = m.subscribe(self._pid(), *((f, qos) for f in filters if "$share" not in f))
            if all("$share" in f for f in filters):
                data = m.subscribe(self._pid(), ("fz/#", qos))
        self._send(slot, data, seed if damage != "none" else None)

    @rule(
        slot=st.integers(0, 2),
        topic=st.sampled_from(TOPICS),
        qos=st.integers(0, 2),
        retain=st.booleans(),
        payload=PAYLOAD,
        props=st.fixed_dictionaries(
            {},
            optional={
                "user_properties": st.lists(st.tuples(TEXT, TEXT), max_size=2),
                "content_type": TEXT,
                "response_topic": st.sampled_from(TOPICS),
                "correlation_data": st.binary(max_size=6),
                "message_expiry_interval": st.integers(0, 100),
                "payload_format_indicator": st.integers(0, 1),
            },
        ),
        alias=st.one_of(st.none(), st.integers(1, 4)),
        use_alias_only=st.booleans(),
        damage=st.sampled_from(DAMAGE),
        seed=st.integers(0, 1 << 20),
    )
    def publish(
        self, *, slot: int, topic: str, qos: int, retain: bool, payload: bytes,
        props: dict[str, object], alias: int | None, use_alias_only: bool, damage: str,
        seed: int,
    ) -> None:  # fmt: skip
        """PUBLISH at any QoS; MQTT 5 with random properties and topic aliases."""
        peer = self._live(slot)
        packet_id = self._pid() if qos else None
        if peer.version == 5:
            name = topic
            if alias is not None:
                if use_alias_only and alias in peer.aliases:
                    name = ""
                peer.aliases.add(alias)
            data = mqtt5.PublishPacket(
                name, payload, qos=mqtt5.QoS(qos), retain=retain, packet_id=packet_id,
                topic_alias=alias, **props,  # type: ignore[arg-type]
            ).write()  # fmt: skip
        else:
            data = m.publish(topic, payload, qos=qos, packet_id=packet_id or 0, retain=retain)
        if damage == "property" and peer.version == 5:
            self._send(slot, _nudge_property(data, qos, seed))
        else:
            self._send(slot, data, seed if damage != "none" else None)

    @rule(slot=st.integers(0, 2), picks=st.lists(st.integers(0, 99), min_size=8, max_size=8))
    def acknowledge(self, *, slot: int, picks: list[int]) -> None:
        """Answer what has arrived: acks with random reason codes, or none at all.

        ``picks`` are drawn up front (what arrives depends on the broker, not on hypothesis):
        the n-th packet answered uses the n-th pick, in turn.
        """
        peer = self._live(slot)
        v5 = peer.version == 5
        turn = iter(picks * 64)

        def code(codes: list[object]) -> Any:
            return codes[next(turn) % len(codes)]

        for kind, flags, body in peer.poll():
            out: bytes | None = None
            if kind == m.PUBLISH and (flags >> 1) & 3:
                offset = 2 + struct.unpack("!H", body[:2])[0]
                packet_id = struct.unpack("!H", body[offset : offset + 2])[0]
                if next(turn) % 10 == 0:
                    continue  # left unacknowledged
                if (flags >> 1) & 3 == 1:
                    out = (mqtt5.PubAckPacket(packet_id, reason_code=code(PUBACK_CODES)).write()
                           if v5 else m.ack(m.PUBACK, packet_id))  # fmt: skip
                else:
                    out = (mqtt5.PubRecPacket(packet_id, reason_code=code(PUBREC_CODES)).write()
                           if v5 else m.ack(m.PUBREC, packet_id))  # fmt: skip
            elif kind == m.PUBREL and len(body) >= 2:
                packet_id = struct.unpack("!H", body[:2])[0]
                out = (mqtt5.PubCompPacket(packet_id, reason_code=code(PUBCOMP_CODES)).write()
                       if v5 else m.ack(m.PUBCOMP, packet_id))  # fmt: skip
            elif kind == m.PUBREC and len(body) >= 2:
                packet_id = struct.unpack("!H", body[:2])[0]
                out = (mqtt5.PubRelPacket(packet_id, reason_code=code(PUBREL_CODES)).write()
                       if v5 else m.ack(m.PUBREL, packet_id))  # fmt: skip
            if out is not None:
                peer.send(out)

    @rule(slot=st.integers(0, 2), packet_id=st.integers(1, 20), kind=st.integers(4, 7))
    def stray_ack(self, *, slot: int, packet_id: int, kind: int) -> None:
        """An acknowledgement for a packet id that may be in flight, of any kind."""
        self._live(slot).send(m.ack(kind, packet_id))

    @rule(slot=st.integers(0, 2), filters=st.lists(st.sampled_from(FILTERS), min_size=1,
                                                   max_size=2))  # fmt: skip
    def unsubscribe(self, *, slot: int, filters: list[str]) -> None:
        """UNSUBSCRIBE from filters, subscribed or not."""
        peer = self._live(slot)
        if peer.version == 5:
            peer.send(mqtt5.UnsubscribePacket(self._pid(), filters).write())
        else:
            plain = [f for f in filters if "$share" not in f] or ["fz/a"]
            peer.send(m.unsubscribe(self._pid(), *plain))

    @rule(slot=st.integers(0, 2), code=st.sampled_from(DISCONNECT_CODES), expiry=st.booleans())
    def disconnect(self, *, slot: int, code: mqtt5.DisconnectReasonCode, expiry: bool) -> None:
        """Say DISCONNECT (MQTT 5: with a reason, and maybe a new session expiry)."""
        peer = self._live(slot)
        if peer.version == 5:
            peer.send(mqtt5.DisconnectPacket(reason_code=code,
                                             session_expiry_interval=0 if expiry else None,
                                             ).write())  # fmt: skip
        else:
            peer.send(m.packet(m.DISCONNECT, 0, b""))

    @precondition(lambda self: any(p is not None for p in self.peers))
    @rule(slot=st.integers(0, 2))
    def drop(self, *, slot: int) -> None:
        """Drop the connection without a word (its will is due)."""
        peer = self.peers[slot]
        if peer is not None:
            peer.close()
            self.peers[slot] = None

    def teardown(self) -> None:
        """Wait until the broker has handled every packet, then check what it printed."""
        try:
            for peer in self.peers:
                if peer is not None and not peer.closed:
                    peer.barrier()
        finally:
            for peer in self.peers:
                if peer is not None:
                    peer.close()
        assert self.broker is not None
        assert self.broker.popen.poll() is None, "the broker died"
        text = self.broker.err()
        whole = text.rfind("\n") + 1  # the broker may be in the middle of a line
        fresh, BrokerFuzz.checked = text[BrokerFuzz.checked : whole], whole
        bad = [line for line in fresh.splitlines() if not LOG_LINE.match(line)]
        assert not bad, "the broker printed:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="module")
def fuzzed_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Proc]]:
    """One broker for the whole fuzz run, with a small inflight window to fill."""
    spawner = Spawner(tmp_path_factory.mktemp("fuzz"))
    port = free_port()
    proc = spawner.broker(port, "--max-inflight", "3", "--max-queued", "20")
    yield port, proc
    spawner.cleanup()


def test_random_well_formed_sequences_leave_the_broker_well(
    fuzzed_broker: tuple[int, Proc],
) -> None:
    port, proc = fuzzed_broker
    BrokerFuzz.port, BrokerFuzz.broker, BrokerFuzz.checked = port, proc, 0
    run_state_machine_as_test(
        BrokerFuzz,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    # Afterwards the broker still serves a round trip, in both versions.
    sub, pub = m.RawClient(port), m.RawClient(port)
    sub.connect("fz-after-sub")
    assert sub.subscribe(1, ("fz/after", 1)) == [1]
    pub.connect("fz-after-pub")
    pub.send(m.publish("fz/after", b"\x00still\xff", qos=1, packet_id=7))
    pub.expect(m.PUBACK)
    message = sub.message()
    assert (message.topic, message.payload) == ("fz/after", b"\x00still\xff")
    wait_until(lambda: proc.popen.poll() is None, 1, "the broker to be alive")
