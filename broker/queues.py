"""The messages waiting for a session: kept by the engine, bounded and counted here.

A session's queue holds at most --max-queued messages (those of an offline persistent session,
and those behind a full window). A message for a full queue is dropped and counted; the first
drop of an episode is logged, and the episode's count once the queue has run dry.
"""

from __future__ import annotations

import logging
from typing import Protocol

from broker.engine import Engine, Message, Session
from broker.systopics import Counters

logger = logging.getLogger("broker")


class Stateful(Protocol):
    """What holds the engine (the hub, once the broker has made its engine)."""

    @property
    def state(self) -> Engine:
        """The engine (amqtt's state)."""
        ...  # pragma: no cover - a protocol


class Queues:
    """Every session's queue (:class:`broker.flows.SessionQueue`)."""

    def __init__(self, owner: Stateful, max_queued: int, counters: Counters) -> None:
        """Queues of ``owner``'s engine, each of at most ``max_queued`` messages."""
        self._owner = owner
        self.max_queued = max_queued
        self._counters = counters
        self._dropping: dict[str, int] = {}
        """Client id -> messages dropped for it since its queue was last empty."""

    def put(self, session: Session, message: Message) -> None:
        """Keep a message for ``session``, unless its queue is full (then count and drop it)."""
        engine = self._owner.state
        if engine.queued(session) < self.max_queued:
            engine.enqueue(session, message)
            return
        client_id = session.client_id
        dropped = self._dropping.get(client_id, 0)
        if not dropped:
            logger.warning(
                "Dropping messages for client %s: queue full (%d).", client_id, self.max_queued
            )
        self._dropping[client_id] = dropped + 1
        self._counters.dropped += 1

    def take(self, session: Session) -> Message | None:
        """Take the oldest message waiting for ``session``."""
        return self._owner.state.dequeue(session)

    def size(self, session: Session) -> int:
        """How many messages wait for ``session``."""
        return self._owner.state.queued(session)

    def drained(self, client_id: str) -> None:
        """Note that a client's queue is empty: end its episode of drops, if any."""
        dropped = self._dropping.pop(client_id, 0)
        if dropped:
            logger.warning(
                "Client %s: queue drained; %d messages were dropped while it was full.",
                client_id, dropped,
            )  # fmt: skip

    def forget(self, client_id: str) -> None:
        """Forget a client's episode of drops (its session has ended)."""
        self._dropping.pop(client_id, None)
