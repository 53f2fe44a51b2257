"""The 100 ms reconnect loop both clients share.

One :class:`Link` owns one ``aiomqtt.Client`` and keeps it connected. Whenever a connect fails or
an established connection is lost, it logs that once, retries every ``interval`` seconds, logs the
recovery with the length of the outage, and runs the caller's session again (which subscribes
again). It catches ``aiomqtt.MqttError`` and nothing broader: a bug in a session still crashes the
process, where supervisord can see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiomqtt

logger = logging.getLogger(__name__)

Session = Callable[[aiomqtt.Client], Awaitable[None]]
"""Runs while connected: subscribes, then handles messages until the link breaks."""

Listener = Callable[[str, dict[str, object]], None]
"""Called with an event name (``connected``/``disconnected``) and its data."""

REMINDER_EVERY = 15.0
"""While the broker stays unreachable, remind the log this often (seconds), not on every try."""


class Link:
    """Keeps one MQTT client connected through any number of outages."""

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        address: str,
        interval: float,
        listener: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
        role: str = "",
        quiet: bool = False,
    ) -> None:
        """Wrap ``client``; ``interval`` is the pause between attempts (0 in tests).

        ``role`` names a secondary connection in its log lines, e.g. ``"watcher"``; ``quiet``
        logs its events at DEBUG, for a connection whose outages the main one already reports.
        """
        self.client = client
        self._prefix = f"{role}: " if role else ""
        self._info = logging.DEBUG if quiet else logging.INFO
        self._warning = logging.DEBUG if quiet else logging.WARNING
        self.address = address
        self.interval = interval
        self.connected = asyncio.Event()
        self.ever_connected = asyncio.Event()
        self.reconnects = 0
        self.attempts = 0
        self._listener = listener
        self._clock = clock
        self._down_since: float | None = clock()
        self._down_total = 0.0
        self._reminded_at = 0.0
        self._stopping = False

    def downtime(self) -> float:
        """Seconds spent disconnected after the first connection, including an outage under way."""
        if not self.ever_connected.is_set():
            return self._down_total
        current = self._clock() - self._down_since if self._down_since is not None else 0.0
        return self._down_total + current

    def stop(self) -> None:
        """Prepare to be cancelled: no more reconnects, and a short goodbye.

        aiomqtt's disconnect on cancellation can fail with MqttError (its DISCONNECT never
        acknowledged), which replaces the CancelledError; without this flag the loop would
        then reconnect instead of ending.
        """
        self._stopping = True
        self.client.timeout = 1.0

    async def run(self, session: Session) -> None:
        """Connect, run ``session``, and start again after every connection error.

        Returns only after :meth:`stop`; otherwise it runs until cancelled.
        """
        while not self._stopping:
            self.attempts += 1
            try:
                async with self.client:
                    self._up()
                    await session(self.client)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    return
                self._down(exc)
            else:
                # A session only returns when its message stream ended without an error.
                self._down(aiomqtt.MqttError("session ended"))
            await asyncio.sleep(self.interval)

    def _up(self) -> None:
        now = self._clock()
        if not self.ever_connected.is_set():
            identifier = self.client.identifier
            logger.log(
                self._info, "%sConnected to %s as %s.", self._prefix, self.address, identifier
            )
            self.ever_connected.set()
            outage = 0.0
        else:
            outage = now - (self._down_since or now)
            self._down_total += outage
            self.reconnects += 1
            logger.log(
                self._warning,
                "%sReconnected to %s after %.3f s (%d attempts).",
                self._prefix,
                self.address,
                outage,
                self.attempts,
            )
        self._down_since = None
        self.attempts = 0
        self.connected.set()
        self._emit("connected", outage_s=round(outage, 6), reconnects=self.reconnects)

    def _down(self, exc: aiomqtt.MqttError) -> None:
        now = self._clock()
        retry_ms = round(self.interval * 1000)
        if self.connected.is_set():
            # An established connection broke: always reported, exactly once.
            self.connected.clear()
            self._down_since = now
            self._reminded_at = now
            logger.log(
                self._warning,
                "%sLost connection to %s: %s. Retrying every %d ms.",
                self._prefix,
                self.address,
                exc,
                retry_ms,
            )
            self._emit("disconnected", reason=str(exc))
        elif self.attempts == 1 and not self.ever_connected.is_set():
            self._reminded_at = now
            logger.log(
                self._warning,
                "%sCannot connect to %s: %s. Retrying every %d ms.",
                self._prefix,
                self.address,
                exc,
                retry_ms,
            )
        elif now - self._reminded_at >= REMINDER_EVERY:
            self._reminded_at = now
            since = self._down_since if self._down_since is not None else now
            logger.log(
                self._warning,
                "%sStill cannot reach %s after %.0f s (%d attempts): %s.",
                self._prefix,
                self.address,
                now - since,
                self.attempts,
                exc,
            )

    def _emit(self, event: str, **data: object) -> None:
        if self._listener is not None:
            self._listener(event, data)
