"""The probe's bookkeeping: match each echo to its ping, time it, classify what cannot match.

Pure logic, no I/O: every method takes the current monotonic time, so tests drive it directly.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    """What an echo turned out to be."""

    MATCHED = "pong"
    LATE = "late"
    DUPLICATE = "duplicate"
    FOREIGN = "foreign"
    UNEXPECTED = "unexpected"
    UNSETTLED = "unsettled"
    """A second echo that may be a stranger's whose ping the watcher has not reported yet:
    decided by :meth:`Tracker.settle` (a duplicate, unless the stranger's copy shows up)."""


@dataclass(slots=True)
class Ping:
    """One ping we published."""

    seq: int
    payload: bytes
    sent: float
    rtt: float | None = None
    lost: bool = False
    echoes: int = 0
    foreign_copies: int = 0
    """Other publishers' pings with the same payload; each earns one echo that is not ours."""
    own_copy_seen: bool = False
    unsettled: int = 0
    """Extra echoes not yet explained by a stranger's copy of the ping (see Tracker.grace)."""
    unsettled_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Echo:
    """The outcome of one echo."""

    verdict: Verdict
    ping: Ping | None
    rtt: float | None = None


def decimals_for(interval: float) -> int:
    """Digits after the point that keep one-per-interval timestamps distinct (0 for >= 1 s)."""
    if interval >= 1:
        return 0
    return min(6, math.ceil(-math.log10(interval) - 1e-9))


def stamp(wall: float, decimals: int) -> bytes:
    """Format a Unix time as ASCII, e.g. ``b'1744796556'`` or ``b'1744796556.25'``."""
    if decimals == 0:
        return str(math.floor(wall)).encode()
    return f"{wall:.{decimals}f}".encode()


@dataclass(slots=True)
class Tracker:
    """Outstanding pings, their echoes, and the counters a summary needs."""

    timeout: float
    memory: float = 60.0
    """How long (s) a resolved ping is remembered, to tell late and duplicate echoes apart."""
    grace: float = 0.0
    """Seconds an extra echo waits for a stranger's copy of its ping before it counts as a
    duplicate. The probe watches the ping topic on a second connection, which may report a
    stranger's copy after the stranger's echo arrived on the first; 0 decides at once."""
    sent: int = 0
    received: int = 0
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    unexpected: int = 0
    rtts: list[float] = field(default_factory=list)
    outstanding: OrderedDict[bytes, Ping] = field(default_factory=OrderedDict)
    _resolved: dict[bytes, Ping] = field(default_factory=dict)
    _forget: deque[tuple[float, bytes]] = field(default_factory=deque)
    _foreign: dict[bytes, int] = field(default_factory=dict)
    _foreign_forget: deque[tuple[float, bytes]] = field(default_factory=deque)
    _unsettled: deque[Ping] = field(default_factory=deque)

    def known(self, payload: bytes) -> bool:
        """Return whether ``payload`` is still in flight or remembered."""
        return payload in self.outstanding or payload in self._resolved

    def next_payload(self, wall: float, decimals: int, size: int | None = None) -> bytes:
        """Return a payload for a ping sent at ``wall``, unique among those in flight.

        Unique too among the pings lately seen from other publishers on the topic (another
        probe on the same schedule sends the same timestamps): their echoes then cannot be
        taken for ours. ``size`` pads the timestamp with spaces to that many bytes (``ping -s``).
        """
        payload = stamp(wall, decimals)
        while (self.known(payload) or payload in self._foreign) and decimals < 9:
            decimals += 1
            payload = stamp(wall, decimals)
        return payload.ljust(size) if size else payload

    def on_sent(self, payload: bytes, now: float) -> Ping:
        """Record a published ping."""
        self.sent += 1
        ping = Ping(seq=self.sent, payload=payload, sent=now)
        ping.foreign_copies = self._foreign.pop(payload, 0)  # their echoes may still be coming
        self.outstanding[payload] = ping
        return ping

    def on_ping_copy(self, payload: bytes, now: float) -> None:
        """Note a message seen on the ping topic: our own copy, or another publisher's ping."""
        ping = self.outstanding.get(payload) or self._resolved.get(payload)
        if ping is not None and not ping.own_copy_seen:
            ping.own_copy_seen = True
        elif ping is not None and ping.unsettled:
            ping.unsettled -= 1  # the extra echo that came first was this stranger's
        elif ping is not None:
            ping.foreign_copies += 1
        else:
            self._foreign[payload] = self._foreign.get(payload, 0) + 1
            self._foreign_forget.append((now + self.memory, payload))
        self._prune(now)

    def on_echo(self, payload: bytes, now: float) -> Echo:
        """Classify an echo and update the counters."""
        ping = self.outstanding.pop(payload, None)
        if ping is not None:
            ping.echoes = 1
            ping.rtt = now - ping.sent
            self.received += 1
            self.rtts.append(ping.rtt)
            self._remember(ping, now)
            return Echo(Verdict.MATCHED, ping, ping.rtt)
        ping = self._resolved.get(payload)
        if ping is None:
            copies = self._foreign.get(payload, 0)
            if copies:
                self._foreign[payload] = copies - 1
                return Echo(Verdict.FOREIGN, None)
            self.unexpected += 1
            return Echo(Verdict.UNEXPECTED, None)
        if ping.lost and ping.echoes == 0:
            ping.echoes = 1
            self.late += 1
            return Echo(Verdict.LATE, ping, now - ping.sent)
        return self._extra_echo(ping, now)

    def _extra_echo(self, ping: Ping, now: float) -> Echo:
        """Classify an echo of a ping already answered: a stranger's, a duplicate, or unsettled."""
        if ping.foreign_copies > 0:
            ping.foreign_copies -= 1
            return Echo(Verdict.FOREIGN, ping)
        if self.grace > 0:
            ping.unsettled += 1
            ping.unsettled_at = now
            self._unsettled.append(ping)
            return Echo(Verdict.UNSETTLED, ping)
        ping.echoes += 1
        self.duplicates += 1
        return Echo(Verdict.DUPLICATE, ping)

    def settle(self, now: float) -> list[Ping]:
        """Count as duplicates the extra echoes no stranger's copy explained within the grace.

        Return one entry per duplicate.
        """
        found: list[Ping] = []
        while self._unsettled and self._unsettled[0].unsettled_at + self.grace <= now:
            ping = self._unsettled.popleft()
            if ping.unsettled:
                ping.unsettled -= 1
                ping.echoes += 1
                self.duplicates += 1
                found.append(ping)
        return found

    def next_deadline(self) -> float | None:
        """Return when the oldest outstanding ping times out (or an extra echo is settled)."""
        due = [ping.sent + self.timeout for ping in self.outstanding.values()][:1]
        if self._unsettled:
            due.append(self._unsettled[0].unsettled_at + self.grace)
        return min(due) if due else None

    def expire(self, now: float) -> list[Ping]:
        """Declare lost every ping whose timeout has passed; return them in send order."""
        lost: list[Ping] = []
        while self.outstanding:
            payload, ping = next(iter(self.outstanding.items()))
            if ping.sent + self.timeout > now:
                break
            del self.outstanding[payload]
            ping.lost = True
            self.lost += 1
            lost.append(ping)
            self._remember(ping, now)
        self._prune(now)
        return lost

    def _remember(self, ping: Ping, now: float) -> None:
        self._resolved[ping.payload] = ping
        self._forget.append((now + self.memory, ping.payload))

    def _prune(self, now: float) -> None:
        while self._forget and self._forget[0][0] <= now:
            _, payload = self._forget.popleft()
            ping = self._resolved.get(payload)
            if ping is not None and payload not in self.outstanding:
                del self._resolved[payload]
        while self._foreign_forget and self._foreign_forget[0][0] <= now:
            _, payload = self._foreign_forget.popleft()
            self._foreign.pop(payload, None)


@dataclass(frozen=True, slots=True)
class RttStats:
    """Round-trip statistics in seconds."""

    count: int
    minimum: float
    average: float
    maximum: float
    mdev: float
    p50: float
    p90: float
    p99: float


def percentile(ordered: list[float], p: float) -> float:
    """Return the nearest-rank percentile ``p`` (0..100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rtt_stats(rtts: list[float]) -> RttStats | None:
    """Summarise round-trip times the way ping(8) does, plus percentiles; None if empty."""
    if not rtts:
        return None
    ordered = sorted(rtts)
    n = len(ordered)
    mean = sum(ordered) / n
    mean_sq = sum(x * x for x in ordered) / n
    return RttStats(
        count=n,
        minimum=ordered[0],
        average=mean,
        maximum=ordered[-1],
        mdev=math.sqrt(max(0.0, mean_sq - mean * mean)),
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
    )
