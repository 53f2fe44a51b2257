"""A fleet of simulated devices in one process: ``ping_client --devices N``.

Each device is its own MQTT connection (client id ``<client-id>-<i>``, the 100 ms reconnect
loop of :class:`common.reconnect.Link`) and pings every ``--interval``. With MQTT 5 it uses
request/response: its own response topic (``<pong-topic>/<client-id>-<i>``) and the payload as
correlation data. MQTT 3.1.1 has no response topic, so a 3.1.1 device pings on its own topic,
``<ping-topic>/<client-id>-<i>``, which the echo_client answers on the same response topic.
Either way one echo_client (or several with ``--share``) answers them all and no device sees
another's echoes. Devices come up at ``--connect-rate`` per second, and each one's
first ping is delayed by up to ``--jitter`` seconds, so that N devices do not fire in lockstep.

The summary is ping(8)'s, for the whole fleet: sent, received, lost, late; RTT min/avg/max/mdev
and p50/p90/p99/p99.9; connect times; reconnects; the devices that lost anything, worst first.
On a terminal a one-line progress display is redrawn every second (not in logs or ``--json``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import aiomqtt
from paho.mqtt.properties import Properties

from common.aiomqtt_fixes import Client
from common.client import make_client
from common.properties import ping_request
from common.reconnect import Link
from ping_client.limits import too_large
from ping_client.probe import Tracker, decimals_for, percentile, rtt_stats
from ping_client.report import Reporter
from ping_client.settings import PingSettings, device_names

logger = logging.getLogger("ping_client")


@dataclass
class Device:
    """One simulated device: its link, its pings, and when it first came up."""

    index: int
    ping_topic: str
    """Where it pings: the ping topic (MQTT 5), or its own under it (MQTT 3.1.1)."""
    response_topic: str
    link: Link
    tracker: Tracker
    started: float = 0.0
    connect_time: float | None = None
    not_sent: int = 0


VERDICTS = {"MATCHED": ("pong", logging.DEBUG), "LATE": ("late", logging.WARNING),
            "DUPLICATE": ("duplicate", logging.WARNING)}  # fmt: skip
"""How each kind of echo is reported (a device's pongs are not logged one by one)."""


@dataclass(frozen=True)
class FleetSummary:
    """What the fleet's final report says."""

    target: str
    devices: int
    ever_up: int
    sent: int
    received: int
    lost: int
    late: int
    duplicates: int
    not_sent: int
    in_flight: int
    elapsed: float
    reconnects: int
    rtts: list[float] = field(repr=False)
    connect_times: list[float] = field(repr=False)
    worst: list[tuple[int, int]] = field(default_factory=list)
    """(device index, pings lost), worst first: the devices that lost anything."""
    recoveries: list[tuple[float, float]] = field(default_factory=list)
    """Per outage: seconds until every device was up again, from the first loss and from the
    first device back (the broker up again)."""
    problem: str | None = None
    """Why no device ever came up (the first device's link says), when none did."""
    held_back: tuple[float, float] | None = None
    """A timed run under --deadline: (seconds before it in which no device pings, the deadline)."""
    cut_by: float | None = None
    """The deadline in seconds (given or derived) when it cut the run short, else None."""
    unanswered: int = 0
    """When --deadline cut a --count run short: its pings not answered, in flight or never
    sent (as the single probe counts them)."""

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data."""
        stats = rtt_stats(self.rtts)
        ordered = sorted(self.rtts)
        connects = sorted(self.connect_times)
        return {
            "target": self.target, "devices": self.devices, "devices_ever_up": self.ever_up,
            "sent": self.sent, "received": self.received, "lost": self.lost, "late": self.late,
            "duplicates": self.duplicates, "not_sent": self.not_sent,
            "in_flight": self.in_flight, "unanswered": self.unanswered,
            "elapsed_s": round(self.elapsed, 3),
            "reconnects": self.reconnects,
            "rtt_ms": None if stats is None else {
                "min": _ms(stats.minimum), "avg": _ms(stats.average), "max": _ms(stats.maximum),
                "mdev": _ms(stats.mdev), "p50": _ms(stats.p50), "p90": _ms(stats.p90),
                "p99": _ms(stats.p99), "p99_9": _ms(percentile(ordered, 99.9)),
            },
            "connect_ms": None if not connects else {
                "p50": _ms(percentile(connects, 50)), "p99": _ms(percentile(connects, 99)),
            },
            "worst": [{"device": d, "lost": n} for d, n in self.worst[:10]],
            "problem": self.problem,
            "fleet_back_s": [{"after_loss": round(a, 3), "after_first_back": round(b, 3)}
                             for a, b in self.recoveries],
        }  # fmt: skip

    def as_text(self) -> str:
        """Return ping(8)'s statistics block, for the fleet."""
        data = self.as_dict()
        loss = 100.0 * self.lost / self.sent if self.sent else 0.0
        lines = [
            f"--- {self.target} fleet ping statistics ---",
            f"{self.devices} devices ({self.ever_up} came up), {self.sent} sent, "
            f"{self.received} received, {self.lost} lost, {self.late} late, {loss:.1f}% loss, "
            f"time {self.elapsed:.1f} s",
        ]
        if self.problem is not None:
            lines.append(f"no device ever connected: {self.problem}")
        rtt = data["rtt_ms"]
        if rtt is not None:
            lines.append(
                f"rtt min/avg/max/mdev = {rtt['min']:.3f}/{rtt['avg']:.3f}/{rtt['max']:.3f}/"
                f"{rtt['mdev']:.3f} ms, p50/p90/p99/p99.9 = {rtt['p50']:.3f}/{rtt['p90']:.3f}/"
                f"{rtt['p99']:.3f}/{rtt['p99_9']:.3f} ms"
            )
        connect = data["connect_ms"]
        if connect is not None:
            lines.append(f"connect p50/p99 = {connect['p50']:.1f}/{connect['p99']:.1f} ms, "
                         f"reconnects {self.reconnects}")  # fmt: skip
        for after_loss, after_back in self.recoveries:
            lines.append(f"fleet back in {after_back:.3f} s after the broker answered again "
                         f"({after_loss:.3f} s after the first loss)")  # fmt: skip
        if self.not_sent:
            lines.append(f"{self.not_sent} pings not sent (a device's link was down)")
        if self.held_back is not None:
            held, deadline = self.held_back
            lines.append(f"no ping in the last {held:g} s before the {deadline:g} s deadline, "
                         "so that each one sent could be answered")  # fmt: skip
        if self.unanswered and self.cut_by is not None:
            lines.append(f"deadline {self.cut_by:g} s reached, {self.unanswered} unanswered")
        if self.worst:
            shown = ", ".join(f"{d} ({n} lost)" for d, n in self.worst[:10])
            more = f" and {len(self.worst) - 10} more" if len(self.worst) > 10 else ""
            lines.append(f"devices that lost pings, worst first: {shown}{more}")
        return "\n".join(lines) + "\n"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def fleet_exit_code(summary: FleetSummary) -> int:
    """0 every ping answered, 1 some lost (or unanswered), 2 no device ever usable."""
    if not summary.ever_up:
        return 2
    if summary.lost or summary.in_flight or summary.unanswered or summary.received < summary.sent:
        return 1
    return 0


class Fleet:
    """N devices, each pinging through the broker; one summary."""

    def __init__(
        self, settings: PingSettings, *, out: TextIO = sys.stdout, progress: TextIO | None = None
    ) -> None:
        """Prepare ``settings.devices`` devices; nothing connects until :meth:`run`."""
        self.settings = settings
        client = settings.client
        brokers = settings.brokers or ((client.host, client.port),)
        self.target = ",".join(settings.client.address_of(host, port) for host, port in brokers)
        """The brokers pinged, as the summary and the metrics name them."""
        self.v5 = client.protocol == 5
        self.reporter = Reporter(json_mode=settings.json, out=out)
        """Writes the JSON events (the log lines go through ``logger``)."""
        self.progress = progress
        self.devices: list[Device] = []
        for index in range(settings.devices):
            host, port = brokers[index % len(brokers)]  # in turn: device i on broker i mod n
            client_id, response, own_ping = device_names(client, index)
            own = replace(client, client_id=client_id, host=host, port=port)
            ping = client.ping_topic if self.v5 else own_ping
            link = Link(
                make_client(own), address=own.address,
                interval=client.reconnect_interval,
                topics=[(response, client.qos)], quiet=True,
                listener=functools.partial(self._on_link, index),
            )  # fmt: skip
            self.devices.append(
                Device(index, ping, response, link, Tracker(timeout=settings.timeout))
            )
        self.started = time.monotonic()
        self.done = asyncio.Event()
        self._decimals = decimals_for(settings.interval)
        self._up = 0
        self._stopping = False
        """Set before the tasks are cancelled: a cancellation that a library swallows (Python
        3.11's asyncio.wait_for can, when what it waits for completes at that moment) still
        ends the ticker at its next tick."""
        self.too_large = False
        """Whether the run ended at a ping over the broker's Maximum Packet Size (exit 64)."""
        self._cut = False
        """Whether --deadline ended the run (then a --count run's missing pings are unanswered)."""
        self._all_up_once = False
        self._outage: tuple[float, float | None] | None = None
        """(when the first device lost its link, when the first came back), during an outage."""
        self.recoveries: list[tuple[float, float]] = []
        """Per outage of the fleet: seconds from the first loss, and from the first device
        back, until every device was up again."""

    # --- events -----------------------------------------------------------------------------

    def _event(self, name: str, device: Device, level: int, message: str, **data: Any) -> None:  # noqa: ANN401
        self.reporter.event(name, level, "%s", message, device=device.index, **data)

    def _on_link(self, index: int, event: str, data: dict[str, object]) -> None:
        device = self.devices[index]
        now = time.monotonic()
        if event == "connected":
            self._up += 1
            if device.connect_time is None:
                device.connect_time = now - device.started
            if self._outage is not None:
                lost_at, back_at = self._outage
                if back_at is None:
                    back_at = now
                    self._outage = (lost_at, back_at)
                if self._up == len(self.devices):
                    self._outage = None
                    self.recoveries.append((now - lost_at, now - back_at))
                    logger.warning(
                        "Fleet back: all %d devices up again %.3f s after the first lost its "
                        "link, %.3f s after the first came back.", self._up, now - lost_at,
                        now - back_at,
                    )  # fmt: skip
            elif self._up == len(self.devices) and not self._all_up_once:
                self._all_up_once = True
                logger.info("All %d devices up after %.3f s.", self._up, now - self.started)
            self._event("connected", device, logging.DEBUG,
                        f"Device {device.index} up.", **data)  # fmt: skip
        elif event == "disconnected":
            if self._all_up_once and self._outage is None:
                self._outage = (now, None)
            self._up -= 1
            self._event("disconnected", device, logging.WARNING,
                        f"Device {device.index} lost its link: {data.get('reason')}.",
                        **data)  # fmt: skip

    async def _session(self, device: Device, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            now = time.monotonic()
            echo = device.tracker.on_echo(payload, now)
            kind = VERDICTS.get(echo.verdict.name)
            if kind is not None and echo.ping is not None:
                name, level = kind
                rtt = {} if echo.rtt is None else {"rtt_ms": _ms(echo.rtt)}
                self._event(name, device, level, f"Device {device.index}: {name} "
                            f"{payload!r}, seq {echo.ping.seq}.", seq=echo.ping.seq,
                            **rtt)  # fmt: skip
            self._maybe_done()

    # --- pings ------------------------------------------------------------------------------

    async def _ticker(self, device: Device) -> None:
        settings = self.settings
        await device.link.connected.wait()  # the first ping goes to a usable link
        await asyncio.sleep(random.uniform(0, settings.jitter))  # noqa: S311 - not a secret
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        # Under a deadline, as the single probe: no ping in the last min(interval, timeout)
        # seconds, so that every ping sent has time to be answered before the run ends.
        last = math.inf
        if settings.deadline is not None:
            last = next_at + settings.deadline - (time.monotonic() - self.started)
            last -= min(settings.interval, settings.timeout)
        sent = 0
        while (settings.count is None or sent < settings.count) and not self._stopping:
            if next_at > last:
                break
            if device.link.usable:
                await self._ping(device)
            else:
                device.not_sent += 1
            sent += 1
            next_at += settings.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        self._maybe_done()

    async def _ping(self, device: Device) -> None:
        client = device.link.client
        publishing = asyncio.ensure_future(self._publish(device, client))
        # Until it is written, or the connection is lost: aiomqtt would wait out its timeout
        # (5 s) for a publish the lost connection never confirms, and this device's ticker
        # with it (common.reconnect.Link._until_lost says more).
        try:
            await asyncio.wait({publishing, client.lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not publishing.done():
                publishing.cancel()
                await asyncio.wait({publishing})  # it ends; wait() raises none of its errors
        if publishing.cancelled():
            logger.debug("Device %d: publish dropped: the link was lost.", device.index)
        elif isinstance(publishing.exception(), aiomqtt.MqttError):
            logger.debug("Device %d: publish failed: %s", device.index, publishing.exception())
        else:
            publishing.result()  # done; any other error is a bug, and raised

    async def _publish(self, device: Device, client: Client) -> None:
        """Send one ping, if the link is still usable when this task first runs.

        That is a loop iteration or more after the ticker made the task: 50 ms later in one
        fleet of 1,000 after a SIGKILL, time enough for paho to see the connection end. Such a
        ping was counted as sent and lost; paho had refused it (at QoS 1 it keeps one to send
        again after the reconnect, at QoS 0 nothing). Now it is not sent, as while the link is
        down. The check, the count and paho's publish run in one step, with nothing between.
        """
        if not device.link.usable:
            device.not_sent += 1
            return
        tracker = device.tracker
        payload = tracker.next_payload(time.time(), self._decimals, self.settings.size)
        qos = self.settings.client.qos
        properties = self._properties(device, payload)
        size = client.oversized(device.ping_topic, payload, qos, properties)
        if size is not None:
            # As the single probe: every ping would be too large, and cost its device the
            # connection. The fleet ends at the first, said once (exit 64).
            if not self.too_large:
                self.too_large = True
                advice = too_large(
                    client, payload, size, topic=device.ping_topic, qos=qos,
                    properties=functools.partial(self._properties, device),
                )  # fmt: skip
                logger.error("%s", advice)
            self.done.set()
            return
        ping = tracker.on_sent(payload, time.monotonic())
        self._event("ping", device, logging.DEBUG, f"Device {device.index}: ping {payload!r}.",
                    seq=ping.seq)  # fmt: skip
        await client.publish(device.ping_topic, payload, qos=qos, properties=properties)

    def _properties(self, device: Device, payload: bytes) -> Properties | None:
        """Return a device's ping's MQTT 5 request/response properties; none in 3.1.1."""
        if not self.v5:
            return None
        return ping_request(device.response_topic, payload, self.settings.timeout)

    async def _expirer(self) -> None:
        step = min(0.25, self.settings.timeout / 4)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for device in self.devices:
                for ping in device.tracker.expire(now):
                    self._event("lost", device, logging.WARNING,
                                f"Device {device.index}: lost ping seq {ping.seq}, no echo "
                                f"within {self.settings.timeout:g} s.", seq=ping.seq)  # fmt: skip
            self._maybe_done()

    async def _connect_deadline(self, seconds: float) -> None:
        """End the run if no device is usable within --connect-timeout (exit 2)."""
        await asyncio.sleep(seconds)
        if any(d.connect_time is not None for d in self.devices):
            await asyncio.Event().wait()  # some came up: the run goes on

    def _maybe_done(self) -> None:
        count = self.settings.count
        if count is None:
            return
        if all(d.tracker.sent + d.not_sent >= count and not d.tracker.outstanding
               for d in self.devices):  # fmt: skip
            self.done.set()

    async def _show_progress(self) -> None:
        out = self.progress
        if out is None:
            return
        while True:
            await asyncio.sleep(1.0)
            s = self.summary()
            recent = sorted(s.rtts[-1000:])
            p50 = f", p50 {percentile(recent, 50) * 1000:.2f} ms" if recent else ""
            out.write(f"\r{self._up}/{s.devices} devices up, {s.sent} sent, {s.received} "
                      f"received, {s.lost} lost{p50}   ")  # fmt: skip
            out.flush()

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> FleetSummary:
        """Bring the fleet up at --connect-rate, ping until a stop or --count; summarize."""
        settings = self.settings
        ping, pong = settings.client.ping_topic, settings.client.pong_topic
        protocol = "5" if self.v5 else "3.1.1"
        self.reporter.event(
            "start", logging.INFO, "PING %s: a fleet of %d devices, each every %g s, QoS %d, "
            "MQTT %s, %s -> %s/<device>.", self.target, settings.devices, settings.interval,
            settings.client.qos, protocol, ping if self.v5 else f"{ping}/<device>", pong,
            target=self.target, devices=settings.devices, interval=settings.interval,
            qos=settings.client.qos, protocol=protocol, size=settings.size,
        )  # fmt: skip
        spacing = 1.0 / settings.connect_rate if settings.connect_rate else 0.0
        async with asyncio.TaskGroup() as tg:
            tasks: list[asyncio.Task[Any]] = [
                tg.create_task(self._expirer()), tg.create_task(self._show_progress())
            ]  # fmt: skip
            for device in self.devices:
                device.started = time.monotonic()
                session = functools.partial(self._session, device)
                tasks.append(tg.create_task(device.link.run(session)))
                tasks.append(tg.create_task(self._ticker(device)))
                if spacing:
                    await asyncio.sleep(spacing)
            ends: list[asyncio.Task[Any]] = [
                tg.create_task(stop.wait()), tg.create_task(self.done.wait())
            ]  # fmt: skip
            deadline = None
            if settings.deadline is not None:
                deadline = tg.create_task(asyncio.sleep(settings.deadline))
                ends.append(deadline)
            if settings.connect_timeout is not None:
                ends.append(tg.create_task(self._connect_deadline(settings.connect_timeout)))
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            self._cut = deadline in done
            self._stopping = True
            for device in self.devices:
                device.link.stop()
            for task in [*tasks, *ends]:
                task.cancel()
        if self.progress is not None:
            self.progress.write("\n")
        return self.summary()

    def summary(self) -> FleetSummary:
        """Return what the fleet has seen so far."""
        trackers = [d.tracker for d in self.devices]
        ever_up = sum(1 for d in self.devices if d.connect_time is not None)
        worst = sorted(((d.index, d.tracker.lost) for d in self.devices if d.tracker.lost),
                       key=lambda x: (-x[1], x[0]))  # fmt: skip
        settings = self.settings
        held_back = None
        # A timed run under a deadline, as _ticker holds back. Not a counted one, whose
        # deadline is usually derived (no device holds back its count's pings; a cut run's
        # missing ones are unanswered), as the single probe says it.
        if settings.deadline is not None and settings.count is None:
            held_back = (min(settings.interval, settings.timeout), settings.deadline)
        received = sum(t.received for t in trackers)
        lost = sum(t.lost for t in trackers)
        not_sent = sum(d.not_sent for d in self.devices)
        unanswered = 0
        if self._cut and settings.count is not None:
            unanswered = max(0, settings.count * len(self.devices) - received - lost - not_sent)
        return FleetSummary(
            target=self.target,
            devices=len(self.devices),
            ever_up=ever_up,
            sent=sum(t.sent for t in trackers),
            received=received,
            lost=lost,
            late=sum(t.late for t in trackers),
            duplicates=sum(t.duplicates for t in trackers),
            not_sent=not_sent,
            in_flight=sum(len(t.outstanding) for t in trackers),
            elapsed=time.monotonic() - self.started,
            reconnects=sum(d.link.reconnects for d in self.devices),
            rtts=[r for t in trackers for r in t.rtts],
            connect_times=[d.connect_time for d in self.devices if d.connect_time is not None],
            worst=worst,
            recoveries=list(self.recoveries),
            problem=None if ever_up else self.devices[0].link.problem(),
            held_back=held_back,
            cut_by=settings.deadline if self._cut else None,
            unanswered=unanswered,
        )
