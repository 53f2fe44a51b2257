"""The QoS flows in memory, the h11 way: no sockets, no clock but a number, random orders.

A hypothesis state machine delivers QoS 0/1/2 messages to one session, answers its PUBLISHes
in any order (PUBACK, PUBREC then PUBCOMP, a refused MQTT 5 PUBREC, or nothing), and drops
the connection at any point (a new :class:`Flows` on the same session, as on reconnect). At
every step the window holds; at the end, once everything is answered, every QoS 1/2 message
was sent, first in the order delivered, and ended exactly once, and nothing is left waiting.
"""

from __future__ import annotations

import re
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.engine import Engine, Incoming, Message, Session
from broker.flows import Flows
from broker.protocol import ProtocolViolation

WINDOW = 3


class Queue:
    """The session's queue, as the hub keeps it (unbounded here: the hub's bound is tested
    on the wire in test_limits)."""

    def __init__(self) -> None:
        """Empty."""
        self.items: deque[Message] = deque()
        self.drains = 0

    def put(self, session: Session, message: Message) -> None:  # noqa: ARG002 - one session
        """Keep it."""
        self.items.append(message)

    def take(self, session: Session) -> Message | None:  # noqa: ARG002
        """The oldest."""
        return self.items.popleft() if self.items else None

    def size(self, session: Session) -> int:  # noqa: ARG002
        """How many."""
        return len(self.items)

    def drained(self, client_id: str) -> None:  # noqa: ARG002
        """Counted."""
        self.drains += 1


def encode(message: Message, packet_id: int | None, dup: bool) -> bytes:
    """A readable stand-in for a PUBLISH: what the test checks of it."""
    return f"PUBLISH {message.data.decode()} q{message.qos} id={packet_id} dup={int(dup)}".encode()


def flows_for(session: Session, queue: Queue, wire: list[bytes], window: int = WINDOW) -> Flows:
    """A connection's flows on ``session``, writing to ``wire``."""
    return Flows(session, window=window, hold_limit=5, send=wire.append, encode=encode,
                 queue=queue, clock=lambda: 0.0, v5=True)  # fmt: skip


PUBLISH = re.compile(rb"PUBLISH (\S+) q(\d) id=(\S+) dup=(\d)")


