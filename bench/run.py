"""``make bench``: our broker side by side with mosquitto, every figure a ratio from one run.

    python -m bench.run            # quick, under about a minute
    python -m bench.run --full     # more rounds and cycles, a few minutes

Prints one table and writes bench/results.json. Rounds alternate between the brokers (A/B, A/B,
...) so that drift on a shared machine hits both alike. Where a figure comes from such rounds,
its ratio is the median of the per-round ratios: each pairs the two brokers back to back, which
a ratio of overall medians does not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import fleet, isolation, picture, scale, websocket
from bench.harness import (
    MQTT_VERSION,
    PYTHON,
    REPO,
    Broker,
    _packet,
    _string,
    cpu_seconds,
    echo_ready,
    mosquitto_path,
    mqttools_available,
    percentile,
    ping,
    rss_mb,
    start_broker,
    start_program,
    wait_connected,
    windowed,
    workspace,
)

RESULTS = Path(__file__).with_name("results.json")
Row = tuple[str, float, float, str, float]  # metric, ours, mosquitto, unit, ratio


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def lean_echo(port: int, version: int = 4) -> subprocess.Popen[bytes]:
    """The lean echo in its own process, so that it does not share a core with the pinger."""
    code = (
        "import asyncio, logging, sys\n"
        "logging.getLogger('asyncio').setLevel(logging.CRITICAL)\n"
        "from bench.harness import lean_echo\n"
        "asyncio.run(lean_echo(int(sys.argv[1]), '/ping', '/pong', asyncio.Event(), "
        "int(sys.argv[2])))\n"
    )
    return subprocess.Popen([PYTHON, "-c", code, str(port), str(version)], cwd=REPO)


def with_brokers(kinds: list[str], rounds: int, measure: Callable[[Broker], dict[str, float]]
                 ) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """Run ``measure`` against a fresh broker of each kind, alternating, ``rounds`` times."""
    out: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    with workspace() as tmp:
        for _ in range(rounds):
            for kind in kinds:
                broker = start_broker(kind, tmp)
                try:
                    out[kind].append(measure(broker))
                finally:
                    broker.stop()
    return out


def rtt(
    qos: int, count: int, *, flood: bool = False, protocol: str = "5",
    samples: dict[str, list[float]] | None = None,
) -> Callable[[Broker], dict[str, float]]:  # fmt: skip
    """Whole-stack RTT: our echo_client and ping_client, one ping in flight.

    Spaced 10 ms apart, or back to back (``flood``): spacing lets every process go idle between
    pings, which dilutes the broker's share of the round trip. Every RTT goes to
    ``samples[broker kind]`` too, for the picture.
    """
    spacing = ("--flood",) if flood else ("--interval", "0.01")
    common = ("--qos", str(qos), "--protocol", protocol)

    def measure(broker: Broker) -> dict[str, float]:
        echo = start_program("echo_client", broker.port, *common)
        try:
            ping(broker.port, 5, 0.01, *common)  # warm-up, and echo subscribed
            summary = ping(broker.port, count, 0.01, *common, *spacing)
        finally:
            echo.terminate()
            echo.wait(10)
        if samples is not None:
            samples.setdefault(broker.kind, []).extend(summary["rtts"])
        r = summary["rtt_ms"]
        return {"p50": r["p50"], "p90": r["p90"], "p99": r["p99"]}

    return measure


def versions_side_by_side(seconds: float) -> Callable[[Broker], dict[str, float]]:
    """One broker, lean clients, one in flight: MQTT 3.1.1, then MQTT 5, back to back.

    The lean clients cost almost nothing, so the broker's share of each version shows; our
    clients' MQTT 5 requests cost paho more than they cost a broker.
    """
    calls: dict[str, int] = {}

    def measure(broker: Broker) -> dict[str, float]:
        out: dict[str, float] = {}
        # The order flips from one round to the next, for each broker: these machines have fast
        # and slow minutes, and whichever version went first would be favoured.
        order = [(4, "v311"), (5, "v5")]
        calls[broker.kind] = calls.get(broker.kind, 0) + 1
        for level, name in order if calls[broker.kind] % 2 else order[::-1]:
            echo = lean_echo(broker.port, level)
            try:
                asyncio.run(echo_ready(broker.port, version=level))
                asyncio.run(windowed(broker.port, 1, 0.3, "/ping", "/pong", version=level))
                cpu_before = cpu_seconds(broker.proc.pid)
                result = asyncio.run(
                    windowed(broker.port, 1, seconds, "/ping", "/pong", version=level)
                )
                trips = result["round_trips_per_s"] * seconds
                out[f"{name}_p50"] = result["p50_ms"]
                out[f"{name}_cpu"] = (cpu_seconds(broker.proc.pid) - cpu_before) / trips * 1e6
            finally:
                echo.terminate()
                echo.wait(10)
        out["p50_ratio"] = out["v5_p50"] / out["v311_p50"]
        out["cpu_ratio"] = out["v5_cpu"] / out["v311_cpu"]
        return out

    return measure


def c_clients_rtt(count: int) -> Callable[[Broker], dict[str, float]]:
    """QoS 0 RTT with C clients, one in flight: the broker's share, little else.

    The echo is ``mosquitto_sub | mosquitto_pub -l``; the pinger a blocking socket in this
    process.
    """

    def measure(broker: Broker) -> dict[str, float]:
        port = broker.port
        where = ("-h", "127.0.0.1", "-p", str(port))
        quiet = subprocess.DEVNULL
        sub, pub = shutil.which("mosquitto_sub") or "", shutil.which("mosquitto_pub") or ""
        echo_in = subprocess.Popen([sub, *where, "-t", "/ping"],
                                   stdout=subprocess.PIPE, stderr=quiet)  # fmt: skip
        echo_out = subprocess.Popen([pub, *where, "-t", "/pong", "-l"],
                                    stdin=echo_in.stdout, stdout=quiet, stderr=quiet)  # fmt: skip
        try:
            times = blocking_round_trips(port, count)
        finally:
            for proc in (echo_in, echo_out):
                proc.terminate()
                proc.wait(10)
            if echo_in.stdout is not None:
                echo_in.stdout.close()
        return {"p50": percentile(times, 50), "p99": percentile(times, 99)}

    return measure


def blocking_round_trips(port: int, count: int) -> list[float]:
    """Publish /ping and wait for /pong, ``count`` times; the round trips in ms."""
    sock, _ = isolation.connect(port, f"c-pinger-{port}")
    isolation.subscribe(sock, "/pong", 0)
    sock.settimeout(0.2)
    deadline = time.monotonic() + 10
    while True:  # until the echo has subscribed: a probe comes back
        sock.sendall(_packet(3, 0, _string("/ping") + b"ready?"))
        try:
            isolation.read_packet(sock)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError("the C echo never answered") from None
    with contextlib.suppress(TimeoutError):  # late copies of the probe
        while True:
            isolation.read_packet(sock)
    sock.settimeout(10)
    times = []
    for i in range(count):
        message = _packet(3, 0, _string("/ping") + str(i).encode())
        start = time.perf_counter()
        sock.sendall(message)
        isolation.read_packet(sock)
        times.append((time.perf_counter() - start) * 1000)
    sock.close()
    return times


def throughput(window: int, seconds: float, lean: bool) -> Callable[[Broker], dict[str, float]]:
    """Round trips/s with ``window`` in flight, through our echo_client or the lean echo."""

    def measure(broker: Broker) -> dict[str, float]:
        level = MQTT_VERSION.get(broker.kind, 4)
        echo = lean_echo(broker.port, level) if lean else start_program("echo_client", broker.port)
        try:
            asyncio.run(echo_ready(broker.port, version=level))
            asyncio.run(windowed(broker.port, window, 0.3, "/ping", "/pong", version=level))
            cpu_before = cpu_seconds(broker.proc.pid)
            result = asyncio.run(
                windowed(broker.port, window, seconds, "/ping", "/pong", version=level)
            )
            trips = result["round_trips_per_s"] * seconds
            result["cpu_us"] = (cpu_seconds(broker.proc.pid) - cpu_before) / trips * 1e6
            result["rss_mb"] = broker.rss_mb()
        finally:
            echo.terminate()
            echo.wait(10)
        return result

    return measure


def restart_to_pong(kind: str, cycles: int) -> list[float]:
    """Seconds from a restarted broker answering CONNECT to the next pong, over ``cycles``."""
    samples = []
    with workspace() as tmp:
        broker = start_broker(kind, tmp)
        port = broker.port
        echo = start_program("echo_client", port)
        pinger = subprocess.Popen(
            [PYTHON, "-m", "ping_client", "--port", str(port), "--interval", "0.01", "--json",
             "--stats-interval", "0", "--timeout", "1"],
            cwd=REPO, env={**os.environ, "MQTT_LOG_LEVEL": "WARNING"},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        pongs: list[float] = []

        def collect() -> None:
            assert pinger.stdout is not None
            for line in pinger.stdout:
                if '"event":"pong"' in line:
                    pongs.append(json.loads(line)["time"])

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        try:
            while not pongs:
                time.sleep(0.01)
            for _ in range(cycles):
                broker.proc.send_signal(signal.SIGKILL)
                broker.proc.wait(5)
                broker = start_broker(kind, tmp, port)
                ready = time.time()
                deadline = time.monotonic() + 10
                while not any(t > ready for t in pongs) and time.monotonic() < deadline:
                    time.sleep(0.002)
                after = [t for t in pongs if t > ready]
                if after:
                    samples.append(min(after) - ready)
        finally:
            pinger.terminate()
            echo.terminate()
            pinger.wait(10)
            echo.wait(10)
            broker.stop()
    return samples


def sigterm_under_load(kind: str, tries: int) -> list[float]:
    """Seconds from SIGTERM to exit with 100 messages in flight through the lean echo."""
    samples = []
    with workspace() as tmp:
        for _ in range(tries):
            broker = start_broker(kind, tmp)
            echo = lean_echo(broker.port)
            try:
                wait_connected(broker.port)
                asyncio.run(echo_ready(broker.port))

                def load(port: int = broker.port) -> None:
                    # The broker goes away mid-run: that is the point.
                    with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                        asyncio.run(windowed(port, 100, 3.0, "/ping", "/pong"))

                loader = threading.Thread(target=load, daemon=True)
                loader.start()
                time.sleep(0.5)
                start = time.perf_counter()
                broker.proc.send_signal(signal.SIGTERM)
                try:
                    broker.proc.wait(30)
                    samples.append(time.perf_counter() - start)
                except subprocess.TimeoutExpired:
                    samples.append(float("inf"))
                    broker.proc.kill()
                loader.join(10)
            finally:
                echo.terminate()
                echo.wait(10)
                broker.stop()
    return samples


def main() -> None:  # noqa: PLR0912 - one flat script of measurements
    """Measure, print the table, write bench/results.json."""
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.add_argument("--full", action="store_true", help="more rounds (a few minutes)")
    args = parser.parse_args()
    mosquitto_path()
    # A load client whose broker is killed under it says so once per write; that is expected.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    full = args.full
    # Many short rounds rather than a few long ones: the machine's speed drifts over minutes,
    # and each round pairs the two brokers back to back.
    rounds, count = (10, 500) if full else (2, 100)
    load_rounds = rounds if full else 1  # quick mode stays under about a minute
    started = time.monotonic()
    rows: list[Row] = []
    extra: dict[str, Any] = {}

    def add(metric: str, ours: float, theirs: float, unit: str, ratio: float | None = None) -> None:
        ratio = ratio if ratio is not None else (ours / theirs if theirs else float("nan"))
        rows.append((metric, ours, theirs, unit, ratio))
        sys.stderr.write(
            f"  {metric}: ours {ours:.3f} {unit}, mosquitto {theirs:.3f} {unit} ({ratio:.2f}x)\n"
        )

    def add_paired(metric: str, res: dict[str, list[dict[str, float]]], key: str, unit: str
                   ) -> None:  # fmt: skip
        """Add a row whose ratio is the median of the per-round ratios (ours / mosquitto)."""
        ours, theirs = [r[key] for r in res["ours"]], [r[key] for r in res["mosquitto"]]
        ratios = [o / t for o, t in zip(ours, theirs, strict=True) if t]
        add(metric, median(ours), median(theirs), unit, median(ratios) if ratios else None)

    if shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub"):
        sys.stderr.write("RTT with C clients (mosquitto_sub | mosquitto_pub -l), QoS 0\n")
        res = with_brokers(["ours", "mosquitto"], rounds, c_clients_rtt(count * 10))
        for p in ("p50", "p99"):
            add_paired(f"C clients, QoS 0 RTT {p}", res, p, "ms")
    else:
        sys.stderr.write("  (mosquitto-clients not installed: C-client row skipped)\n")

    sys.stderr.write("MQTT over WebSockets, lean clients, back to back (bench/websocket.py)\n")
    ws_runs: dict[str, list[dict[str, float]]] = {"ours": [], "mosquitto": []}
    with workspace() as tmp:
        for _ in range(rounds):
            for kind, runs in ws_runs.items():
                runs.append(websocket.measure(kind, count * 20, tmp))
    ws_rows = (
        ("WebSocket, QoS 0 RTT p50", "ws_p50_ms", "ms"),
        ("same lean client over TCP, QoS 0 RTT p50", "tcp_p50_ms", "ms"),
        ("WebSocket, broker CPU per round trip", "ws_cpu_us", "us"),
        ("memory per idle WebSocket connection", "idle_kib", "KiB"),
    )
    for label, key, unit in ws_rows:
        add_paired(label, ws_runs, key, unit)

    sys.stderr.write("RTT, whole stack (our echo_client and ping_client), back to back\n")
    ours_p50: dict[tuple[str, int], float] = {}
    for protocol in ("3.1.1", "5"):
        for qos in (0, 1):
            res = with_brokers(["ours", "mosquitto"], rounds,
                               rtt(qos, count * 5, flood=True, protocol=protocol))  # fmt: skip
            ours_p50[protocol, qos] = median([r["p50"] for r in res["ours"]])
            for p in ("p50", "p99"):
                add_paired(f"back to back, MQTT {protocol}, QoS {qos} RTT {p}", res, p, "ms")
    extra["v5_over_311_p50"] = {q: ours_p50["5", q] / ours_p50["3.1.1", q] for q in (0, 1)}
    sys.stderr.write("The broker's MQTT 5 path beside its 3.1.1 path: lean clients, QoS 0\n")
    res = with_brokers(["ours", "mosquitto"], max(rounds, 4),
                       versions_side_by_side(3.0 if full else 1.5))  # fmt: skip
    extra["lean_v5_over_311"] = {
        kind: {key: median([r[key] for r in runs]) for key in ("p50_ratio", "cpu_ratio")}
        for kind, runs in res.items()
    }
    for kind, ratios in extra["lean_v5_over_311"].items():
        sys.stderr.write(f"  MQTT 5 / 3.1.1, {kind}: p50 {ratios['p50_ratio']:.2f}x, broker CPU "
                         f"{ratios['cpu_ratio']:.2f}x\n")  # fmt: skip

    sys.stderr.write("RTT, whole stack, pings 10 ms apart (MQTT 5)\n")
    samples: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    for qos in (0, 1):
        res = with_brokers(["ours", "mosquitto"], rounds, rtt(qos, count, samples=samples[qos]))
        for p in ("p50", "p90", "p99"):
            add_paired(f"QoS {qos} RTT {p}", res, p, "ms")

    sys.stderr.write("Round trips/s through our echo_client\n")
    seconds = 3.0 if full else 1.0
    for window in (1, 10, 100):
        res = with_brokers(
            ["ours", "mosquitto"], load_rounds, throughput(window, seconds, lean=False)
        )
        add_paired(f"round trips/s, {window} in flight", res, "round_trips_per_s", "/s")

    sys.stderr.write("Broker capacity: lean echo and pinger, 100 in flight\n")
    kinds = ["ours", "amqtt", "mosquitto"]
    if mqttools_available():
        kinds.insert(2, "mqttools")
    else:
        sys.stderr.write("  (mqttools not installed: pip install mqttools; skipped)\n")
    res = with_brokers(kinds, load_rounds, throughput(100, seconds, lean=True))
    cap = {k: median([r["round_trips_per_s"] for r in v]) for k, v in res.items()}
    add_paired("capacity, round trips/s", res, "round_trips_per_s", "/s")
    extra["capacity_bare_amqtt"] = cap["amqtt"]
    extra["capacity_vs_bare_amqtt"] = cap["ours"] / cap["amqtt"]
    # CPU time is what a broker spends per message whatever else the machine does: it moves
    # a few % between runs where latency moves tens of %.
    add_paired("broker CPU per round trip", res, "cpu_us", "us")
    extra["cpu_us_bare_amqtt"] = median([r["cpu_us"] for r in res["amqtt"]])
    if "mqttools" in res:
        extra["capacity_mqttools"] = cap["mqttools"]
        extra["capacity_vs_mqttools"] = cap["ours"] / cap["mqttools"]
        extra["cpu_us_mqttools"] = median([r["cpu_us"] for r in res["mqttools"]])
    add_paired("capacity p50 RTT", res, "p50_ms", "ms")
    add("broker RSS after load", median([r["rss_mb"] for r in res["ours"]]),
        median([r["rss_mb"] for r in res["mosquitto"]]), "MiB")  # fmt: skip

    sys.stderr.write("Start-up, idle memory\n")
    boots: dict[str, list[Broker]] = {"ours": [], "mosquitto": []}
    with workspace() as tmp:
        # Start-up is short and the machine noisy: more boots than other rows, alternating.
        for _ in range(15 if full else 5):
            for kind in ("ours", "mosquitto"):
                broker = start_broker(kind, tmp)
                time.sleep(0.2)
                boots[kind].append(broker)
                broker.idle_rss = rss_mb(broker.proc.pid)
                broker.stop()
    add("start-up to first CONNACK", median([b.startup * 1000 for b in boots["ours"]]),
        median([b.startup * 1000 for b in boots["mosquitto"]]), "ms")  # fmt: skip
    add("broker RSS idle", median([b.idle_rss for b in boots["ours"]]),
        median([b.idle_rss for b in boots["mosquitto"]]), "MiB")  # fmt: skip

    sys.stderr.write("Restart: broker answering CONNECT -> next pong\n")
    cycles = 10 if full else 3
    ours_r, theirs_r = restart_to_pong("ours", cycles), restart_to_pong("mosquitto", cycles)
    add("restart to first pong, p50", median(ours_r) * 1000, median(theirs_r) * 1000, "ms")

    sys.stderr.write("SIGTERM to exit, 100 messages in flight\n")
    tries = 20 if full else 3
    ours_t, theirs_t = sigterm_under_load("ours", tries), sigterm_under_load("mosquitto", tries)
    add("SIGTERM to exit under load, max", max(ours_t) * 1000, max(theirs_t) * 1000, "ms")

    sys.stderr.write("Scale: 10,000 devices, the rate curve, fan-out\n")
    scale_result = scale.run()

    sys.stderr.write("A fleet: 1,000 devices pinging, a SIGKILL under them, 10,000 connected\n")
    fleet_result = fleet.run(1000, 20.0 if full else 10.0, 10_000, 30.0 if full else 20.0)

    elapsed = time.monotonic() - started
    lines = [
        f"mqtt-pingpong benchmark, {time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, "
        f"{'full' if full else 'quick'} mode ({rounds} A/B rounds for RTT, {load_rounds} for "
        f"load), {elapsed:.0f} s",
        "",
        "| metric | ours | mosquitto | ours / mosquitto |",
        "|---|---|---|---|",
    ]
    for metric, ours, theirs, unit, ratio in rows:
        lines.append(f"| {metric} | {ours:.3f} {unit} | {theirs:.3f} {unit} | {ratio:.2f}x |")
    lines.append("")
    lines.append(
        f"Capacity of bare amqtt 0.12.1 in the same run: {extra['capacity_bare_amqtt']:.0f} "
        f"round trips/s; ours is {extra['capacity_vs_bare_amqtt']:.2f}x that. Its CPU per round "
        f"trip: {extra['cpu_us_bare_amqtt']:.1f} us."
    )
    v5 = extra["v5_over_311_p50"]
    lean = extra["lean_v5_over_311"]
    lines.append(
        f"Our MQTT 5 path beside our 3.1.1 path, back to back through our clients, p50: "
        f"{v5[0]:.2f}x at QoS 0, {v5[1]:.2f}x at QoS 1 (mostly paho's MQTT 5 requests). Where "
        f"the broker's share shows (lean clients, QoS 0, one in flight): ours "
        f"{lean['ours']['p50_ratio']:.2f}x p50 and {lean['ours']['cpu_ratio']:.2f}x broker CPU "
        f"per round trip; mosquitto {lean['mosquitto']['p50_ratio']:.2f}x and "
        f"{lean['mosquitto']['cpu_ratio']:.2f}x."
    )
    if "capacity_mqttools" in extra:
        lines.append(
            f"mqttools {version('mqttools')} (MQTT 5, the lean clients speaking MQTT 5 to it): "
            f"{extra['capacity_mqttools']:.0f} round trips/s; ours is "
            f"{extra['capacity_vs_mqttools']:.2f}x that. Its CPU per round trip: "
            f"{extra['cpu_us_mqttools']:.1f} us."
        )
    lines += ["", "Scale, in the same run (`bench/scale.py`):", "",
              "| metric | ours | mosquitto | ours / mosquitto |", "|---|---|---|---|"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in scale.rows(scale_result)]
    lines += ["", "A fleet of devices (`ping_client --devices`), in the same run "
              "(`bench/fleet.py`). The fleet is one Python process: compare its CPU with the "
              "broker's to see which bounds a figure.", "",
              "| metric | ours | mosquitto | ours / mosquitto |", "|---|---|---|---|"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in fleet.rows(fleet_result)]
    table = "\n".join(lines)
    sys.stdout.write(table + "\n")
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "nproc": os.cpu_count(), "full": full,
        "rows": [{"metric": m, "ours": o, "mosquitto": t, "unit": u, "ratio": r}
                 for m, o, t, u, r in rows],
        **extra, "restart_samples_s": {"ours": ours_r, "mosquitto": theirs_r},
        "sigterm_samples_s": {"ours": ours_t, "mosquitto": theirs_t}, "scale": scale_result,
        "fleet": fleet_result,
    }, indent=2) + "\n")  # fmt: skip
    all_rows = rows + picture.scale_rows([*scale.rows(scale_result), *fleet.rows(fleet_result)])
    sys.stderr.write(picture.draw(all_rows, samples) + "\n")


if __name__ == "__main__":
    main()
