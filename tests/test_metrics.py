"""Prometheus metrics of the broker and the probe, scraped while traffic flows."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support import MqttProbe, Proc, Spawner, free_port, wait_until


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:port/metrics, by name with its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def pings_logged(probe: Proc) -> int:
    """How many ping events the probe has printed as JSON so far."""
    return sum(1 for line in probe.out().splitlines() if '"event":"ping"' in line)


def test_the_probe_exports_what_its_summary_counts(spawn: Spawner, port: int) -> None:
    broker_metrics, probe_metrics = free_port(), free_port()
    broker = spawn.broker(port, "--metrics-port", str(broker_metrics), "--sys-interval", "0.2")
    broker.wait_for(rf"Metrics for Prometheus at http://127\.0\.0\.1:{broker_metrics}/metrics")
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(r"Subscribed to /ping")
    probe = spawn.start("ping_client", "--port", str(port), "--interval", "0.05", "--json",
                        "--metrics-port", str(probe_metrics), name="probe")  # fmt: skip
    probe.wait_for(rf"Metrics for Prometheus at http://127\.0\.0\.1:{probe_metrics}/metrics")
    label = f'{{broker="127.0.0.1:{port}"}}'
    wait_until(lambda: scrape(probe_metrics).get(f"mqtt_ping_pings_sent_total{label}", 0) >= 10,
               10, "ten pings counted")  # fmt: skip
    before = pings_logged(probe)
    seen = scrape(probe_metrics)
    after = pings_logged(probe)
    sent = seen[f"mqtt_ping_pings_sent_total{label}"]
    assert before <= sent <= after  # the metrics and the JSON events count the same pings
    answered = seen[f"mqtt_ping_pings_answered_total{label}"]
    assert sent - 3 <= answered <= sent  # a ping or two may be in flight
    assert seen[f"mqtt_ping_rtt_seconds_count{label}"] == answered
    assert 0 < seen[f"mqtt_ping_rtt_seconds_sum{label}"] / answered < 0.1
    assert seen[f'mqtt_ping_rtt_seconds_bucket{{broker="127.0.0.1:{port}",le="+Inf"}}'] == answered
    assert seen[f"mqtt_ping_pings_lost_total{label}"] == 0
    assert seen[f"mqtt_ping_devices_up{label}"] == 1
    assert seen[f"mqtt_ping_reconnects_total{label}"] == 0

    # The broker's own figures move with the traffic.
    first = scrape(broker_metrics)
    assert first["mqtt_broker_clients_connected"] == 3  # probe, its watcher, the echo client
    assert first["mqtt_broker_subscriptions"] >= 3
    received = first["mqtt_broker_messages_received_total"]
    wait_until(lambda: scrape(broker_metrics)["mqtt_broker_messages_received_total"]
               > received + 5, 5, "received to grow")  # fmt: skip
    assert first["process_resident_memory_bytes"] > 1_000_000

    # Traffic stops: the summary, the probe's metrics and the broker's $SYS all agree.
    probe.signal(signal.SIGINT)
    assert probe.wait(10) == 0
    summary = json.loads(probe.out().splitlines()[-1])
    assert summary["event"] == "summary"
    assert summary["sent"] == pings_logged(probe)
    watcher = MqttProbe(port)
    watcher.subscribe("$SYS/broker/messages/received")

    def agree() -> bool:
        counted = scrape(broker_metrics)["mqtt_broker_messages_received_total"]
        published = [float(p) for t, p in watcher.drain() if t.endswith("received")]
        return bool(published) and published[-1] == counted

    wait_until(agree, 5, "$SYS messages/received to equal the metric")
    watcher.close()


def test_a_metrics_port_answers_only_metrics(spawn: Spawner, port: int) -> None:
    metrics = free_port()
    broker = spawn.broker(port, "--metrics-port", str(metrics))
    broker.wait_for(r"Metrics for Prometheus")
    for request, status in (
        (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
        (b"\x10\x0c\r\n\r\n", b"400"),
    ):
        with socket.create_connection(("127.0.0.1", metrics), timeout=5) as sock:
            sock.sendall(request)
            assert sock.recv(100).split(b" ")[1] == status
    assert "Traceback" not in broker.err()


def test_a_metrics_port_in_use_is_one_line_and_exit_69(spawn: Spawner, port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = spawn.run("ping_client", "--port", str(port), "--metrics-port", str(busy),
                           "--count", "1", timeout=20)  # fmt: skip
        assert result.returncode == 69
        reason = f"--metrics-port: port {busy} is already in use"
        assert result.stderr == f"ping_client: error: {reason}\n"
        broker = spawn.run("broker", "--port", str(port), "--metrics-port", str(busy), timeout=20)
        assert broker.returncode == 69
        assert broker.stderr.splitlines()[-1] == f"broker: error: {reason}"
        assert "Listening on" not in broker.stderr  # not ready, so never said to be


def test_a_fleet_exports_its_devices_up_and_its_pings(spawn: Spawner, port: int) -> None:
    """One set of metrics for the fleet: the gauge counts devices up; pings add up."""
    metrics = free_port()
    broker = spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(r"Subscribed to /ping")
    fleet = spawn.start("ping_client", "--port", str(port), "--devices", "12", "--interval",
                        "0.1", "--json", "--metrics-port", str(metrics), name="fleet")  # fmt: skip
    fleet.wait_for(r"All 12 devices up after", 15)
    label = f'{{broker="127.0.0.1:{port}"}}'
    assert scrape(metrics)[f"mqtt_ping_devices_up{label}"] == 12
    wait_until(lambda: scrape(metrics)[f"mqtt_ping_pings_answered_total{label}"] >= 36, 10,
               "three pings of each device answered")  # fmt: skip
    broker.kill()
    wait_until(lambda: scrape(metrics)[f"mqtt_ping_devices_up{label}"] == 0, 10, "all down")
    spawn.broker(port)
    fleet.wait_for(r"Fleet back: all 12 devices up again", 15)
    seen = scrape(metrics)
    assert seen[f"mqtt_ping_devices_up{label}"] == 12
    assert seen[f"mqtt_ping_reconnects_total{label}"] == 12
    before = pings_logged(fleet)
    sent = scrape(metrics)[f"mqtt_ping_pings_sent_total{label}"]
    assert before <= sent <= pings_logged(fleet)  # the metrics count the JSON events' pings
    fleet.signal(signal.SIGINT)
    assert fleet.wait(10) in (0, 1)  # QoS 0 pings in the killed broker's hands may be lost
    summary = json.loads(fleet.out().splitlines()[-1])
    assert summary["reconnects"] == 12
