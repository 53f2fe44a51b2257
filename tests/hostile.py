"""A broker that misbehaves on purpose: a socket server a test tells how to break the protocol.

Each behaviour is a function run in a thread for every connection it accepts. None of them is
a real MQTT broker; they are just enough to take a client to the point where a real broker
could fail it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_OK_V5 = b"\x20\x03\x00\x00\x00"
"""MQTT 5's: the same, and an empty property list. The broker answers in the client's version."""
PUBLISH_256_MB = b"\x30\xff\xff\xff\x7f"
"""A PUBLISH header declaring the largest remaining length MQTT allows (256 MB)."""
GARBAGE = bytes(range(0xF0, 0x100)) * 4
PUBLISH = 3

Behaviour = Callable[[socket.socket, threading.Event], None]


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """Read one MQTT packet; return (first byte, body). Raises ConnectionError when the peer
    closes."""
    head = _read_exactly(sock, 1)[0]
    length, multiplier = 0, 1
    while True:
        byte = _read_exactly(sock, 1)[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return head, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _hold(sock: socket.socket, stop: threading.Event) -> None:
    """Keep the connection open, reading and ignoring whatever the client sends, until stop."""
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except TimeoutError:
            continue


def read_connect(sock: socket.socket) -> int:
    """Read the client's CONNECT; return its protocol level (4: MQTT 3.1.1, 5: MQTT 5)."""
    _, body = read_packet(sock)
    return body[6] if len(body) > 6 else 4  # after the protocol name, "MQTT"


def connack(level: int) -> bytes:
    """An accepting CONNACK in the client's version."""
    return CONNACK_OK_V5 if level == 5 else CONNACK_OK


def _answer_and_hold(after: bytes, *, connack_first: bool = True) -> Behaviour:
    """A behaviour: read CONNECT, send CONNACK (unless not) and ``after``, then hold, mute."""

    def behave(sock: socket.socket, stop: threading.Event) -> None:
        level = read_connect(sock)
        sock.sendall((connack(level) if connack_first else b"") + after)
        _hold(sock, stop)

    return behave


silent_after_connack = _answer_and_hold(b"")
"""CONNACK, then nothing: no SUBACK, no PINGRESP, no PUBACK."""
garbage_after_connack = _answer_and_hold(GARBAGE)
"""CONNACK, then bytes that are no MQTT packet."""
garbage_instead_of_connack = _answer_and_hold(GARBAGE, connack_first=False)
"""Bytes that are no MQTT packet, where CONNACK should be."""


def close_after_connack(sock: socket.socket, _stop: threading.Event) -> None:
    """CONNACK, then hang up."""
    sock.sendall(connack(read_connect(sock)))


huge_packet_after_connack = _answer_and_hold(PUBLISH_256_MB + b"\x00\x05/pong")
"""CONNACK, then a PUBLISH declaring 256 MB whose body never comes."""


def subacks(buffer: bytes, level: int) -> tuple[bytes, bytes]:
    """Answer every whole SUBSCRIBE in ``buffer`` with a SUBACK granting QoS 0 (in the client's
    version); return the answers and what is left of the buffer."""
    answers = b""
    while len(buffer) >= 2 and len(buffer) >= 2 + buffer[1] and buffer[1] < 0x80:
        kind, body, buffer = buffer[0] >> 4, buffer[2 : 2 + buffer[1]], buffer[2 + buffer[1] :]
        if kind == 8:
            answers += (b"\x90\x04" + body[:2] + b"\x00\x00" if level == 5
                        else b"\x90\x03" + body[:2] + b"\x00")  # fmt: skip
    return answers, buffer


def _serve_subscriptions(
    sock: socket.socket, stop: threading.Event, send: Callable[[bytes], None],
    tick: Callable[[], None] = lambda: None,
) -> None:  # fmt: skip
    """Read until the client leaves, handing each SUBSCRIBE's SUBACK to ``send``."""
    level = read_connect(sock)
    send(connack(level))
    sock.settimeout(0.05)
    buffer = b""
    while not stop.is_set():
        tick()
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return
        answers, buffer = subacks(buffer + chunk, level)
        if answers:
            send(answers)


def publish_after_suback(publish: bytes) -> Behaviour:
    """A behaviour: CONNACK and SUBACKs at once, and ``publish`` (a whole packet) right after
    the first SUBACK, on each connection."""

    def behave(sock: socket.socket, stop: threading.Event) -> None:
        sent = False

        def send(answers: bytes) -> None:
            nonlocal sent
            if not sent and answers[0] >> 4 == 9:  # the first SUBACK
                answers += publish
                sent = True
            sock.sendall(answers)

        _serve_subscriptions(sock, stop, send)

    return behave


def drip(sock: socket.socket, stop: threading.Event) -> None:
    """A valid CONNACK and SUBACKs, one byte per second."""
    pending = bytearray()
    next_byte = time.monotonic() + 1.0

    def tick() -> None:
        nonlocal next_byte
        if pending and time.monotonic() >= next_byte:
            sock.sendall(bytes(pending[:1]))
            del pending[:1]
            next_byte += 1.0

    _serve_subscriptions(sock, stop, pending.extend, tick)


def never_puback(sock: socket.socket, stop: threading.Event) -> None:
    """CONNACK and SUBACKs at once; a PUBLISH is never acknowledged (nor forwarded)."""
    _serve_subscriptions(sock, stop, sock.sendall)


