"""The broker's figures as Prometheus metrics (``--metrics-port``): what ``$SYS`` says.

A collector reads the hub's counters and the engine's counts when Prometheus scrapes, so the
broker pays nothing per message for it. Names follow Prometheus' conventions: counters end in
``_total``, times are in seconds, sizes in bytes; the process's own (CPU, memory, open files)
come from ``prometheus_client``'s process collector as ``process_*``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.systopics import Source


class BrokerCollector(Collector):
    """The ``$SYS`` figures, read at each scrape."""

    def __init__(self, hub: Source) -> None:
        """Read ``hub``'s figures when scraped."""
        self.hub = hub
        self.started = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        """Yield the metrics, as of now."""
        hub = self.hub
        counters = hub.counters
        sessions, subscriptions = hub.state.counts()
        connected = len(hub.online)
        gauges = (
            ("clients_connected", "Clients connected now.", connected),
            ("clients_maximum", "The most clients connected at once.", counters.maximum),
            ("sessions", "Sessions kept, connected or not ($SYS clients/total).", sessions),
            ("subscriptions", "Subscriptions, over all sessions.", subscriptions),
            ("retained_messages", "Retained messages kept.", hub.state.retained_count()),
            ("uptime_seconds", "Seconds since the broker started.",
             time.monotonic() - self.started),
        )  # fmt: skip
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"mqtt_broker_{name}", text, value=value)
        totals = (
            ("messages_received", "PUBLISH packets received from clients.", counters.received),
            ("messages_sent", "PUBLISH packets sent to clients.", counters.sent),
            ("messages_dropped", "Messages dropped for a client (its queue full, it not "
             "reading, or too large for it).", counters.dropped),
            ("messages_denied", "Messages the ACL did not let a client publish.",
             counters.denied),
        )  # fmt: skip
        for name, text, value in totals:
            yield CounterMetricFamily(f"mqtt_broker_{name}", text, value=value)


def registry(hub: Source) -> CollectorRegistry:
    """Make a registry of the broker's figures and the process's."""
    found = CollectorRegistry(auto_describe=False)
    found.register(BrokerCollector(hub))
    ProcessCollector(registry=found)
    return found
