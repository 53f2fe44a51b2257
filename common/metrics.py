"""Prometheus metrics over HTTP, served on the program's own event loop.

``prometheus_client`` formats the metrics; this serves ``GET /metrics`` with them, one request
per connection, on the asyncio loop the program already runs: no thread reads the program's
state while it changes, and a scrape costs nothing between scrapes. Anything else gets 404, a
malformed or oversized request 400, a slow one is cut off after 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

REQUEST_LIMIT = 8192
"""Bytes of request head read at most."""
REQUEST_TIMEOUT = 5.0


def _response(status: str, body: bytes, kind: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


async def _serve_one(
    registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        writer.write(_response("400 Bad Request", b"Bad request: GET /metrics.\n"))
    else:
        if method in ("GET", "HEAD") and path.split("?", 1)[0] == "/metrics":
            body = generate_latest(registry)
            answer = _response("200 OK", body, CONTENT_TYPE_LATEST)
            writer.write(answer if method == "GET" else answer[: len(answer) - len(body)])
        else:
            writer.write(_response("404 Not Found", b"Metrics are at /metrics.\n"))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


class MetricsPortError(Exception):
    """The metrics port cannot be listened on; the message says why, in a few words."""


async def serve(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serve ``registry`` at ``http://host:port/metrics``; raise MetricsPortError."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_one(registry, reader, writer)
        except Exception as exc:  # noqa: BLE001 - one scrape's failure is not the program's
            logger.warning("A metrics scrape failed: %r.", exc)
            writer.close()

    try:
        return await asyncio.start_server(handle, host, port, limit=REQUEST_LIMIT)
    except OSError as exc:
        reason = (f"port {port} is already in use" if exc.errno == errno.EADDRINUSE
                  else exc.strerror or str(exc))  # fmt: skip
        raise MetricsPortError(reason) from exc
