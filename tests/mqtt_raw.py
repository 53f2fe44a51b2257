"""Raw MQTT clients for conformance tests: 3.1.1 where we build every byte, so we can send bad
ones, and MQTT 5 with packets from the ``mqtt5`` codec (:class:`V5`)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import ClassVar

import mqtt5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def remaining_length(n: int) -> bytes:
    """Encode a remaining length (section 2.2.3)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(value: str | bytes) -> bytes:
    """A length-prefixed string; bytes are sent as they are (to send invalid UTF-8)."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """A whole packet: fixed header, then body."""
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def connect(
    client_id: str = "",
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | None = None,
    level: int = 4,
) -> bytes:
    """CONNECT (section 3.1)."""
    flags = 0x02 if clean else 0
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    body = string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive) + payload
    return packet(CONNECT, 0, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 1,
) -> bytes:
    """PUBLISH (section 3.3)."""
    flags = (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    body = string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(PUBLISH, flags, body)


def subscribe(packet_id: int, *filters: tuple[str | bytes, int]) -> bytes:
    """SUBSCRIBE (section 3.8)."""
    body = struct.pack("!H", packet_id) + b"".join(string(f) + bytes([q]) for f, q in filters)
    return packet(SUBSCRIBE, 0b0010, body)


def unsubscribe(packet_id: int, *filters: str) -> bytes:
    """UNSUBSCRIBE (section 3.10)."""
    body = struct.pack("!H", packet_id) + b"".join(string(f) for f in filters)
    return packet(UNSUBSCRIBE, 0b0010, body)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0010) or PUBCOMP."""
    return packet(kind, 0b0010 if kind == PUBREL else 0, struct.pack("!H", packet_id))


PINGREQ_PACKET = packet(PINGREQ, 0, b"")
DISCONNECT_PACKET = packet(DISCONNECT, 0, b"")


@dataclass(frozen=True)
class Packet:
    """A packet received from the broker."""

    kind: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        """The packet identifier of an ack, SUBACK or UNSUBACK."""
        return int(struct.unpack_from("!H", self.body)[0])