class DropsFirstPublish:
    """CONNACK and SUBACKs; the first connection ends at its first QoS 1 PUBLISH, unanswered.

    ``order`` gets the packet types the next connection sends after its CONNECT, up to a
    PUBLISH (the one the client sends again) and a SUBSCRIBE.
    """

    def __init__(self) -> None:
        """Nothing seen yet."""
        self.connections = 0
        self.order: list[int] = []

    def __call__(self, sock: socket.socket, stop: threading.Event) -> None:
        """Serve one connection."""
        self.connections += 1
        first = self.connections == 1
        level = read_connect(sock)
        sock.sendall(connack(level))
        while not {PUBLISH, 8} <= set(self.order):
            head, body = read_packet(sock)
            kind = head >> 4
            if first and kind == PUBLISH and head & 0x06:
                return  # no PUBACK: the client keeps it, to send again
            if not first:
                self.order.append(kind)
            if kind == 8:
                sock.sendall(b"\x90\x04" + body[:2] + b"\x00\x01" if level == 5
                             else b"\x90\x03" + body[:2] + b"\x01")  # fmt: skip
        _hold(sock, stop)


class DisconnectsAtQos2:
    """CONNACK (no Maximum QoS) and SUBACKs; a QoS 2 PUBLISH gets DISCONNECT 0x9B (QoS not
    supported) and a hang-up, as from mosquitto with ``max_qos 1`` [MQTT-3.2.2-12], on every
    connection: the client sends it again on the next."""

    def __init__(self) -> None:
        """Nobody connected yet."""
        self.connections = 0

    def __call__(self, sock: socket.socket, _stop: threading.Event) -> None:
        """Serve one connection."""
        self.connections += 1
        level = read_connect(sock)
        sock.sendall(connack(level))
        while True:
            head, body = read_packet(sock)
            if head >> 4 == PUBLISH and head & 0x06 == 0x04:
                sock.sendall(b"\xe0\x02\x9b\x00" if level == 5 else b"")
                return
            if head >> 4 == 8:
                sock.sendall(b"\x90\x04" + body[:2] + b"\x00\x02" if level == 5
                             else b"\x90\x03" + body[:2] + b"\x02")  # fmt: skip


class RefusesAfterFirst:
    """Accepts the first connection and ends it soon after its SUBACK; refuses every later
    CONNECT as not authorized (CONNACK 0x05, MQTT 3.1.1), as a broker restarted with other
    passwords would."""

    def __init__(self) -> None:
        """Nobody connected yet."""
        self.connections = 0

    def __call__(self, sock: socket.socket, stop: threading.Event) -> None:
        """Serve one connection."""
        self.connections += 1
        read_connect(sock)
        if self.connections > 1:
            sock.sendall(b"\x20\x02\x00\x05")
            _hold(sock, stop)
            return
        sock.sendall(CONNACK_OK)
        _, body = read_packet(sock)  # its SUBSCRIBE
        sock.sendall(b"\x90\x03" + body[:2] + b"\x00")


class Proxy:
    """A proxy to a real broker that breaks it in one of two ways.

    - ``swallow``: the client's PUBLISH packets are counted in ``swallowed`` and dropped, as a
      network would that loses them along with the connection: the client believes it
      published, the broker never hears of it.
    - ``mqtt311_only``: an MQTT 5 CONNECT is answered by hanging up, without a CONNACK, as
      RabbitMQ 3.10 does; MQTT 3.1.1 passes.
    """

    def __init__(self, upstream: int, *, swallow: bool = False, mqtt311_only: bool = False) -> None:
        """Proxy to the broker on 127.0.0.1:``upstream``."""
        self.upstream = upstream
        self.swallow = swallow
        self.mqtt311_only = mqtt311_only
        self.swallowed: list[bytes] = []
        self.hung_up = 0

    def __call__(self, sock: socket.socket, stop: threading.Event) -> None:
        """Serve one client connection (a :data:`Behaviour`)."""
        head, body = read_packet(sock)
        if self.mqtt311_only and body[6:7] == b"\x05":  # the protocol level, after "MQTT"
            self.hung_up += 1
            return
        with socket.create_connection(("127.0.0.1", self.upstream)) as broker:
            back = threading.Thread(target=self._pump, args=(broker, sock), daemon=True)
            back.start()
            try:
                while not stop.is_set():
                    if head >> 4 == PUBLISH and self.swallow:
                        self.swallowed.append(body)
                    else:
                        broker.sendall(bytes([head]) + _remaining_length(len(body)) + body)
                    head, body = read_packet(sock)
            finally:
                broker.shutdown(socket.SHUT_RDWR)
                back.join(5)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_RDWR)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


BEHAVIOURS: dict[str, Behaviour] = {
    "silent after CONNACK": silent_after_connack,
    "garbage after CONNACK": garbage_after_connack,
    "garbage instead of CONNACK": garbage_instead_of_connack,
    "close after CONNACK": close_after_connack,
    "256 MB packet after CONNACK": huge_packet_after_connack,
    "one byte per second": drip,
}


class HostileBroker:
    """Listens on 127.0.0.1:port and runs ``behaviour`` on every connection, each in a thread."""

    def __init__(self, port: int, behaviour: Behaviour) -> None:
        """Bind and start accepting."""
        self.port = port
        self.behaviour = behaviour
        self.connections = 0
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        with sock, contextlib.suppress(OSError, ConnectionError):
            # A reset when closing, so the client sees the end at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.behaviour(sock, self._stop)

    def close(self) -> None:
        """Stop accepting, end every connection, and wait for the threads."""
        self._stop.set()
        self._server.close()
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def hostile_broker(port: int, behaviour: Behaviour) -> Iterator[HostileBroker]:
    """Run a :class:`HostileBroker` for the duration of a ``with`` block."""
    broker = HostileBroker(port, behaviour)
    try:
        yield broker
    finally:
        broker.close()
