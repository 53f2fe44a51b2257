"""Pictures of a run: RTT over time (losses marked, outages shaded) and the RTT histogram.

A fleet's run (``ping_client --devices N --json``) is drawn as the fleet's RTT percentiles
over time (one point a second), the histogram, and the devices up over time.

Reads a run's JSON events (``ping_client --json``) or a ping_client log file, and draws with
matplotlib, an optional extra (``pip install -e '.[report]'``; ``make report`` installs it).
Reading is pure and needs no matplotlib; only :func:`draw` imports it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ping_client.probe import percentile

WIDTH, HEIGHT, DPI = 10.0, 7.0, 100
"""The picture: 1000 x 700 pixels."""

_STAMP = r"(?P<t>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \w+\s+\S+: "
_LINES = {
    "pong": re.compile(_STAMP + r"Got .* on \S+: seq \d+, rtt (?P<rtt>[\d.]+) ms\.$"),
    "late": re.compile(_STAMP + r"Late echo .* on \S+: seq \d+ after (?P<rtt>[\d.]+) ms"),
    "lost": re.compile(_STAMP + r"Lost .* on \S+: seq \d+, no echo within (?P<timeout>[\d.e+]+) s"),
    "down": re.compile(_STAMP + r"(Lost connection to|Cannot connect to) "),
    "up": re.compile(_STAMP + r"(Reconnected to|Connected to) "),
    "start": re.compile(
        _STAMP + r"PING (?P<target>\S+): (?P<pace>[^,]+), QoS (?P<qos>\d), "
        r"MQTT (?P<protocol>[\d.]+)"
    ),
}

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")
_SUMMARY = re.compile(r"--- \S+ ping statistics ---$")


@dataclass
class Run:
    """What a picture shows, in seconds since the run's first event."""

    rtts: list[tuple[float, float]] = field(default_factory=list)
    """(time the ping was sent, RTT in ms) of every answered ping."""
    late: list[tuple[float, float]] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)
    """When each lost ping was sent."""
    outages: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every time without a connection."""
    start: float = 0.0
    """The run's first event, in seconds since the epoch."""
    facts: dict[str, str] = field(default_factory=dict)
    """What the probe's first line says: target, pace, QoS, protocol (when it has one)."""
    devices: int = 0
    """A fleet's size (0: the single probe)."""
    up: list[tuple[float, int]] = field(default_factory=list)
    """A fleet's devices up, after each change: (time, how many)."""

    def percentiles(self) -> dict[str, float]:
        """p50, p90 and p99 of the RTTs, in ms (empty without answers)."""
        values = sorted(rtt for _, rtt in self.rtts)
        if not values:
            return {}
        return {f"p{p}": percentile(values, p) for p in (50, 90, 99)}


def load(path: Path, *, every_run: bool = False) -> Run:
    """Read a run from JSON events or from a log file, whichever ``path`` holds.

    A log file (``logs/ping_client.log``) holds every run supervisord started; the last one is
    read, unless ``every_run``.
    """
    lines = path.read_text(errors="replace").splitlines()
    if any(line.startswith('{"event"') for line in lines[:50]):
        return from_events([json.loads(line) for line in lines if line.startswith("{")])
    return from_log(lines if every_run else last_run(lines))


def last_run(lines: list[str]) -> list[str]:
    """Return the last run of a log: each run ends with its ``--- … statistics ---``."""
    ends = [i for i, line in enumerate(lines) if _SUMMARY.match(line)]
    if ends and not any(_LINES["pong"].match(line) or _LINES["lost"].match(line)
                        for line in lines[ends[-1] :]):  # fmt: skip
        ends.pop()  # the log ends with the last run's summary: that run is the one
    if not ends:
        return lines
    start = ends[-1] + 1
    while start < len(lines) and not TIMESTAMP.match(lines[start]):
        start += 1  # the rest of that summary: "60 sent, …", "rtt min/avg/max …"
    return lines[start:]