@dataclass(frozen=True)
class Message:
    """A PUBLISH received from the broker, decoded."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


def decode_publish(p: Packet) -> Message:
    """Decode a PUBLISH packet."""
    assert p.kind == PUBLISH, f"expected PUBLISH, got type {p.kind}"
    (size,) = struct.unpack_from("!H", p.body)
    topic = p.body[2 : 2 + size].decode()
    offset = 2 + size
    qos = (p.flags >> 1) & 3
    packet_id = None
    if qos:
        (packet_id,) = struct.unpack_from("!H", p.body, offset)
        offset += 2
    return Message(topic, p.body[offset:], qos, bool(p.flags & 1), bool(p.flags & 8), packet_id)


class Closed(Exception):  # noqa: N818 - reads as "the connection is Closed"
    """The broker closed the connection."""


class RawClient:
    """One TCP connection to the broker, speaking bytes."""

    opened: ClassVar[list[RawClient]] = []
    """Every client made, so that a fixture can close them after each test."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        """Open the TCP connection (no CONNECT yet)."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        RawClient.opened.append(self)
        self.timeout = timeout
        self.buffer = b""

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from the broker in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise TimeoutError("no packet from the broker in time") from None
        if not chunk:
            raise Closed
        self.buffer += chunk

    def receive(self, timeout: float | None = None) -> Packet:
        """Read the next packet, failing after ``timeout`` seconds."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            if len(self.buffer) >= 2:
                length, multiplier, index = 0, 1, 1
                while index < len(self.buffer):
                    byte = self.buffer[index]
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    index += 1
                    if not byte & 0x80:
                        if len(self.buffer) >= index + length:
                            head = self.buffer[0]
                            body = self.buffer[index : index + length]
                            self.buffer = self.buffer[index + length :]
                            return Packet(head >> 4, head & 0x0F, body)
                        break
            self._fill(deadline)

    def expect(self, kind: int, timeout: float | None = None) -> Packet:
        """Read the next packet and check its type."""
        got = self.receive(timeout)
        assert got.kind == kind, f"expected packet type {kind}, got {got.kind} {got.body!r}"
        return got

    def message(self, timeout: float | None = None) -> Message:
        """Read the next packet, which must be a PUBLISH."""
        return decode_publish(self.receive(timeout))

    def connect(self, client_id: str = "", **kwargs: object) -> tuple[bool, int]:
        """Send CONNECT; return (session present, return code) from CONNACK."""
        self.send(connect(client_id, **kwargs))  # type: ignore[arg-type]
        body = self.expect(CONNACK).body
        return bool(body[0] & 1), body[1]

    def subscribe(self, packet_id: int, *filters: tuple[str, int]) -> list[int]:
        """Send SUBSCRIBE; return the SUBACK return codes."""
        self.send(subscribe(packet_id, *filters))
        suback = self.expect(SUBACK)
        assert suback.packet_id == packet_id
        return list(suback.body[2:])

    def barrier(self) -> list[Packet]:
        """PINGREQ, then return every packet that arrived before the PINGRESP."""
        self.send(PINGREQ_PACKET)
        before = []
        while (got := self.receive()).kind != PINGRESP:
            before.append(got)
        return before

    def closed_within(self, timeout: float) -> bool:
        """Return True if the broker closes the connection within ``timeout`` seconds.

        Packets that arrive meanwhile are skipped.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.receive(max(0.0, deadline - time.monotonic()) or 0.001)
        except Closed:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Close the socket without DISCONNECT (an abnormal end, for the will)."""
        self.sock.close()

    @classmethod
    def close_all(cls) -> None:
        """Close every client made so far."""
        while cls.opened:
            cls.opened.pop().close()


class V5:
    """A raw MQTT 5 client: RawClient's socket, packets from the ``mqtt5`` codec."""

    def __init__(self, port: int) -> None:
        """Open the TCP connection."""
        self.raw = RawClient(port)

    def send(self, *packets: object) -> None:
        """Send packets (anything with ``write()``)."""
        self.raw.send(b"".join(p.write() for p in packets))  # type: ignore[attr-defined]

    def read(self, timeout: float = 5.0) -> object:
        """Read and decode one packet."""
        p = self.raw.receive(timeout)
        data = bytes([p.kind << 4 | p.flags]) + remaining_length(len(p.body)) + p.body
        return mqtt5.read(memoryview(data))[0]

    def expect(self, cls: type, timeout: float = 5.0) -> object:
        """Read until a packet of ``cls``."""
        while True:
            packet = self.read(timeout)
            if isinstance(packet, cls):
                return packet

    def publish(self, timeout: float = 5.0) -> mqtt5.PublishPacket:
        """The next PUBLISH."""
        return self.expect(mqtt5.PublishPacket, timeout)  # type: ignore[return-value]

    def connect(self, client_id: str, **kwargs: object) -> mqtt5.ConnAckPacket:
        """CONNECT; return the CONNACK."""
        self.send(mqtt5.ConnectPacket(client_id, **kwargs))  # type: ignore[arg-type]
        return self.expect(mqtt5.ConnAckPacket)  # type: ignore[return-value]

    def subscribe(self, *filters: mqtt5.TopicFilter, sub_id: int | None = None) -> list[int]:
        """SUBSCRIBE; return the SUBACK's reason codes."""
        self.send(mqtt5.SubscribePacket(1, list(filters), subscription_id=sub_id))
        suback = self.expect(mqtt5.SubAckPacket)
        return [int(c) for c in suback.reason_codes]  # type: ignore[attr-defined]

    def barrier(self) -> list[object]:
        """PINGREQ; return every packet before the PINGRESP."""
        self.send(mqtt5.PingReqPacket())
        got = []
        while not isinstance(packet := self.read(), mqtt5.PingRespPacket):
            got.append(packet)
        return got

    def disconnect_reason(self, timeout: float = 5.0) -> int:
        """Wait for the broker's DISCONNECT and the close; return its reason code.

        The DISCONNECT itself is kept as ``self.disconnect``.
        """
        reason = None
        try:
            while True:
                packet = self.read(timeout)
                if isinstance(packet, mqtt5.DisconnectPacket):
                    reason = int(packet.reason_code)
                    self.disconnect = packet
        except Closed:
            pass
        assert reason is not None, "closed without DISCONNECT"
        return reason
