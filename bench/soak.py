"""``make soak``: the figures behind the README's "Reliability" table, measured again.

    python -m bench.soak            # about three minutes
    python -m bench.soak --outage   # also a 60 s broker outage (one more minute)

Prints a Markdown table and writes bench/soak.json. Everything targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import isolation, scale
from bench.harness import (
    PYTHON,
    REPO,
    LeanClient,
    echo_ready,
    env,
    free_port,
    ping,
    rss_mb,
    start_broker,
    start_program,
    workspace,
)
from bench.run import restart_to_pong

RESULTS = Path(__file__).with_name("soak.json")
PING_COUNT = 100
PING_INTERVAL = 0.02


def rtt(port: int) -> dict[str, float]:
    """Ping p50/p99 and loss over PING_COUNT pings."""
    summary = ping(port, PING_COUNT, PING_INTERVAL, "--timeout", "2")
    return {"p50": summary["rtt_ms"]["p50"], "p99": summary["rtt_ms"]["p99"],
            "lost": summary["lost"]}  # fmt: skip


async def _flood(port: int, idle: int, silent: int, hold: asyncio.Event) -> tuple[int, int]:
    clients = []
    for i in range(idle):
        clients.append(await LeanClient.connect(port, f"flood-{i}"))
    sockets = [await asyncio.open_connection("127.0.0.1", port) for _ in range(silent)]
    await hold.wait()
    closed = 0
    for reader, writer in sockets:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            closed += (await asyncio.wait_for(reader.read(1), 10)) == b""
        writer.close()
    for c in clients:
        c.close()
    return len(clients), closed


def flood(port: int, broker_pid: int) -> dict[str, Any]:
    """RTT idle vs during 1000 idle connections plus 200 that never send CONNECT."""
    idle = rtt(port)
    hold = asyncio.Event()
    result: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    def runner() -> None:
        result["flood"] = loop.run_until_complete(_flood(port, 1000, 200, hold))

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    time.sleep(3)  # let the flood connect (a soak, not a test: it measures, it asserts nothing)
    during = rtt(port)
    peak = rss_mb(broker_pid)
    loop.call_soon_threadsafe(hold.set)
    thread.join(60)
    connected, closed = result.get("flood", (0, 0))
    return {"idle": idle, "during": during, "rss_mb": peak, "idle_connections": connected,
            "silent_closed_by_broker": closed}  # fmt: skip


def devices(count: int) -> dict[str, Any]:
    """A fresh broker holding ``count`` idle subscribed devices; the probe's RTT meanwhile."""
    scale.raise_open_files(count + 200)
    with workspace() as tmp:
        broker = start_broker("ours", tmp, free_port())
        echo = start_program("echo_client", broker.port)
        try:
            idle = rtt(broker.port)
            before = broker.rss_mb()
            held = scale.devices(broker, count, keep=True)
            during = rtt(broker.port)
            for sock in held.pop("sockets"):
                sock.close()
        finally:
            echo.terminate()
            echo.wait(10)
            broker.stop()
    return {"count": count, "idle": idle, "during": during, "rss_before_mb": before, **held}


def load(port: int, broker_pid: int, seconds: float) -> dict[str, Any]:
    """RTT and RSS while 20 publishers send 200 msg/s each to their own topics."""
    idle = rtt(port)
    before = rss_mb(broker_pid)
    stop = threading.Event()
    sent = [0]
    peak = [before]

    def publishers() -> None:
        socks = []
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"\x10" + bytes([12 + len(f"load-{i}")]) + b"\x00\x04MQTT\x04\x02\x00\x00"
                      + len(f"load-{i}").to_bytes(2, "big") + f"load-{i}".encode())  # fmt: skip
            s.recv(4)
            socks.append(s)
        batches = []
        for i in range(20):
            topic = f"load/{i}".encode()
            packet = b"\x30" + bytes([2 + len(topic) + 32]) + len(topic).to_bytes(2, "big") + topic
            batches.append((packet + b"x" * 32) * 10)
        tick = time.monotonic()
        while not stop.is_set():
            for s, batch in zip(socks, batches, strict=True):
                s.sendall(batch)
            sent[0] += 200
            peak[0] = max(peak[0], rss_mb(broker_pid))
            tick += 0.05
            stop.wait(max(0.0, tick - time.monotonic()))
        for s in socks:
            s.close()

    thread = threading.Thread(target=publishers, daemon=True)
    thread.start()
    started = time.monotonic()
    samples = []
    while time.monotonic() - started < seconds:
        samples.append(rtt(port))
    stop.set()
    thread.join(10)
    elapsed = time.monotonic() - started
    after = rss_mb(broker_pid)
    return {
        "idle": idle,
        "during_p50": max(s["p50"] for s in samples),
        "during_p99": max(s["p99"] for s in samples),
        "lost": sum(s["lost"] for s in samples),
        "messages_per_s": sent[0] / elapsed,
        "seconds": elapsed,
        "rss_before_mb": before, "rss_peak_mb": peak[0], "rss_after_mb": after,
    }  # fmt: skip


