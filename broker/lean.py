"""Light stand-ins for the per-session machinery amqtt builds and the broker never uses.

Pure and amqtt-free: :class:`broker.plugins.LeanSession` puts them in amqtt's Session.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol


class Hooks(Protocol):
    """What :class:`SessionState` reads and calls of the session it belongs to (amqtt's hooks)."""

    client_id: str
    lean_state: str
    """The session's state: "new", "connected" or "disconnected"."""

    def _on_enter_connected(self) -> None: ...
    def _on_enter_disconnected(self) -> None: ...


class SessionState:
    """``Session.transitions`` for the broker's sessions: amqtt's three states, two triggers.

    amqtt builds a ``transitions.Machine`` for every Session: 15.4 KiB each, 60 % of what a
    connection cost (tracemalloc, 1,000 connections). This is a view of the same state, which
    the session keeps itself (``lean_state``), made at each use of ``session.transitions``, and
    it calls the same ``_on_enter_*`` hooks. Kept in the session, it would hold the session
    that holds it: a cycle, which only the garbage collector frees.
    """

    __slots__ = ("_session",)

    def __init__(self, session: Hooks) -> None:
        """View the state of ``session``."""
        self._session = session

    @property
    def state(self) -> str:
        """The state, as amqtt names it: "new", "connected" or "disconnected"."""
        return self._session.lean_state

    def connect(self) -> None:
        """new/disconnected -> connected."""
        session = self._session
        if session.lean_state == "connected":
            raise RuntimeError(f"session {session.client_id} is already connected")
        session.lean_state = "connected"
        session._on_enter_connected()

    def disconnect(self) -> None:
        """Any state -> disconnected."""
        self._session.lean_state = "disconnected"
        self._session._on_enter_disconnected()

    def is_new(self) -> bool:
        """Whether the session never connected."""
        return self._session.lean_state == "new"

    def is_connected(self) -> bool:
        """Whether the session is connected."""
        return self._session.lean_state == "connected"

    def is_disconnected(self) -> bool:
        """Whether the session was connected and is not now."""
        return self._session.lean_state == "disconnected"


class Mailbox:
    """A session's message queue with asyncio.Queue's methods, its storage made on first use.

    amqtt gives every Session two asyncio.Queues (4.6 KiB with their locks); the broker never
    waits on them, and most sessions never queue anything.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        """Start empty, with no storage yet."""
        self._items: deque[Any] | None = None

    def put_nowait(self, item: Any) -> None:  # noqa: ANN401 - amqtt's message objects
        """Append ``item``."""
        if self._items is None:
            self._items = deque()
        self._items.append(item)

    async def put(self, item: Any) -> None:  # noqa: ANN401
        """Append ``item`` (never waits: the mailbox is unbounded; the broker bounds it)."""
        self.put_nowait(item)

    def get_nowait(self) -> Any:  # noqa: ANN401
        """Take the oldest item; asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> Any:  # noqa: ANN401
        """Take the oldest item (amqtt only gets from a queue it saw not empty)."""
        return self.get_nowait()

    def qsize(self) -> int:
        """How many items wait."""
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        """Whether nothing waits."""
        return not self._items
