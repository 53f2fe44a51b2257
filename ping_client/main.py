"""The ping client's runtime: tick, publish, match echoes, expire, report, exit by the rules.

Exit status: 0 every ping answered; 1 some lost, or unanswered when the deadline cut the run
short; 2 the link never became usable (no CONNACK, or no SUBACK); 64 bad usage; 124 the
shutdown overran its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final

import aiomqtt
from paho.mqtt.properties import Properties

from common import logs
from common.aiomqtt_fixes import Client
from common.client import fallback, make_client
from common.constants import EXIT_UNAVAILABLE, EXIT_USAGE
from common.lifecycle import CLIENT_SHUTDOWN_LIMIT, install_stop_handlers, raise_open_files
from common.properties import ping_request
from common.reconnect import Link
from common.show import show
from ping_client.limits import too_large
from ping_client.probe import Ping, Tracker, Verdict, decimals_for, percentile
from ping_client.report import Reporter, Summary, ms, summarize, text
from ping_client.settings import PingSettings, parse

logger = logging.getLogger("ping_client")

DUPLICATE_GRACE: Final = 0.5
"""Seconds an extra echo waits to be told apart: the watcher's report of another client's ping
with the same payload can come after that client's echo, on the other connection."""

EXIT_ANSWERED: Final = 0
EXIT_LOSS: Final = 1
EXIT_NEVER_CONNECTED: Final = 2


