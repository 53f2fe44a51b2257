"""Connections that have not sent their first packet yet, and the one timer that closes the late.

A new connection has --handshake-timeout seconds to send CONNECT, or it is closed. A timer per
connection (``loop.call_later``, cancelled at its first packet) cost 2 us of the 31 that a
CONNECT and SUBSCRIBE cost the broker in process. Here a waiting connection is an entry in a
dict, and one timer, armed for the oldest, closes those whose time has run out: much as
mosquitto checks its new connections in its main loop.

Every connection waits the same time, so the dict's order (arrival) is the order of the
deadlines: the first entry is always the next one due.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

RESOLUTION = 0.001
"""uvloop's clock has millisecond steps: a deadline this close counts as reached."""


class Waiting(Protocol):
    """A connection waiting for its first packet."""

    def no_connect(self) -> None:
        """Close the connection: its time to send CONNECT ran out."""


class Handshakes:
    """The connections waiting for their first packet, each with its deadline."""

    def __init__(self, timeout: float) -> None:
        """Give each connection ``timeout`` seconds."""
        self.timeout = timeout
        self._waiting: dict[Waiting, float] = {}
        """Connection -> when its time runs out (loop.time()), oldest first."""
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """How many connections are waiting."""
        return len(self._waiting)

    def wait(self, connection: Waiting, loop: asyncio.AbstractEventLoop) -> None:
        """Start the clock of a new connection."""
        deadline = loop.time() + self.timeout
        self._waiting[connection] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def done(self, connection: Waiting) -> None:
        """Stop the clock of a connection (its first packet came, or it closed)."""
        self._waiting.pop(connection, None)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close every connection whose time ran out; arm the timer for the next one."""
        self._timer = None
        waiting, late = self._waiting, []
        now = loop.time() + RESOLUTION
        while waiting:
            connection, deadline = next(iter(waiting.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire, loop)
                break
            del waiting[connection]
            late.append(connection)
        for connection in late:  # each its own callback: one failing to close stops no other
            loop.call_soon(connection.no_connect)

    def cancel(self) -> None:
        """Stop the timer and forget every connection (the broker is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()
