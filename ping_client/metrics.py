"""The probe as a Prometheus blackbox exporter (``--metrics-port``): what its summary counts.

A fleet (``--devices N``) is counted as one: its devices' pings add up, and the gauge says how
many devices are up.

Fed by the same events as the log and ``--json`` (``ping``, ``pong``, ``lost``, ``late``,
``duplicate``, and the link's ``connected`` and ``disconnected``), so the three always agree.
Every metric is labelled with the broker pinged (``broker="127.0.0.1:10008"``).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RTT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Seconds: from a tenth of a millisecond (loopback) to seconds (a broker in trouble)."""


class ProbeMetrics:
    """The probe's counters, RTT histogram and link gauge, for one broker."""

    def __init__(self, target: str) -> None:
        """Count for the broker at ``target`` (``host:port``)."""
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["broker"]

        def counter(name: str, text: str) -> Any:  # noqa: ANN401 - a labelled Counter child
            return Counter(f"mqtt_ping_{name}", text, labels, registry=self.registry).labels(target)

        self.sent = counter("pings_sent", "Pings published.")
        self.answered = counter("pings_answered", "Pings answered in time.")
        self.lost = counter("pings_lost", "Pings not answered within --timeout.")
        self.late = counter("pings_late", "Echoes that came after their ping was counted lost.")
        self.duplicates = counter("echoes_duplicate", "Echoes of a ping already answered.")
        self.reconnects = counter("reconnects", "Times the link came back after it was lost.")
        self.rtt = Histogram(
            "mqtt_ping_rtt_seconds", "Round-trip time of each answered ping.", labels,
            buckets=RTT_BUCKETS, registry=self.registry,
        ).labels(target)  # fmt: skip
        self.up = Gauge(
            "mqtt_ping_devices_up", "Devices whose link to the broker is up (SUBACK received).",
            labels, registry=self.registry,
        ).labels(target)  # fmt: skip
        self._seen: set[object] = set()
        """The devices (None: the single probe) that have been up once."""

    def on_event(self, name: str, data: dict[str, Any]) -> None:
        """Count one of the probe's events (as the log and --json report it)."""
        if name == "ping":
            self.sent.inc()
        elif name == "pong":
            self.answered.inc()
            self.rtt.observe(float(data["rtt_ms"]) / 1000)
        elif name == "lost":
            self.lost.inc()
        elif name == "late":
            self.late.inc()
        elif name == "duplicate":
            self.duplicates.inc()
        elif name == "connected":
            device = data.get("device")
            if device in self._seen:
                self.reconnects.inc()
            self._seen.add(device)
            self.up.inc()
        elif name == "disconnected":
            self.up.dec()
