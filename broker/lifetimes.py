"""What outlives a connection, and the timers that end it: MQTT 5 session expiry and delayed wills.

A persistent MQTT 5 session ends its expiry interval after its connection [MQTT-3.1.2-23]
unless the client comes back first; a will with a delay is published when the delay runs out,
unless the session goes on (section 3.1.3.2.2). Timers are ``loop.call_later`` handles, one
per client id, cancelled when the client returns and all at once at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Lifetimes:
    """The session-expiry and delayed-will timers of every client that is away."""

    def __init__(self) -> None:
        """No timers yet."""
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        """Client id -> the timer that ends its MQTT 5 session, while it is offline."""
        self._wills: dict[str, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}
        """Client id -> the timer of its delayed MQTT 5 will, and what publishes it."""

    def returned(self, client_id: str, *, clean: bool) -> None:
        """Note that the client connected again: its session no longer expires.

        A delayed will is not sent if the session goes on; if it ends here (``clean``), it is
        sent now.
        """
        expiry = self._expiry.pop(client_id, None)
        if expiry is not None:
            expiry.cancel()
        delayed = self._wills.pop(client_id, None)
        if delayed is not None:
            timer, publish = delayed
            timer.cancel()
            if clean:
                publish()

    def expire_after(self, client_id: str, seconds: float, end: Callable[[], None]) -> None:
        """Call ``end`` in ``seconds`` unless the client returns before."""
        loop = asyncio.get_running_loop()
        self._expiry[client_id] = loop.call_later(seconds, self._due, client_id, end)

    def _due(self, client_id: str, end: Callable[[], None]) -> None:
        self._expiry.pop(client_id, None)
        end()

    def delay_will(self, client_id: str, delay: float, publish: Callable[[], None]) -> None:
        """Publish a will after ``delay`` seconds unless its client's session goes on."""

        def due() -> None:
            self._wills.pop(client_id, None)
            publish()

        self._wills[client_id] = (asyncio.get_running_loop().call_later(delay, due), publish)

    def cancel_all(self) -> None:
        """Stop every timer (the broker is shutting down: nothing is published or ended)."""
        for timer in [*self._expiry.values(), *(t for t, _ in self._wills.values())]:
            timer.cancel()
        self._expiry.clear()
        self._wills.clear()
