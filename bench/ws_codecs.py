"""The two sans-I/O WebSocket codecs our listener could use, in memory: websockets and wsproto.

    python -m bench.ws_codecs      (pip install wsproto first; it is not a dependency)

For each: the server's cost per message (one masked binary frame of a 30-byte MQTT PUBLISH
received and handed on, one sent back), and its memory per open connection (tracemalloc, 1,000
connections after the upgrade). No sockets: the handshake and the frames are bytes in, bytes
out, as in the broker. The figures are why broker/websocket.py uses websockets' ServerProtocol
(docs/websockets.md).
"""

from __future__ import annotations

import base64
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, cast

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

REQUEST = (
    b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
)
PUBLISH = b"\x30\x1c\x00\x05/ping" + b"1744796556.123456789"[:21]
MESSAGES = 100_000
CONNECTIONS = 1_000


def masked(payload: bytes) -> bytes:
    """A client's binary frame carrying ``payload`` (clients must mask)."""
    frame = Frame(Opcode.BINARY, payload)
    return frame.serialize(mask=True, extensions=[])


class Websockets:
    """websockets' ServerProtocol, as broker/websocket.py drives it."""

    name = "websockets"

    def __init__(self) -> None:
        """Open a connection: the upgrade request in, the 101 out."""
        self.ws = ServerProtocol(subprotocols=[Subprotocol("mqtt")], max_size=1 << 21)
        self.ws.receive_data(REQUEST)
        (request,) = self.ws.events_received()
        self.ws.send_response(self.ws.accept(request))  # type: ignore[arg-type]
        self.ws.data_to_send()

    def round_trip(self, data: bytes) -> bytes:
        """One frame in, its payload handed on, one frame out."""
        ws = self.ws
        ws.receive_data(data)
        (frame,) = ws.events_received()
        ws.send_binary(frame.data)  # type: ignore[union-attr, arg-type]
        return b"".join(ws.data_to_send())


class Wsproto:
    """wsproto's WSConnection, driven the same way."""

    name = "wsproto"

    def __init__(self) -> None:
        """Open a connection: the upgrade request in, the 101 out."""
        from wsproto import ConnectionType, WSConnection  # noqa: PLC0415
        from wsproto.events import AcceptConnection, BytesMessage, Request  # noqa: PLC0415

        self.message = BytesMessage
        self.ws = WSConnection(ConnectionType.SERVER)
        self.ws.receive_data(REQUEST)
        (request,) = self.ws.events()
        assert isinstance(request, Request)
        self.ws.send(AcceptConnection(subprotocol="mqtt"))

    def round_trip(self, data: bytes) -> bytes:
        """One frame in, its payload handed on, one frame out."""
        ws = self.ws
        ws.receive_data(data)
        (event,) = ws.events()
        out: bytes = ws.send(self.message(cast("Any", event).data))
        return out


def per_message(make: Callable[[], Websockets | Wsproto]) -> float:
    """Microseconds per message, the median of 5 runs."""
    codec = make()
    data = masked(PUBLISH)
    assert PUBLISH in codec.round_trip(data)
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(MESSAGES):
            codec.round_trip(data)
        runs.append((time.perf_counter() - began) / MESSAGES * 1e6)
    return statistics.median(runs)


def per_connection(make: Callable[[], Websockets | Wsproto]) -> float:
    """Bytes per open connection, after the upgrade."""
    make()  # imports and caches, outside the measurement
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [make() for _ in range(CONNECTIONS)]
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del kept
    return used / CONNECTIONS


def main() -> None:
    """Measure both (wsproto when installed) and print one table."""
    codecs: list[Callable[[], Websockets | Wsproto]] = [Websockets]
    try:
        import wsproto  # noqa: F401, PLC0415
    except ImportError:
        sys.stderr.write("wsproto is not installed (pip install wsproto): websockets only\n")
    else:
        codecs.append(Wsproto)
    lines = ["| codec | per message (in + out) | memory per connection |", "|---|---|---|"]
    for make in codecs:
        lines.append(f"| {make.name} | {per_message(make):.2f} us | "  # type: ignore[attr-defined]
                     f"{per_connection(make) / 1024:.1f} KiB |")  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