def fuzz(port: int, cases: int) -> dict[str, Any]:
    """Random and mutated bytes at the broker; count how many it survived."""
    rng = random.Random(20261129)  # noqa: S311 - reproducible noise, not secrets
    connect = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03fzz"
    start = time.monotonic()
    for _ in range(cases):
        data = bytearray(connect + b"\x30\x07\x00\x03abcxy")
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = bytearray(rng.randbytes(rng.randint(1, 64))) + data
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(bytes(data))
                s.shutdown(socket.SHUT_WR)
                s.recv(64)
        except OSError:
            pass
    return {"cases": cases, "seconds": time.monotonic() - start,
            "after": rtt(port)}  # fmt: skip


def outage(seconds: float) -> dict[str, Any]:
    """Stop the broker for ``seconds``; count the clients' log lines and watch their memory."""
    with workspace() as tmp:
        broker = start_broker("ours", tmp)
        port = broker.port
        logs = {n: tmp / f"{n}.log" for n in ("echo_client", "ping_client")}
        procs = {}
        for name, path in logs.items():
            with path.open("wb") as out:
                extra = ["--interval", "0.2"] if name == "ping_client" else []
                procs[name] = subprocess.Popen(
                    [PYTHON, "-m", name, "--port", str(port), *extra], cwd=REPO,
                    env=env(MQTT_LOG_LEVEL="INFO"), stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
        time.sleep(2)
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(5)
        lines_before = {n: len(p.read_text().splitlines()) for n, p in logs.items()}
        rss_before = {n: rss_mb(p.pid) for n, p in procs.items()}
        time.sleep(seconds)
        rss_after = {n: rss_mb(p.pid) for n, p in procs.items()}
        broker = start_broker("ours", tmp, port)
        time.sleep(2)
        lines = {
            n: [ln for ln in p.read_text().splitlines()[lines_before[n] :]
                if "onnect" in ln or "Still cannot" in ln]
            for n, p in logs.items()
        }  # fmt: skip
        for p in procs.values():
            p.terminate()
            p.wait(10)
        broker.stop()
    return {"seconds": seconds, "retry_log_lines": {n: len(v) for n, v in lines.items()},
            "rss_growth_mb": {n: rss_after[n] - rss_before[n] for n in procs}}  # fmt: skip


def persistent(kind: str, kills: int = 5, count: int = 300) -> dict[str, Any]:
    """Zero-loss mode: QoS 1, persistent sessions, echo_client SIGKILLed ``kills`` times.

    10 pings/s for ``count`` pings; each killed echo client is started again at once (what
    supervisord does). Every ping must be answered exactly once in the end.
    """
    echo_args = ("--qos", "1", "--session", "persistent", "--client-id", "soak-echo")
    with workspace() as tmp:
        broker = start_broker(kind, tmp)
        echo = start_program("echo_client", broker.port, *echo_args)
        try:
            asyncio.run(echo_ready(broker.port))
            probe = subprocess.Popen(
                [PYTHON, "-m", "ping_client", "--port", str(broker.port), "--qos", "1",
                 "--session", "persistent", "--client-id", "soak-ping", "--count", str(count),
                 "--interval", "0.1", "--timeout", "15", "--json", "--stats-interval", "0"],
                env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True,
            )  # fmt: skip
            for _ in range(kills):
                time.sleep(count * 0.1 / (kills + 1))
                echo.kill()
                echo.wait(5)
                echo = start_program("echo_client", broker.port, *echo_args)
            out, _ = probe.communicate(timeout=count * 0.1 + 60)
        finally:
            echo.terminate()
            echo.wait(10)
            broker.stop()
    summary = json.loads(out.splitlines()[-1])
    return {
        "kind": kind, "kills": kills,
        **{k: summary[k] for k in ("sent", "received", "late", "never_answered", "duplicates")},
        "p99_ms": summary["rtt_ms"]["p99"], "max_ms": summary["rtt_ms"]["max"],
    }  # fmt: skip


def main() -> None:
    """Run the soak scenarios and print the table."""
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__)
    parser.add_argument("--outage", action="store_true", help="add a 60 s broker outage")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    args = parser.parse_args()
    import logging  # noqa: PLC0415

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "nproc": os.cpu_count()}
    sys.stderr.write("restart after SIGKILL (5 cycles)\n")
    results["restart_s"] = restart_to_pong("ours", 5)
    with workspace() as tmp:
        broker = start_broker("ours", tmp, free_port())
        echo = start_program("echo_client", broker.port)
        time.sleep(1)
        try:
            sys.stderr.write("connection flood\n")
            results["flood"] = flood(broker.port, broker.proc.pid)
            sys.stderr.write(f"message load, {args.load_seconds:g} s\n")
            results["load"] = load(broker.port, broker.proc.pid, args.load_seconds)
            sys.stderr.write("fuzz\n")
            results["fuzz"] = fuzz(broker.port, 2000)
            results["broker_alive"] = broker.proc.poll() is None
        finally:
            echo.terminate()
            echo.wait(10)
            broker.stop()
    sys.stderr.write("10,000 idle devices\n")
    results["devices"] = devices(10_000)
    sys.stderr.write("isolation, ours beside mosquitto\n")
    results["isolation"] = isolation.run()
    sys.stderr.write("zero-loss mode: echo_client SIGKILLed 5 times, ours beside mosquitto\n")
    results["persistent"] = [persistent(kind) for kind in ("ours", "mosquitto")]
    if args.outage:
        sys.stderr.write("60 s outage\n")
        results["outage"] = outage(60)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(table(results))