def from_events(events: list[dict[str, Any]]) -> Run:
    """Build a run from ``ping_client --json`` events."""
    run = Run()
    if not events:
        return run
    t0 = run.start = float(events[0]["time"])
    sent: dict[tuple[object, int], float] = {}
    """(device or None, seq) -> when it was sent: a fleet's devices each count from 1."""
    down: float | None = None
    up = 0
    for event in events:
        kind, t = event.get("event"), float(event.get("time", t0)) - t0
        device = event.get("device")
        if kind == "start":
            interval = event.get("interval")
            run.devices = int(event.get("devices", 0))
            pace = "back to back (flood)" if interval is None else f"every {interval:g} s"
            run.facts = {
                "target": str(event.get("target", "?")), "qos": str(event.get("qos", "?")),
                "protocol": str(event.get("protocol", "?")),
                "pace": f"{run.devices} devices, each {pace}" if run.devices else pace,
            }  # fmt: skip
        elif kind == "ping":
            sent[device, event["seq"]] = t
        elif kind in ("pong", "late"):
            at = sent.get((device, event["seq"]), t - event["rtt_ms"] / 1000)
            (run.rtts if kind == "pong" else run.late).append((at, event["rtt_ms"]))
        elif kind == "lost":
            run.lost.append(sent.get((device, event["seq"]), t))
        elif device is not None and kind in ("connected", "disconnected"):
            up += 1 if kind == "connected" else -1
            run.up.append((t, up))
        elif kind == "disconnected" and down is None:
            down = t
        elif kind == "connected" and down is not None:
            run.outages.append((down, t))
            down = None
    if down is not None:
        run.outages.append((down, float(events[-1]["time"]) - t0))
    return run