class FlowMachine(RuleBasedStateMachine):
    """One session, its messages, a client that answers in any order, and reconnects."""

    def __init__(self) -> None:
        """A fresh session and connection."""
        super().__init__()
        self.session = Engine.new_session("c", clean=False, peer=("127.0.0.1", 1))
        self.queue = Queue()
        self.wire: list[bytes] = []
        self.flows = flows_for(self.session, self.queue, self.wire)
        self.delivered: list[tuple[str, int]] = []
        self.ended: dict[str, str] = {}
        """Payload -> how its QoS 1/2 delivery ended (acked, completed, refused)."""
        self.count = 0

    def _outstanding(self) -> dict[int, Message]:
        return dict(self.session.inflight_out)

    @rule(qos=st.integers(0, 2))
    def deliver(self, qos: int) -> None:
        """The broker routes a message to this session."""
        self.count += 1
        payload = f"m{self.count}"
        self.delivered.append((payload, qos))
        self.flows.deliver(Message(None, "t", qos, payload.encode(), False))

    @rule(pick=st.integers(0, 100), how=st.sampled_from(["ack", "refuse"]))
    def answer(self, pick: int, how: str) -> None:
        """The client answers one of the messages in flight, in any order."""
        outstanding = self._outstanding()
        if not outstanding:
            return
        packet_id = sorted(outstanding)[pick % len(outstanding)]
        message = outstanding[packet_id]
        payload = message.data.decode()
        if message.qos == 1:
            self.flows.acknowledged(packet_id, 1)
            self.ended[payload] = self.ended.get(payload, "") + "acked"
        elif how == "refuse" and message.pubrec_packet is None:
            self.flows.received(packet_id, refused=True)
            self.ended[payload] = self.ended.get(payload, "") + "refused"
        elif message.pubrec_packet is None:
            self.flows.received(packet_id)
            assert self.wire[-1][:1] == b"\x62"  # PUBREL back
        else:
            self.flows.acknowledged(packet_id, 2)
            self.ended[payload] = self.ended.get(payload, "") + "completed"

    @rule()
    def reconnect(self) -> None:
        """The connection drops; the client comes back to its session."""
        before = self._outstanding()
        self.wire.append(b"--- reconnect")
        self.flows = flows_for(self.session, self.queue, self.wire)
        start = len(self.wire)
        self.flows.resume()
        resent = self.wire[start:]
        for packet_id, message in before.items():
            if message.pubrec_packet is not None:
                assert any(r[:1] == b"\x62" and r[-2:] == packet_id.to_bytes(2, "big")
                           for r in resent), "a PUBREL again, not the PUBLISH"  # fmt: skip
            else:
                assert f"id={packet_id} dup=1".encode() in b"\n".join(resent)

    @rule(pick=st.integers(0, 100), kind=st.sampled_from([1, 2]))
    def wrong_kind(self, pick: int, kind: int) -> None:
        """An acknowledgement of the wrong kind is a protocol violation, and changes nothing."""
        outstanding = self._outstanding()
        if not outstanding:
            return
        packet_id = sorted(outstanding)[pick % len(outstanding)]
        message = outstanding[packet_id]
        if message.qos == kind and not (kind == 2 and message.pubrec_packet is None):
            return  # that one would be right
        with pytest.raises(ProtocolViolation):
            self.flows.acknowledged(packet_id, kind)
        assert self._outstanding() == outstanding

    @invariant()
    def window_holds(self) -> None:
        """Never more in flight than the window."""
        assert len(self.session.inflight_out) <= WINDOW

    def teardown(self) -> None:
        """Answer everything; then every QoS 1/2 message ended once, first sent in order."""
        while self.session.inflight_out:
            packet_id, message = next(iter(self.session.inflight_out.items()))
            payload = message.data.decode()
            if message.qos == 1:
                self.flows.acknowledged(packet_id, 1)
                self.ended[payload] = self.ended.get(payload, "") + "acked"
            else:
                if message.pubrec_packet is None:
                    self.flows.received(packet_id)
                self.flows.acknowledged(packet_id, 2)
                self.ended[payload] = self.ended.get(payload, "") + "completed"
        assert not self.queue.items
        assert not self.flows.backlog
        first_sends = [m.group(1).decode() for line in self.wire
                       if (m := PUBLISH.match(line)) and m.group(4) == b"0"]  # fmt: skip
        assert first_sends == [payload for payload, _ in self.delivered], "sent in order, once"
        for payload, qos in self.delivered:
            if qos:
                assert self.ended[payload] in ("acked", "completed", "refused"), payload


TestFlows = FlowMachine.TestCase
TestFlows.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_a_qos2_message_is_held_once_until_its_pubrel_and_bounded() -> None:
    """[MQTT-4.3.3-2]: resent before PUBREL, it is held once; over the bound, 0x93."""
    session = Engine.new_session("c", clean=False, peer=("127.0.0.1", 1))
    flows = flows_for(session, Queue(), [])
    first = Incoming(1, "t", 2, b"x", False)
    flows.hold(first)
    flows.hold(Incoming(1, "t", 2, b"x", False))  # DUP resend
    assert flows.release(1) is first
    assert flows.release(1) is None  # a second PUBREL: nothing to route again
    for packet_id in range(1, 6):
        flows.hold(Incoming(packet_id, "t", 2, b"x", False))
    with pytest.raises(ProtocolViolation) as raised:
        flows.hold(Incoming(6, "t", 2, b"x", False))
    assert raised.value.code == 0x93


def test_a_message_the_client_cannot_take_is_dropped_and_frees_its_place() -> None:
    """[MQTT-3.1.2-25]: over the client's maximum packet size: dropped as if delivered."""
    session = Engine.new_session("c", clean=False, peer=("127.0.0.1", 1))
    wire: list[bytes] = []
    flows = Flows(session, window=1, hold_limit=5, send=wire.append,
                  encode=lambda m, i, d: None if m.data == b"big" else encode(m, i, d),
                  queue=Queue(), clock=lambda: 0.0)  # fmt: skip
    flows.deliver(Message(None, "t", 1, b"big", False))
    flows.deliver(Message(None, "t", 1, b"small", False))
    assert len(wire) == 1
    assert b"small" in wire[0]