def table(r: dict[str, Any]) -> str:
    """Render the results as the README's Reliability table."""
    restart = sorted(r["restart_s"])
    f, ld, fz = r["flood"], r["load"], r["fuzz"]
    rows = [
        ("Broker SIGKILL, restarted", f"first pong {restart[len(restart) // 2] * 1000:.0f} ms "
         f"after the new broker answers (p50 of {len(restart)}; max {restart[-1] * 1000:.0f} ms)"),
        ("1000 idle connections + 200 that never send CONNECT",
         f"ping p99 {f['during']['p99']:.2f} ms vs {f['idle']['p99']:.2f} ms idle "
         f"({f['during']['p99'] / f['idle']['p99']:.1f}x), {f['during']['lost']} lost; "
         f"{f['silent_closed_by_broker']}/200 silent ones closed by the broker; "
         f"broker RSS {f['rss_mb']:.0f} MiB"),
        (f"20 publishers x 200 msg/s for {ld['seconds']:.0f} s",
         f"{ld['messages_per_s']:.0f} msg/s sent; ping p99 {ld['during_p99']:.2f} ms vs "
         f"{ld['idle']['p99']:.2f} ms idle, {ld['lost']} lost; broker RSS {ld['rss_before_mb']:.0f}"
         f" -> peak {ld['rss_peak_mb']:.0f} -> {ld['rss_after_mb']:.0f} MiB"),
        (f"{fz['cases']} fuzzed connections", f"broker alive: {r['broker_alive']}; ping p99 after "
         f"{fz['after']['p99']:.2f} ms, {fz['after']['lost']} lost"),
    ]  # fmt: skip
    d = r["devices"]
    rows.append((f"{d['count']:,} idle devices (CONNECT + SUBSCRIBE each)",
                 f"connected at {d['per_s']:,.0f}/s; broker RSS {d['rss_before_mb']:.0f} -> "
                 f"{d['rss_after_mb']:.0f} MiB ({d['kib_each']:.1f} KiB each); ping p50/p99 "
                 f"{d['during']['p50']:.2f}/{d['during']['p99']:.2f} ms vs "
                 f"{d['idle']['p50']:.2f}/{d['idle']['p99']:.2f} ms before, "
                 f"{d['during']['lost']} lost"))  # fmt: skip
    rows += isolation.rows(r["isolation"])
    if "persistent" in r:
        runs = r["persistent"]
        rows.append((
            f"QoS 1, `--session persistent`, echo_client SIGKILLed {runs[0]['kills']} times "
            f"(restarted at once), {runs[0]['sent']} pings at 10/s",
            "; ".join(f"{x['kind']}: {x['received']}/{x['sent']} answered, {x['late']} late, "
                      f"{x['never_answered']} never answered, {x['duplicates']} duplicate, "
                      f"RTT max {x['max_ms']:.0f} ms" for x in runs),
        ))  # fmt: skip
    if "outage" in r:
        o = r["outage"]
        growth = ", ".join(f"{k} {v:+.1f} MiB" for k, v in o["rss_growth_mb"].items())
        lines_seen = o["retry_log_lines"]
        rows.append((f"Broker down {o['seconds']:.0f} s",
                     f"retry log lines {lines_seen}; client RSS growth {growth}"))  # fmt: skip
    lines = [f"Soak run {r['date']}, nproc {r['nproc']}, `make soak`", "",
             "| fault / input / load | measured |", "|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