class Probe:
    """One ping client: a Link to the broker, a fixed-rate ticker, and the tracker."""

    def __init__(
        self,
        settings: PingSettings,
        reporter: Reporter,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Prepare the probe; nothing connects until :meth:`run`."""
        self.settings = settings
        self.client_settings = settings.client
        self.reporter = reporter
        self.clock = clock
        self.wall = wall
        self.tracker = Tracker(timeout=settings.timeout, memory=max(60.0, 10 * settings.timeout),
                               grace=DUPLICATE_GRACE)  # fmt: skip
        self.target = settings.client.address
        self.link = Link(
            make_client(settings.client),
            fallback=fallback(settings.client),
            address=self.target,
            interval=settings.client.reconnect_interval,
            topics=[(settings.client.pong_topic, settings.client.qos)],
            listener=self._on_link,
            clock=clock,
        )
        # A second connection watches the ping topic. Seeing other publishers' pings with our
        # payloads keeps their echoes from counting as our duplicates. It is separate so that
        # the measured path carries only pings and pongs: on the same connection, a copy of
        # each ping arriving just before its pong can hold the pong back on a broker without
        # TCP_NODELAY (mosquitto's default) for up to one interval.
        watching = replace(
            settings.client, client_id=settings.client.client_id + "-watch", persistent=False
        )
        self.watcher = Link(
            make_client(watching),
            fallback=fallback(watching),
            address=self.target,
            interval=settings.client.reconnect_interval,
            topics=[(settings.client.ping_topic, 0)],
            clock=clock,
            role="watcher",
            quiet=True,
        )
        self.done = asyncio.Event()
        self.too_large = False
        """Whether the run ended at a ping over the broker's Maximum Packet Size (exit 64)."""
        self.deadline_reached = False
        self.held_back: float | None = None
        """Seconds before --deadline in which no ping went out (a timed run), once it ended."""
        self.not_sent = 0
        self.started = clock()
        self._sent_event = asyncio.Event()
        self._ticks_done = False
        self._unanswered_since: float | None = None
        self._silent = False
        self._decimals = 6 if settings.back_to_back else decimals_for(settings.interval)
        self._answered = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()

    # --- connection -----------------------------------------------------------------------

    def _on_link(self, event: str, data: dict[str, object]) -> None:
        if self.reporter.json_mode:
            self.reporter.write({"event": event, "time": round(self.wall(), 6), **data})
        for observer in self.reporter.observers:
            observer(event, data)
        if event == "connected":
            # Pings lost to the outage say nothing about the echo side.
            self._unanswered_since = None

    async def session(self, client: aiomqtt.Client) -> None:
        """Handle every echo until the link breaks (the Link has subscribed to the pong topic)."""
        pong = self.client_settings.pong_topic
        async for message in client.messages:
            now = self.clock()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if message.topic.matches(pong):
                self._on_echo(payload, now)

    async def watch(self, client: aiomqtt.Client) -> None:
        """Note every message on the ping topic: our own copies and other publishers' pings."""
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.tracker.on_ping_copy(payload, self.clock())

    # --- echoes ---------------------------------------------------------------------------

    def _on_echo(self, payload: bytes, now: float) -> None:
        echo = self.tracker.on_echo(payload, now)
        pong = self.client_settings.pong_topic
        ping = echo.ping
        if echo.verdict is Verdict.UNEXPECTED:
            self.reporter.event(
                "unexpected",
                logging.WARNING,
                "Unexpected %s on %s: matches no ping of ours; ignored.",
                show(payload),
                pong,
                payload=text(payload),
            )
            return
        if echo.verdict is Verdict.FOREIGN or ping is None:
            logger.debug("Echo %s belongs to another ping client; ignored.", show(payload))
            return
        if echo.verdict is Verdict.UNSETTLED:
            logger.debug(
                "Extra echo %s: a duplicate unless another client's ping of the same payload "
                "shows up within %g s.", show(payload), DUPLICATE_GRACE,
            )  # fmt: skip
            self._sent_event.set()  # the expirer settles it
            return
        rtt = now - ping.sent
        if echo.verdict is Verdict.MATCHED:
            self.reporter.event(
                "pong",
                logging.INFO,
                "Got %s on %s: seq %d, rtt %.3f ms.",
                show(payload),
                pong,
                ping.seq,
                rtt * 1000,
                seq=ping.seq,
                payload=text(payload),
                rtt_ms=ms(rtt),
            )
            self._heard(now)
        elif echo.verdict is Verdict.LATE:
            self.reporter.event(
                "late",
                logging.WARNING,
                "Late echo %s on %s: seq %d after %.3f ms (counted lost).",
                show(payload),
                pong,
                ping.seq,
                rtt * 1000,
                seq=ping.seq,
                payload=text(payload),
                rtt_ms=ms(rtt),
            )
            self._heard(now)
        else:
            self._duplicate(ping)

    def _duplicate(self, ping: Ping) -> None:
        self.reporter.event(
            "duplicate",
            logging.WARNING,
            "Duplicate echo %s on %s: seq %d.",
            show(ping.payload),
            self.client_settings.pong_topic,
            ping.seq,
            seq=ping.seq,
            payload=text(ping.payload),
        )

    def _heard(self, now: float) -> None:
        if self._silent:
            since = self._unanswered_since if self._unanswered_since is not None else now
            self.reporter.event(
                "echo_back",
                logging.WARNING,
                "Echoes are back after %.1f s of silence.",
                now - since,
                silence_s=round(now - since, 3),
            )
            self._silent = False
        self._unanswered_since = None
        self._answered.set()
        self._maybe_done()

    # --- pings ----------------------------------------------------------------------------

    async def ticker(self, tg: asyncio.TaskGroup) -> None:
        """Publish one ping per interval on a fixed schedule, until --count pings are sent.

        Pings go out only while the link is up (SUBACK received): an echo of one sent before
        could find the subscription not yet in place and be counted lost (seen with a busy
        broker). Under a deadline, no ping goes out in the last ``min(interval, timeout)``
        seconds, so that every ping sent has time to be answered before the run ends.
        """
        interval = self.settings.interval
        # The schedule starts one interval after the first subscription is acknowledged, which
        # gives an echo client started at the same moment (as supervisord does) time to
        # subscribe too.
        await self.link.connected.wait()
        start = self.clock()
        last_send = math.inf
        if self.settings.deadline is not None:
            last_send = self.started + self.settings.deadline - min(interval, self.settings.timeout)
        if self.settings.back_to_back:
            await self._flood(tg, last_send)
            return
        tick = 1
        while self.settings.count is None or self.tracker.sent < self.settings.count:
            due = start + tick * interval
            if due > last_send:
                if self.settings.count is not None:
                    return  # a counted run cut short: the deadline ends it, as unanswered
                self.held_back = min(interval, self.settings.timeout)
                break  # a timed run: it ends once the pings sent so far are settled
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > interval:
                # The loop stalled for more than a tick: rejoin the schedule, don't burst.
                tick = int((self.clock() - start) / interval)
            tick += 1
            self._check_silence(self.clock())
            if not self.link.usable:  # disconnected, or not yet subscribed again
                self.not_sent += 1
                continue
            self._send(tg)
        self._ticks_done = True
        self._maybe_done()

    async def _flood(self, tg: asyncio.TaskGroup, last_send: float) -> None:
        """Send each ping once the previous one is answered (or its timeout passes)."""
        timeout = self.settings.timeout
        while self.settings.count is None or self.tracker.sent < self.settings.count:
            if self.clock() > last_send:
                if self.settings.count is not None:
                    return  # cut short by the deadline: the rest count as unanswered
                self.held_back = min(self.settings.interval, timeout)
                break
            if not self.link.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.link.connected.wait(), timeout)
                continue
            self._check_silence(self.clock())
            self._answered.clear()
            self._send(tg)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), timeout)
        self._ticks_done = True
        self._maybe_done()

    def _send(self, tg: asyncio.TaskGroup) -> None:
        topic = self.client_settings.ping_topic
        payload = self.tracker.next_payload(self.wall(), self._decimals, self.settings.size)
        client = self.link.client
        properties = self._properties(client, payload)
        size = client.oversized(topic, payload, self.client_settings.qos, properties)
        if size is not None:
            self._too_large(client, payload, size)
            return
        # Record before publishing: the echo can arrive before publish() returns.
        ping = self.tracker.on_sent(payload, self.clock())
        if self._unanswered_since is None:
            self._unanswered_since = ping.sent
        self._sent_event.set()
        self.reporter.event(
            "ping",
            logging.INFO,
            "Publishing %s on %s.",
            show(payload),
            topic,
            seq=ping.seq,
            payload=text(payload),
        )
        publishing = self._publish(client, payload, properties)
        task = tg.create_task(publishing, name=f"publish-{ping.seq}")
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def _properties(self, client: Client, payload: bytes) -> Properties | None:
        """Return a ping's MQTT 5 request/response properties; none in MQTT 3.1.1."""
        if client.protocol_level != 5:
            return None
        # A persistent session keeps pings queued through an outage: no expiry then.
        timeout = None if self.client_settings.persistent else self.settings.timeout
        return ping_request(self.client_settings.pong_topic, payload, timeout)

    def _too_large(self, client: Client, payload: bytes, size: int) -> None:
        """End the run: this ping, and every later one, is over the broker's packet size.

        The broker would end the connection at each (0x95), and the run would lose them all
        in a reconnect loop.
        """
        advice = too_large(
            client, payload, size, topic=self.client_settings.ping_topic,
            qos=self.client_settings.qos, properties=functools.partial(self._properties, client),
        )  # fmt: skip
        logger.error("%s", advice)
        self.too_large = True
        self.done.set()

    async def _publish(self, client: Client, payload: bytes, properties: Properties | None) -> None:
        try:
            await client.publish(
                self.client_settings.ping_topic, payload, qos=self.client_settings.qos,
                properties=properties,
            )  # fmt: skip
        except aiomqtt.MqttError as exc:
            # The Link reports the broken connection; the ping will time out as lost.
            logger.debug("Publish of %s failed: %s", show(payload), exc)

    async def expirer(self) -> None:
        """Declare pings lost when their timeout passes."""
        while True:
            deadline = self.tracker.next_deadline()
            if deadline is None:
                self._sent_event.clear()
                await self._sent_event.wait()
                continue
            delay = deadline - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.clock()
            for ping in self.tracker.expire(now):
                self.reporter.event(
                    "lost",
                    logging.WARNING,
                    "Lost %s on %s: seq %d, no echo within %.3g s.",
                    show(ping.payload),
                    self.client_settings.ping_topic,
                    ping.seq,
                    self.settings.timeout,
                    seq=ping.seq,
                    payload=text(ping.payload),
                )
            for ping in self.tracker.settle(now):
                self._duplicate(ping)
            self._check_silence(now)
            self._maybe_done()

    def _check_silence(self, now: float) -> None:
        since = self._unanswered_since
        if self._silent or since is None or not self.link.connected.is_set():
            return
        if now - since >= self.settings.silence:
            self._silent = True
            self.reporter.event(
                "silence",
                logging.WARNING,
                "No echo for %.0f s: is echo_client running on %s?",
                now - since,
                self.client_settings.ping_topic,
                silence_s=round(now - since, 3),
            )

    def _maybe_done(self) -> None:
        if self._ticks_done and not self.tracker.outstanding:
            self.done.set()

    # --- live status ----------------------------------------------------------------------

    async def status(self) -> None:
        """Log a one-line summary of the last stats interval, for `make logs` at a glance."""
        every = self.settings.stats_interval
        t = self.tracker
        last = (t.sent, t.received, t.lost, len(t.rtts))
        while True:
            await asyncio.sleep(every)
            sent, received, lost, n = t.sent, t.received, t.lost, len(t.rtts)
            window = sorted(t.rtts[last[3] : n])
            rtt = "no rtt"
            if window:
                p50, p99 = ms(percentile(window, 50)), ms(percentile(window, 99))
                rtt = f"rtt p50 {p50:.3f} ms, p99 {p99:.3f} ms"
            logger.info(
                "Last %.0f s: %d sent, %d received, %d lost, %s.",
                every,
                sent - last[0],
                received - last[1],
                lost - last[2],
                rtt,
            )
            last = (sent, received, lost, n)

    # --- whole run ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> Summary:
        """Run until a stop signal, --count completion, or --connect-timeout; return the summary."""
        settings, client = self.settings, self.client_settings
        pace = "back to back" if settings.back_to_back else f"every {settings.interval:g} s"
        if settings.flood:
            pace += " (flood)"
        protocol = "3.1.1" if client.protocol == 4 else "5"
        size = f", {settings.size}-byte payloads" if settings.size else ""
        # ping's first line: what is pinged, how.
        self.reporter.event(
            "start", logging.INFO, "PING %s: %s, QoS %d, MQTT %s, %s -> %s%s.",
            self.target, pace, client.qos, protocol, client.ping_topic, client.pong_topic, size,
            target=self.target, interval=None if settings.back_to_back else settings.interval,
            qos=client.qos, protocol=protocol, size=settings.size,
        )  # fmt: skip
        logger.info(
            "A second connection, %s, only watches %s: pings from other publishers are then "
            "not taken for duplicates of ours.", self.watcher.client.identifier,
            self.client_settings.ping_topic,
        )  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self.link.run(self.session), name="ping-link"),
                tg.create_task(self.watcher.run(self.watch), name="ping-watcher"),
                tg.create_task(self.ticker(tg), name="ping-ticker"),
                tg.create_task(self.expirer(), name="ping-expirer"),
            ]
            if self.settings.stats_interval > 0:
                workers.append(tg.create_task(self.status(), name="ping-status"))
            ends: list[asyncio.Task[object]] = [
                tg.create_task(stop.wait(), name="wait-stop"),
                tg.create_task(self.done.wait(), name="wait-done"),
            ]
            if self.settings.connect_timeout is not None:
                ends.append(tg.create_task(self._connect_deadline(), name="connect-deadline"))
            if self.settings.deadline is not None:
                deadline = self._run_deadline(self.settings.deadline)
                ends.append(tg.create_task(deadline, name="run-deadline"))
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            self.link.stop()
            self.watcher.stop()
            # Publishes still waiting for their PUBACK would wait out aiomqtt's timeout (5 s)
            # once the connection is closed: past the shutdown bound.
            for task in [*workers, *ends, *self._publishing]:
                task.cancel()
        return self.summary()

    def summary(self) -> Summary:
        """Return what the run has seen so far."""
        return summarize(
            self.tracker,
            target=self.target,
            not_sent=self.not_sent,
            elapsed=self.clock() - self.started,
            disconnected=self.link.downtime(),
            reconnects=self.link.reconnects,
            connected=self.link.ever_connected.is_set(),
            count=self.settings.count,
            deadline=self.settings.deadline if self.deadline_reached else None,
            problem=None if self.link.ever_connected.is_set() else self.link.problem(),
            held_back=(self.held_back, self.settings.deadline) if self.held_back else None,
        )

    async def _connect_deadline(self) -> None:
        timeout = self.settings.connect_timeout
        try:
            await asyncio.wait_for(self.link.ever_connected.wait(), timeout)
        except TimeoutError:
            # One line says what the broker did wrong; a traceback would add nothing.
            logger.error(  # noqa: TRY400
                "No usable link to %s within %.3g s: %s.", self.target, timeout, self.link.problem()
            )
            return
        await asyncio.Event().wait()  # usable in time: this deadline never fires

    async def _run_deadline(self, deadline: float) -> None:
        await asyncio.sleep(self.started + deadline - self.clock())
        self.deadline_reached = True
        if not self.link.ever_connected.is_set():
            logger.error(
                "No usable link to %s within the %.3g s deadline: %s.",
                self.target,
                deadline,
                self.link.problem(),
            )
        else:
            logger.warning(
                "Deadline of %.3g s reached with %d pings unanswered.",
                deadline,
                self.summary().unanswered,
            )


