"""Safe, short renderings of payloads for log lines."""

from __future__ import annotations

SHOW_CHARS = 80


def show(payload: bytes, limit: int = SHOW_CHARS) -> str:
    """Return ``repr(payload)``, cut to about ``limit`` characters with the full size noted.

    repr keeps binary and non-UTF-8 payloads printable and on one line; the cut keeps a 64 KiB
    payload from flooding the log.
    """
    text = repr(payload[: limit + 1])
    if len(payload) <= limit and len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(payload)} bytes)"
