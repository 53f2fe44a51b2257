"""The 100 ms reconnect loop both clients share.

One :class:`Link` owns one ``aiomqtt.Client`` and keeps it usable: connected, and subscribed to its
topics. A link is up only once every SUBACK has come back (within ``suback_timeout``): a broker
that answers CONNECT and then nothing is a failed link, not a working one. Whenever a connect or
subscription fails, or a usable connection is lost, it logs that once, retries every ``interval``
seconds, logs the recovery with the length of the outage, subscribes again and runs the caller's
session. It catches ``aiomqtt.MqttError`` and nothing broader: a bug in a session still crashes
the process, where supervisord can see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence

import aiomqtt
import paho.mqtt.client as mqtt

from common.aiomqtt_fixes import Client, closed_before_connack, refuses_mqtt5

logger = logging.getLogger(__name__)

Session = Callable[[Client], Awaitable[None]]
"""Runs while the link is up (subscribed): handles messages until the link breaks."""

Listener = Callable[[str, dict[str, object]], None]
"""Called with an event name (``connected``/``disconnected``) and its data."""

REMINDER_EVERY = 15.0
"""While the broker stays unreachable, remind the log this often (seconds), not on every try."""

FLAP_WINDOW = 10.0
"""A usable link lost within this many seconds of coming up was closed "soon".

Such a loss counts towards flapping only when the link had come back at the first attempt: the
broker was there all along and ended the connection (what it does to the older of two clients
with one id). A broker that crashed and was restarted refuses the first attempt, and its
clients keep retrying every interval.
"""

FLAP_LIMIT = 3
"""After this many such losses in a row, the link backs off and says why it may be happening."""

FLAP_BACKOFF_MAX = 10.0
"""The longest pause between attempts while a link keeps being closed soon after coming up."""

SUBACK_TIMEOUT = 5.0
"""Seconds a subscription may wait for its SUBACK before the link counts as failed."""

SESSION_TAKEN_OVER = 0x8E
"""The MQTT 5 DISCONNECT reason when another client connected with this one's id."""

LOSS_GRACE = 0.05
"""Seconds a session gets to end by itself once its connection is lost (see Link._until_lost)."""
SUBACK_FAILURE = 0x80
"""The SUBACK return code for a refused subscription (MQTT 3.1.1 section 3.9.3)."""