def exit_code(summary: Summary) -> int:
    """Map a summary to the exit status: 2 never usable, 1 lost or unanswered, 0 all answered."""
    if not summary.connected:
        return EXIT_NEVER_CONNECTED
    if summary.lost or summary.unanswered:
        return EXIT_LOSS
    return EXIT_ANSWERED


async def amain(settings: PingSettings) -> int:
    """Run the probe and print its summary; return the exit status."""
    stop = asyncio.Event()
    install_stop_handlers(stop, hard_limit=CLIENT_SHUTDOWN_LIMIT)
    if settings.devices > 1:
        return await fleet_main(settings, stop)
    marks = sys.stderr if settings.flood and sys.stderr.isatty() else None
    reporter = Reporter(json_mode=settings.json, out=sys.stdout, flood=settings.flood,
                        marks=marks)  # fmt: skip
    probe = Probe(settings, reporter)
    server = await serve_metrics(settings, probe.target, reporter)
    try:
        summary = await probe.run(stop)
    finally:
        if server is not None:
            server.close()
    if marks is not None:
        marks.write("\n")  # the dots end their line
    if settings.json:
        reporter.write({"event": "summary", "time": round(time.time(), 6), **summary.as_dict()})
        # People watching a JSON run still see the summary, on stderr with the log.
        sys.stderr.write(summary.as_text())
    else:
        sys.stdout.write(summary.as_text())
        sys.stdout.flush()
    return EXIT_USAGE if probe.too_large else exit_code(summary)


async def serve_metrics(
    settings: PingSettings, target: str, reporter: Reporter
) -> asyncio.Server | None:
    """Serve --metrics-port, fed by ``reporter``'s events; None when it is off.

    Exit 69 with one line when the port cannot be served.
    """
    if settings.metrics_port is None:
        return None
    # Imported only when asked for: prometheus_client is not part of a plain probe's start.
    from common.metrics import MetricsPortError, serve  # noqa: PLC0415
    from ping_client.metrics import ProbeMetrics  # noqa: PLC0415

    metrics = ProbeMetrics(target)
    reporter.observers.append(metrics.on_event)
    try:
        server = await serve(metrics.registry, "127.0.0.1", settings.metrics_port)
    except MetricsPortError as exc:
        sys.stderr.write(f"ping_client: error: --metrics-port: {exc}\n")
        raise SystemExit(EXIT_UNAVAILABLE) from None
    logger.info("Metrics for Prometheus at http://127.0.0.1:%d/metrics.", settings.metrics_port)
    return server


OPEN_FILES_SPARE = 64
"""Open files a fleet keeps beside its devices' sockets: stdio, the loop, --metrics-port."""


async def fleet_main(settings: PingSettings, stop: asyncio.Event) -> int:
    """Run a fleet of devices (--devices N) and print its summary; return the exit status."""
    from ping_client.fleet import Fleet, fleet_exit_code  # noqa: PLC0415

    # One descriptor a device (paho under aiomqtt holds no socketpair), and a few of our own.
    # Without this check, a fleet of 2,000 under the usual limit of 1,024 brought up 1,016
    # devices and said nothing of the others.
    allowed, needed = raise_open_files(), settings.devices + OPEN_FILES_SPARE
    if allowed < needed:
        sys.stderr.write(
            f"ping_client: error: --devices {settings.devices} needs about {needed} open files,"
            f" and this process may have {allowed} (ulimit -n): raise that limit, or ask for"
            " fewer devices\n"
        )
        return EXIT_USAGE
    progress = sys.stderr if sys.stderr.isatty() and not settings.json else None
    fleet = Fleet(settings, progress=progress)
    server = await serve_metrics(settings, fleet.target, fleet.reporter)
    try:
        summary = await fleet.run(stop)
    finally:
        if server is not None:
            server.close()
    if settings.json:
        fleet.reporter.write({"event": "summary", "time": round(time.time(), 6),
                              **summary.as_dict()})  # fmt: skip
        sys.stderr.write(summary.as_text())
    else:
        sys.stdout.write(summary.as_text())
    sys.stdout.flush()
    return EXIT_USAGE if fleet.too_large else fleet_exit_code(summary)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ping client as a program: ``python -m ping_client --help``."""
    settings = parse(argv, os.environ)
    level = settings.client.log_level
    if settings.quiet and level in ("DEBUG", "INFO"):
        level = "WARNING"  # ping -q: the summary, and what goes wrong
    logs.configure("client", level)
    sys.exit(asyncio.run(amain(settings)))
