"""``$SYS`` topics: the broker's own figures, published retained every ``--sys-interval`` seconds.

The names are mosquitto's, so that ``mosquitto_sub -t '$SYS/#' -v``, the first thing MQTT
tutorials show, prints what it prints there; ``messages/dropped`` is ours (the queue limits).
Wildcards at the start of a filter do not match ``$`` topics [MQTT-4.7.2-1]: subscribe to
``$SYS/#`` to see them.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from broker.engine import Engine

PERIODS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))


@dataclass(slots=True)
class Counters:
    """What the hub counts as it works: one integer addition each, on the hot path."""

    received: int = 0
    """PUBLISH packets received from clients."""
    sent: int = 0
    """PUBLISH packets sent to clients."""
    dropped: int = 0
    """Messages dropped for a client: its queue full, it not reading, or too large for it."""
    maximum: int = 0
    """The most clients connected at once."""
    denied: int = 0
    """Messages the ACL did not let a client publish."""


@dataclass(slots=True)
class Load:
    """Messages per minute, averaged over 1, 5 and 15 minutes, as mosquitto reports them."""

    last: int = 0
    averages: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys((name for name, _ in PERIODS), 0.0)
    )

    def update(self, total: int, interval: float) -> None:
        """Fold in the messages counted since the last update, ``interval`` seconds ago."""
        per_minute = (total - self.last) * 60.0 / interval
        self.last = total
        for name, period in PERIODS:
            weight = 1.0 - math.exp(-interval / period)
            self.averages[name] += (per_minute - self.averages[name]) * weight


def rss_bytes() -> int:
    """Return the process's resident memory in bytes, from /proc (0 where there is none)."""
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


class Source(Protocol):
    """What $SYS reads and publishes through: the hub (which imports this module)."""

    counters: Counters
    online: dict[str, Any]

    @property
    def state(self) -> Engine:
        """The engine: sessions, subscriptions, retained messages."""

    def publish(self, topic: str, payload: bytes, qos: int | None, *, retain: bool) -> bool:
        """Deliver a message to every subscriber now."""


async def publish_forever(hub: Source, interval: float, version: str) -> None:
    """Publish the ``$SYS`` topics at once, then every ``interval`` seconds, until cancelled.

    Retained, and from the start as mosquitto does: a subscriber right after start sees them.
    """
    started = time.monotonic()
    received, sent = Load(), Load()
    while True:
        counters = hub.counters
        sessions, subscriptions = hub.state.counts()
        connected = len(hub.online)
        figures: dict[str, object] = {
            "version": version,
            "uptime": f"{int(time.monotonic() - started)} seconds",
            "clients/connected": connected,
            "clients/disconnected": max(0, sessions - connected),
            "clients/total": sessions,
            "clients/maximum": counters.maximum,
            "messages/received": counters.received,
            "messages/sent": counters.sent,
            "messages/dropped": counters.dropped,
            "subscriptions/count": subscriptions,
            "retained messages/count": hub.state.retained_count(),
            "heap/current": rss_bytes(),
        }
        for name, _ in PERIODS:
            figures[f"load/messages/received/{name}"] = f"{received.averages[name]:.2f}"
            figures[f"load/messages/sent/{name}"] = f"{sent.averages[name]:.2f}"
        for name, value in figures.items():
            topic, payload = f"$SYS/broker/{name}", str(value).encode()
            hub.publish(topic, payload, 0, retain=True)
            await hub.state.retain(None, topic, payload, 0)
        await asyncio.sleep(interval)
        received.update(hub.counters.received, interval)
        sent.update(hub.counters.sent, interval)