def from_log(lines: list[str]) -> Run:
    """Build a run from a ping_client log (``logs/ping_client.log``), several runs included."""
    run = Run()
    down: float | None = None
    last = 0.0
    for line in lines:
        for kind, pattern in _LINES.items():
            match = pattern.match(line)
            if match is None:
                continue
            # Local time, as logged.
            stamp = datetime.strptime(match["t"], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if not run.start:
                run.start = stamp
            t = last = stamp - run.start
            if kind in ("pong", "late"):
                rtt = float(match["rtt"])
                (run.rtts if kind == "pong" else run.late).append((t - rtt / 1000, rtt))
            elif kind == "lost":
                run.lost.append(t - float(match["timeout"]))
            elif kind == "down" and down is None:
                down = t
            elif kind == "up" and down is not None:
                run.outages.append((down, t))
                down = None
            elif kind == "start":
                run.facts = {k: match[k] for k in ("target", "pace", "qos", "protocol")}
            break
    if down is not None:
        run.outages.append((down, last))
    return run


def title(run: Run, source: str) -> str:
    """Return the picture's title: what was pinged, how and when, then the run's figures."""
    facts = run.facts
    when = datetime.fromtimestamp(run.start).strftime("%Y-%m-%d %H:%M") if run.start else "?"
    if facts:
        head = (f"ping_client to {facts['target']}, MQTT {facts['protocol']}, QoS {facts['qos']}, "
                f"{facts['pace']}; {when}")  # fmt: skip
    else:
        head = f"ping_client: {source}; {when}"
    answered = [rtt for _, rtt in run.rtts]
    received, late, lost = len(answered), len(run.late), len(run.lost)
    figures = f"{received + late + lost} sent, {received} received, {lost} lost"
    if late:
        figures += f" ({late} answered late)"
    if answered:
        average = sum(answered) / len(answered)
        figures += f"; rtt min/avg/max {min(answered):.3f}/{average:.3f}/{max(answered):.3f} ms"
    # As the probe counts them: outages after the first ping, not the wait for the broker.
    first = min((t for t, _ in [*run.rtts, *run.late]), default=math.inf)
    first = min([first, *run.lost])
    after = [(start, end) for start, end in run.outages if start > first]
    down = sum(end - start for start, end in after)
    outages = len(after)
    figures += f"; {outages} outage{'s' if outages != 1 else ''}, {down:.3f} s without a connection"
    return f"{head}\n{figures}"


def per_second(rtts: list[tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    """Return a fleet's RTT percentiles (ms) over time: p50, p90, p99 of each second's pings."""
    seconds: dict[int, list[float]] = {}
    for at, rtt in rtts:
        seconds.setdefault(math.floor(at), []).append(rtt)
    out: dict[str, list[tuple[float, float]]] = {"p50": [], "p90": [], "p99": []}
    for second in sorted(seconds):
        values = sorted(seconds[second])
        for name, points in out.items():
            points.append((second + 0.5, percentile(values, float(name[1:]))))
    return out


def draw(run: Run, out: Path, title: str) -> None:
    """Draw ``run`` as a PNG of 1000 x 700 pixels at ``out`` (a fleet's: 1000 x 900)."""
    import matplotlib  # noqa: PLC0415 - an optional extra, imported only to draw

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    fleet = bool(run.devices)
    fig, axes = plt.subplots(
        3 if fleet else 2, 1, figsize=(WIDTH, HEIGHT + 2 if fleet else HEIGHT), dpi=DPI,
        height_ratios=(3, 2, 2) if fleet else (3, 2),
    )  # fmt: skip
    timeline, histogram = axes[0], axes[1]
    fig.suptitle(title)
    for i, (start, end) in enumerate(run.outages):
        timeline.axvspan(start, end, color="0.85", label="no connection" if i == 0 else None)
    if fleet:
        for (name, points), style in zip(per_second(run.rtts).items(), ("-", "--", ":"),
                                         strict=True):  # fmt: skip
            if points:
                xs, ys = zip(*points, strict=True)
                timeline.plot(xs, ys, style, color="tab:blue", label=f"RTT {name}, per second")
        devices = axes[2]
        if run.up:
            xs, ns = zip(*run.up, strict=True)
            devices.step(xs, ns, where="post", color="tab:green")
        devices.set_ylim(0, run.devices * 1.05 or 1)
        devices.set_xlabel("seconds since the first event")
        devices.set_ylabel("devices up")
        devices.grid(alpha=0.3)
    elif run.rtts:
        xs, ys = zip(*run.rtts, strict=True)
        timeline.plot(xs, ys, ".", markersize=3, color="tab:blue", label="RTT")
    if run.late:
        xs, ys = zip(*run.late, strict=True)
        timeline.plot(xs, ys, "^", markersize=5, color="tab:orange", label="late (counted lost)")
    if run.lost:
        # Lost pings have no RTT: marked along the bottom, at the time they were sent.
        timeline.plot(run.lost, [0] * len(run.lost), "x", color="tab:red", clip_on=False,
                      label=f"lost ({len(run.lost)})")  # fmt: skip
    timeline.set_xlabel("seconds since the first event")
    timeline.set_ylabel("RTT (ms)")
    timeline.set_ylim(bottom=0)
    timeline.grid(alpha=0.3)
    timeline.legend(loc="upper right", fontsize="small")

    values = [rtt for _, rtt in run.rtts]
    if values:
        histogram.hist(values, bins=min(60, max(10, len(values) // 5)), color="tab:blue",
                       alpha=0.8)  # fmt: skip
        for (name, value), style in zip(
            run.percentiles().items(), ("-", "--", ":"), strict=True
        ):  # fmt: skip
            histogram.axvline(value, color="black", linestyle=style,
                              label=f"{name} {value:.3f} ms")  # fmt: skip
        histogram.legend(loc="upper right", fontsize="small")
    else:
        histogram.text(0.5, 0.5, "no answered pings", ha="center", transform=histogram.transAxes)
    histogram.set_xlabel("RTT (ms)")
    histogram.set_ylabel("pings")
    histogram.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
