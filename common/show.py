"""Safe, short renderings of payloads for log lines."""

from __future__ import annotations

SHOW_LIMIT = 64


def show(payload: bytes, limit: int = SHOW_LIMIT) -> str:
    """Return ``repr(payload)``, cut to ``limit`` bytes with the full size noted.

    repr keeps binary and non-UTF-8 payloads on one printable line.
    """
    if len(payload) <= limit:
        return repr(payload)
    return f"{payload[:limit]!r}... ({len(payload)} bytes)"