class Link:
    """Keeps one MQTT client connected through any number of outages."""

    def __init__(
        self,
        client: Client,
        *,
        address: str,
        interval: float,
        topics: Sequence[tuple[str, int]] = (),
        suback_timeout: float = SUBACK_TIMEOUT,
        listener: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
        role: str = "",
        quiet: bool = False,
        fallback: Callable[[], Client] | None = None,
        optional: Collection[str] = (),
    ) -> None:
        """Wrap ``client``; ``interval`` is the pause between attempts (0 in tests).

        ``topics`` are (filter, QoS) pairs subscribed on every connection before the link counts
        as up. A refused one fails the attempt, unless it is ``optional``: its refusal is
        logged once, and the link goes up without it. ``role`` names a secondary connection in
        its log lines, e.g. ``"watcher"``; ``quiet`` logs its events at DEBUG, for a connection
        whose outages the main one reports.
        ``fallback`` makes the MQTT 3.1.1 client that replaces an MQTT 5 one, once, when the
        broker does not speak MQTT 5.
        """
        self.client = client
        self._fallback = fallback
        self._trial: tuple[Client, aiomqtt.MqttError] | None = None
        """While a 3.1.1 client is tried: the MQTT 5 client, and how its attempt failed."""
        self._tried_311 = False
        self.topics = tuple(topics)
        self._optional = frozenset(optional)
        self._subscribed: list[str] = []
        """The filters the broker granted on this connection."""
        self._refusals_told: set[str] = set()
        self.suback_timeout = suback_timeout
        self._prefix = f"{role}: " if role else ""
        self._info = logging.DEBUG if quiet else logging.INFO
        self._warning = logging.DEBUG if quiet else logging.WARNING
        self.address = address
        self.interval = interval
        self.connected = asyncio.Event()
        """Set while the link is up: connected, and every subscription acknowledged."""
        self.ever_connected = asyncio.Event()
        """Set once the link has been up at least once."""
        self.reconnects = 0
        self.attempts = 0
        self._listener = listener
        self._clock = clock
        self._down_since: float | None = clock()
        self._down_total = 0.0
        self._reminded_at = 0.0
        self._stopping = False
        self._greeted = False
        self._up_since = 0.0
        self._at_once = False
        """Whether the link came up at the first attempt after it was last down."""
        self._quick_losses = 0
        self._waiting: tuple[str, float] | None = None
        self._last_error: str | None = None

    @property
    def usable(self) -> bool:
        """Whether a message published now goes out on a live connection.

        :attr:`connected` clears only once the session has wound down and the reconnect loop
        runs again; paho knows of the loss earlier, when it reads the broker's FIN. A fleet of
        1,000 devices took 50 to 160 ms to wind down after a SIGKILL, and the pings its tickers
        sent in between went to clients that could no longer send them, counted as lost.
        """
        return self.connected.is_set() and not self.client.lost.done()

    def downtime(self) -> float:
        """Seconds spent disconnected after the first connection, including an outage under way."""
        if not self.ever_connected.is_set():
            return self._down_total
        current = self._clock() - self._down_since if self._down_since is not None else 0.0
        return self._down_total + current

    def problem(self) -> str:
        """Why the link is not up right now, in a few words (for a one-line verdict)."""
        if self._waiting is not None:
            what, since = self._waiting
            waited = self._clock() - since
            # Between quick failures (a refused connection, garbage after CONNACK) the last
            # error says more than the attempt under way for a few milliseconds, whichever
            # answer (CONNACK or SUBACK) it waits for.
            if self._last_error is not None and waited < 1.0:
                return self._last_error
            return f"no {what} after {waited:.3g} s"
        return self._last_error or "no CONNACK yet"

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
            # What the broker said when an earlier connection ended is not this one's story.
            self.client.disconnect_reason = None
            self.client.disconnect_text = self.client.disconnect_name = None
            try:
                self._waiting = ("CONNACK", self._clock())
                self.client.at_connack = self.topics
                async with self.client:
                    if self._stopping:
                        # The CONNACK came with the stop, and the cancellation was lost: on
                        # Python 3.11, asyncio.wait_for (aiomqtt's wait for the CONNACK) drops
                        # a cancellation that arrives as the future it waits for completes
                        # (python/cpython#86296). An echo_client SIGTERMed 5 ms before its
                        # CONNACK subscribed on, and its shutdown overran its bound.
                        return
                    self._settle_protocol()
                    self._greet()
                    await self._subscribe()
                    self._up()
                    await self._until_lost(session)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    return
                if self._fallback is not None and self._trial is None:
                    if refuses_mqtt5(exc):
                        self.client, self._fallback = self._fallback(), None
                        logger.log(
                            self._warning,
                            "%s%s does not speak MQTT 5 (%s): falling back to MQTT 3.1.1.",
                            self._prefix, self.address, exc,
                        )  # fmt: skip
                        continue
                    if closed_before_connack(exc) and not self._tried_311:
                        # Some 3.1.1-only brokers (RabbitMQ 3.x) hang up on an MQTT 5 CONNECT
                        # without a CONNACK: try 3.1.1 at once, in the same attempt; once per
                        # outage, should the broker hang up on everyone.
                        self._tried_311 = True
                        self._trial = (self.client, exc)
                        self.client = self._fallback()
                        self.attempts -= 1
                        continue
                if self._trial is not None:
                    # 3.1.1 did no better: the broker hangs up on everyone. Report the MQTT 5
                    # attempt, and stay with MQTT 5.
                    self.client, exc = self._trial
                    self._trial = None
                self._down(exc)
            else:
                # A session only returns when its message stream ended without an error.
                self._down(aiomqtt.MqttError("session ended"))
            await asyncio.sleep(self._pause())

    async def _until_lost(self, session: Session) -> None:
        """Run ``session`` until it ends, or until the connection does.

        aiomqtt ends a message iteration when the connection is lost, but not a publish waiting
        for its confirmation: an echo blocked in one when the broker was SIGKILLed noticed the
        loss only when the publish timed out, 5 s later (`test_a_killed_broker_has_the_fleet_
        back_and_says_how_fast`, 2,442 pings lost). A session the loss does not end by itself
        within LOSS_GRACE is cancelled, and the loss reported as the iteration reports it.
        """
        work = asyncio.ensure_future(session(self.client))
        try:
            await asyncio.wait({work, self.client.lost}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await asyncio.wait({work}, timeout=LOSS_GRACE)  # its own error says more
        finally:
            await _cancel(work)
        refused = not work.cancelled() and _refused_unconnected(work)
        if refused:
            # A publish paho refused as "not currently connected" is the loss, seen late, or
            # seen early: paho can refuse before aiomqtt's disconnect callback has run (and
            # told the broker's reason code), so that is awaited a moment.
            await asyncio.wait({self.client.lost}, timeout=LOSS_GRACE)
        if refused or work.cancelled():
            raise aiomqtt.MqttError("Disconnected during message iteration")
        work.result()  # the session's own end, or its error

    def _settle_protocol(self) -> None:
        """After a CONNACK: if it answered the 3.1.1 trial, stay with 3.1.1 for good."""
        if self._trial is None:
            return
        self._trial, self._fallback = None, None
        logger.log(
            self._warning,
            "%s%s hung up on an MQTT 5 CONNECT without a CONNACK, and accepts MQTT 3.1.1:"
            " falling back to MQTT 3.1.1.",
            self._prefix, self.address,
        )  # fmt: skip

    def _pause(self) -> float:
        """Return the pause before the next attempt: longer while the link keeps flapping."""
        if self._quick_losses < FLAP_LIMIT:
            return self.interval
        backoff = 0.5 * 2.0 ** (self._quick_losses - FLAP_LIMIT)
        return max(self.interval, min(backoff, FLAP_BACKOFF_MAX))

    def _greet(self) -> None:
        """Log the first CONNACK ever; later ones are part of a reconnect, logged when it is up."""
        if not self._greeted:
            self._greeted = True
            logger.log(
                self._info,
                "%sConnected to %s as %s.",
                self._prefix,
                self.address,
                self.client.identifier,
            )

    async def _subscribe(self) -> None:
        """Subscribe to every topic; a missing or refusing SUBACK fails the attempt.

        A refusing SUBACK for an optional topic does not.
        """
        self._subscribed = []
        for topic, qos in self.topics:
            self._waiting = (f"SUBACK for {topic}", self._clock())
            try:
                async with asyncio.timeout(self.suback_timeout):
                    granted = await self.client.subscribed(topic, qos)
            except aiomqtt.MqttCodeError as exc:
                if exc.rc != mqtt.MQTT_ERR_NO_CONN:
                    raise
                raise aiomqtt.MqttError(f"connection closed before SUBSCRIBE {topic}") from None
            except TimeoutError:
                raise aiomqtt.MqttError(
                    f"no SUBACK for {topic} within {self.suback_timeout:g} s"
                ) from None
            codes = [int(code) if isinstance(code, int) else code.value for code in granted]
            if any(code >= SUBACK_FAILURE for code in codes):
                if topic not in self._optional:
                    raise aiomqtt.MqttError(
                        f"the broker refused the subscription to {topic} (SUBACK 0x{codes[0]:02x})"
                    )
                if topic not in self._refusals_told:
                    self._refusals_told.add(topic)
                    logger.log(self._warning, "%sThe broker refused the subscription to %s "
                               "(SUBACK 0x%02x): going on without it.", self._prefix, topic,
                               codes[0])  # fmt: skip
                continue
            self._subscribed.append(topic)
        self._waiting = None

    def _up(self) -> None:
        now = self._clock()
        self._tried_311 = False
        if not self.ever_connected.is_set():
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
        if self._subscribed:
            logger.log(self._info, "%sSubscribed to %s.", self._prefix, ", ".join(self._subscribed))
        self._down_since = None
        self._up_since = now
        self._at_once = self.attempts <= 1
        self.attempts = 0
        self.connected.set()
        self._emit("connected", outage_s=round(outage, 6), reconnects=self.reconnects)

    def _down(self, exc: aiomqtt.MqttError) -> None:
        now = self._clock()
        self._waiting = None
        # paho's messages end with a full stop; ours add one.
        self._last_error = str(exc).rstrip(".")
        said = self.client.disconnect_text
        if self.client.disconnect_reason == SESSION_TAKEN_OVER:
            self._last_error = (
                f"session taken over: another client connected as {self.client.identifier!r}"
            )
        elif isinstance(exc.__context__, mqtt.WebsocketConnectionError):
            # paho keeps no word of the HTTP answer (our broker's says where MQTT is).
            self._last_error = (
                f"{self._last_error} (the HTTP upgrade was refused: is the port the broker's"
                " WebSocket port, and --ws-path its path?)"
            )
        elif said:
            # An MQTT 5 broker's reason string says more than paho's name for the reason code.
            self._last_error = f"{self._last_error} (the broker said: {said})"
        elif self.client.disconnect_name is not None:
            # Else the reason code of its DISCONNECT: "Disconnected during message iteration"
            # alone does not say that the broker ended the connection, nor why.
            self._last_error = (
                f"{self._last_error} (the broker's DISCONNECT: {self.client.disconnect_name},"
                f" 0x{self.client.disconnect_reason or 0:02x})"
            )
        retry_ms = round(self.interval * 1000)
        if self.connected.is_set():
            # An established connection broke: always reported, exactly once.
            self.connected.clear()
            self._down_since = now
            self._reminded_at = now
            up_for = now - self._up_since
            quick = up_for < FLAP_WINDOW and self._at_once
            self._quick_losses = self._quick_losses + 1 if quick else 0
            if self._quick_losses >= FLAP_LIMIT:
                self._flapping(up_for)
                self._emit("disconnected", reason=self._last_error)
                return
            logger.log(
                self._warning,
                "%sLost connection to %s: %s. Retrying every %d ms.",
                self._prefix,
                self.address,
                self._last_error,
                retry_ms,
            )
            self._emit("disconnected", reason=self._last_error)
        elif self.attempts == 1 and not self.ever_connected.is_set():
            self._reminded_at = now
            logger.log(
                self._warning,
                "%sCannot connect to %s: %s. Retrying every %d ms.",
                self._prefix,
                self.address,
                self._last_error,
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
                self._last_error,
            )

    def _flapping(self, up_for: float) -> None:
        """Report a link that keeps being closed soon after coming up, and why it may be."""
        if self._quick_losses == FLAP_LIMIT:
            logger.log(
                self._warning,
                "%sThe connection to %s was closed %d times in a row within %.0f s of coming up"
                " (%s). Is another client using the id %r? A broker ends the older connection"
                " of an id. Retrying more slowly, up to every %.0f s.",
                self._prefix,
                self.address,
                self._quick_losses,
                FLAP_WINDOW,
                self._last_error,
                self.client.identifier,
                FLAP_BACKOFF_MAX,
            )
            return
        logger.log(
            self._warning,
            "%sLost connection to %s again after %.1f s (%d times in a row): %s. Retrying in %g s.",
            self._prefix,
            self.address,
            up_for,
            self._quick_losses,
            self._last_error,
            self._pause(),
        )

    def _emit(self, event: str, **data: object) -> None:
        if self._listener is not None:
            self._listener(event, data)


def _refused_unconnected(work: asyncio.Future[None]) -> bool:
    """Tell whether a session ended as paho refused a call for want of a connection."""
    exc = work.exception()
    return isinstance(exc, aiomqtt.MqttCodeError) and exc.rc == mqtt.MQTT_ERR_NO_CONN


async def _cancel(task: asyncio.Future[None], every: float = 0.05) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again while it runs on.

    A session can lose a cancellation (see python/cpython#86296 in :meth:`Link.run`): one
    waiting for a PUBACK that came with the cancellation would go on iterating messages, and
    the link would wait for it, past any shutdown bound. Its outcome is left to the caller.
    """
    try:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=every)
        if not task.cancelled():
            # Seen: a caller stopped now reads no outcome, and asyncio would log an error the
            # session ended with ("Task exception was never retrieved"). Others still get it.
            task.exception()
    except asyncio.CancelledError:
        # Cancelled in turn (a stop): the caller reads no outcome, so this does.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise
