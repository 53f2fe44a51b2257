"""Cut a connection's byte stream into MQTT frames (fixed header + body), bounded in size.

Pure, in the manner of h11: bytes go in with :meth:`Framer.feed`, and :meth:`Framer.next_frame`
has exactly three outcomes: a whole frame, None ("need more data"), or ProtocolViolation. The
declared size is checked against the maximum as soon as the fixed header is complete, before
any of the body is kept, so a client that declares 256 MB costs nothing. An error is sticky:
after it, every call raises it again.
"""

from __future__ import annotations

from typing import NoReturn

from broker.protocol import Frame, ProtocolViolation
from broker.reasons import MALFORMED_PACKET, PACKET_TOO_LARGE


class Framer:
    """The receive buffer of one connection."""

    __slots__ = ("_data", "_error", "_pos", "max_packet_size")

    def __init__(self, max_packet_size: int) -> None:
        """Accept packets of at most ``max_packet_size`` bytes, fixed header included."""
        self.max_packet_size = max_packet_size
        self._data: bytes | bytearray = b""
        self._pos = 0
        """Where the next frame starts in ``_data``; what is before it was returned."""
        self._error: ProtocolViolation | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes read from the connection (kept without a copy when nothing is pending)."""
        if self._pos >= len(self._data):
            self._data, self._pos = data, 0  # the common case: whole packets, nothing left over
        elif isinstance(self._data, bytearray) and not self._pos:
            self._data += data  # a large packet arriving in pieces: amortised appends
        else:
            pending = bytearray(memoryview(self._data)[self._pos :])
            pending += data
            self._data, self._pos = pending, 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._data) - self._pos

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or None until more data arrives."""
        if self._error is not None:
            raise self._error
        data, start = self._data, self._pos
        size = len(data)
        if size - start < 2:
            return None
        length, multiplier, index = 0, 1, start + 1
        while True:
            if index >= size:
                return None
            byte = data[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            if index - start == 5:
                self._fail("remaining length longer than 4 bytes", "MQTT-2.2.3")
            multiplier *= 128
        end = index + length
        if end - start > self.max_packet_size:
            self._fail(
                f"packet of {end - start} bytes exceeds the {self.max_packet_size}-byte maximum",
                "MQTT-1.5.4 / server limit",
                code=PACKET_TOO_LARGE,
            )
        if size < end:
            return None
        first = data[start]
        self._pos = end
        if start or end != size or not isinstance(data, bytes):
            data = bytes(data[start:end])
        return Frame(first >> 4, first & 0x0F, data, index - start)

    def _fail(self, reason: str, statement: str, code: int = MALFORMED_PACKET) -> NoReturn:
        self._error = ProtocolViolation(reason, statement, code)
        self._data, self._pos = b"", 0
        raise self._error
