"""How the probe reports: log lines for people, JSON lines for scripts, and the final summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO

from common.constants import EXIT_CANTCREAT, EXIT_UNAVAILABLE
from ping_client.probe import RttStats, Tracker, rtt_stats

logger = logging.getLogger("ping_client")

EXIT_DATAERR = 65
"""sysexits.h: the input was not a run."""
EXIT_NOINPUT = 66
"""sysexits.h: the input could not be read."""


def ms(seconds: float) -> float:
    """Convert seconds to milliseconds, rounded to the microsecond."""
    return round(seconds * 1000, 3)


def text(payload: bytes) -> str:
    """Render a payload for JSON: the ASCII text when it is printable ASCII, else its repr."""
    if payload.isascii() and payload.decode().isprintable():
        return payload.decode()
    return repr(payload)


PER_PING: Final = frozenset({"ping", "pong", "lost", "late", "duplicate", "unexpected"})
"""Events that come once per ping: not logged in flood mode (the summary counts them)."""
FLOOD_MARKS: Final = {"ping": ".", "pong": "\b \b"}
"""ping -f on a terminal: a dot per ping sent, rubbed out by its reply."""


class Reporter:
    """Writes each event as a log line, and also as a JSON object on ``out`` in JSON mode.

    In flood mode nothing is logged per ping; on a terminal (``marks``) a dot goes out with
    each ping and comes off with its reply, as ``ping -f`` shows it: the dots left are losses.
    """

    def __init__(
        self, *, json_mode: bool, out: TextIO, flood: bool = False, marks: TextIO | None = None
    ) -> None:
        """Report to the log, and to ``out`` as JSON lines when ``json_mode``."""
        self.json_mode = json_mode
        self.out = out
        self.flood = flood
        self.marks = marks if flood else None
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []
        """Told every event, with its data (the metrics)."""

    def event(
        self,
        name: str,
        level: int,
        message: str,
        *args: object,
        **data: Any,  # noqa: ANN401
    ) -> None:
        """Log ``message % args`` at ``level``; in JSON mode, also emit ``{"event": name, ...}``."""
        if not (self.flood and name in PER_PING):
            logger.log(level, message, *args)
        elif self.marks is not None and name in FLOOD_MARKS:
            self.marks.write(FLOOD_MARKS[name])
            self.marks.flush()
        if self.json_mode:
            self.write({"event": name, "time": round(time.time(), 6), **data})
        for observer in self.observers:
            observer(name, data)

    def write(self, record: dict[str, Any]) -> None:
        """Write one JSON object on its own line and flush, so pipes see it at once."""
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.out.flush()


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything the final report says."""

    target: str
    sent: int
    received: int
    lost: int
    late: int
    duplicates: int
    unexpected: int
    in_flight: int
    not_sent: int
    elapsed: float
    disconnected: float
    reconnects: int
    connected: bool
    rtt: RttStats | None
    count: int | None = None
    deadline: float | None = None
    """The --deadline in seconds when it cut the run short, else None."""
    problem: str | None = None
    """Why the link never became usable, when it never did."""
    held_back: tuple[float, float | None] | None = None
    """(seconds, --deadline): a timed run sent no ping in its last seconds, so that each one
    sent could be answered before the deadline."""

    @property
    def unanswered(self) -> int:
        """Pings a deadline left without an answer: in flight, or never sent, of --count."""
        if self.deadline is None:
            return 0
        missing = self.count - self.received if self.count is not None else 0
        return max(self.in_flight, missing)

    @property
    def never_answered(self) -> int:
        """Pings given their full timeout that no echo ever answered (late ones were)."""
        return max(0, self.lost - self.late)

    @property
    def loss_percent(self) -> float:
        """Lost pings as a share of those that were given their full timeout."""
        settled = self.sent - self.in_flight
        return 100.0 * self.lost / settled if settled else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready data (times in milliseconds)."""
        data: dict[str, Any] = {
            "target": self.target,
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost,
            "late": self.late,
            "never_answered": self.never_answered,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "in_flight": self.in_flight,
            "not_sent": self.not_sent,
            "loss_percent": round(self.loss_percent, 3),
            "elapsed_s": round(self.elapsed, 3),
            "disconnected_s": round(self.disconnected, 3),
            "reconnects": self.reconnects,
            "connected": self.connected,
            "never_connected_because": self.problem,
            "deadline_reached": self.deadline is not None,
            "unanswered": self.unanswered,
            "rtt_ms": None,
        }
        if self.rtt is not None:
            r = self.rtt
            data["rtt_ms"] = {
                "min": ms(r.minimum),
                "avg": ms(r.average),
                "max": ms(r.maximum),
                "mdev": ms(r.mdev),
                "p50": ms(r.p50),
                "p90": ms(r.p90),
                "p99": ms(r.p99),
            }
        return data

    def as_text(self) -> str:
        """Return the summary in the manner of ping(8)."""
        lines = [
            f"--- {self.target} ping statistics ---",
            f"{self.sent} sent, {self.received} received, {self.lost} lost, {self.late} late, "
            f"{self.duplicates} duplicate, {self.loss_percent:.1f}% loss, "
            f"time {self.elapsed * 1000:.0f}ms",
        ]
        if self.rtt is not None:
            r = self.rtt
            lines.append(
                f"rtt min/avg/max/mdev = {ms(r.minimum):.3f}/{ms(r.average):.3f}/"
                f"{ms(r.maximum):.3f}/{ms(r.mdev):.3f} ms"
            )
            lines.append(f"rtt p50/p90/p99 = {ms(r.p50):.3f}/{ms(r.p90):.3f}/{ms(r.p99):.3f} ms")
        if self.connected:
            lines.append(f"disconnected {self.disconnected:.3f} s, {self.reconnects} reconnects")
        else:
            lines.append(f"never connected: {self.problem or 'no usable link'}")
        extras = []
        if self.late:
            extras.append(f"{self.late} answered late, {self.never_answered} never answered")
        if self.deadline is not None:
            extras.append(f"deadline {self.deadline:g} s reached, {self.unanswered} unanswered")
        elif self.in_flight:
            extras.append(f"{self.in_flight} still in flight at exit (not counted as lost)")
        if self.held_back is not None and self.deadline is None:
            held, deadline = self.held_back
            extras.append(f"no ping in the last {held:g} s before the {deadline:g} s deadline, so "
                          "that each one sent could be answered")  # fmt: skip
        if self.not_sent:
            extras.append(f"{self.not_sent} ticks skipped while disconnected")
        if self.unexpected:
            extras.append(f"{self.unexpected} unexpected echoes ignored")
        if extras:
            lines.append("; ".join(extras))
        return "\n".join(lines) + "\n"


def summarize(
    tracker: Tracker,
    *,
    target: str,
    not_sent: int,
    elapsed: float,
    disconnected: float,
    reconnects: int,
    connected: bool,
    count: int | None = None,
    deadline: float | None = None,
    problem: str | None = None,
    held_back: tuple[float, float | None] | None = None,
) -> Summary:
    """Freeze the tracker's counters into a Summary."""
    return Summary(
        target=target,
        sent=tracker.sent,
        received=tracker.received,
        lost=tracker.lost,
        late=tracker.late,
        duplicates=tracker.duplicates,
        unexpected=tracker.unexpected,
        in_flight=len(tracker.outstanding),
        not_sent=not_sent,
        elapsed=elapsed,
        disconnected=disconnected,
        reconnects=reconnects,
        connected=connected,
        rtt=rtt_stats(tracker.rtts),
        count=count,
        deadline=deadline,
        problem=problem,
        held_back=held_back,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ping_client.report [SOURCE] [-o PNG]``: draw a run (needs matplotlib)."""
    parser = argparse.ArgumentParser(
        prog="ping_client.report",
        description="Draw a run as a PNG: RTT over time, with lost pings marked and outages "
        "shaded, and the RTT histogram with p50, p90 and p99. Needs matplotlib "
        "(pip install -e '.[report]'; make report installs it).",
    )
    parser.add_argument(
        "source", nargs="?", type=Path, default=Path("logs/ping_client.log"),
        help="ping_client --json output, or a ping_client log file (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="the PNG to write (default: SOURCE with .png)")  # fmt: skip
    parser.add_argument("--title", default=None, help="the picture's title")
    parser.add_argument(
        "--every-run", action="store_true",
        help="a log file: draw every run it holds, not only the last one",
    )  # fmt: skip
    args = parser.parse_args(argv)
    output = args.output or args.source.with_suffix(".png")

    def fail(code: int, why: str) -> NoReturn:
        parser.exit(code, f"ping_client.report: error: {why}\n")

    from ping_client import plot  # noqa: PLC0415 - reading needs no matplotlib, drawing does

    try:
        run = plot.load(args.source, every_run=args.every_run)
    except OSError as exc:
        fail(EXIT_NOINPUT, f"{exc.filename}: {exc.strerror}")
    if not (run.rtts or run.lost or run.late):
        fail(EXIT_DATAERR, f"{args.source}: no pings in it")
    try:
        plot.draw(run, output, args.title or plot.title(run, args.source.name))
    except ImportError:
        fail(EXIT_UNAVAILABLE, "matplotlib is not installed: pip install -e '.[report]' "
             "(make report does)")  # fmt: skip
    except OSError as exc:
        fail(EXIT_CANTCREAT, f"cannot write {exc.filename or output}: {exc.strerror}")
    sys.stdout.write(f"{output}\n")


if __name__ == "__main__":
    main()
