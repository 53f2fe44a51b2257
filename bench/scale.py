"""Scale, ours beside mosquitto: memory per connection, connect rate, cost under rate, fan-out.

    python -m bench.scale            # about two minutes; `make bench` runs the quick rows

Every client here is a raw socket or a small asyncio client with many connections per process,
so that the client side is not what is measured; where it was the limit, the row says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import isolation
from bench.harness import (
    PYTHON,
    Broker,
    _packet,
    _string,
    cpu_seconds,
    echo_ready,
    ping,
    start_broker,
    start_program,
    workspace,
)

RESULTS = Path(__file__).with_name("scale.json")

KINDS = ("ours", "mosquitto")


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-files limit towards ``wanted``; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def connect_and_subscribe(port: int, index: int) -> socket.socket:
    """One device: CONNECT and SUBSCRIBE dev/N/cmd sent together; wait for CONNACK and SUBACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    client_id = f"dev-{index}"
    connect = _packet(1, 0, _string("MQTT") + bytes([4, 2]) + struct.pack("!H", 0)
                      + _string(client_id))  # fmt: skip
    subscribe = _packet(8, 2, b"\x00\x01" + _string(f"dev/{index}/cmd") + b"\x00")
    sock.sendall(connect + subscribe)
    kind, _ = isolation.read_packet(sock)
    assert kind >> 4 == 2, kind
    kind, _ = isolation.read_packet(sock)
    assert kind >> 4 == 9, kind
    return sock


def devices(broker: Broker, count: int, *, keep: bool = False) -> dict[str, Any]:
    """Connect ``count`` devices one after another; memory per connection and connects/s.

    With ``keep``, the open sockets come back under "sockets", for the caller to close.
    """
    raise_open_files(count + 100)
    before = broker.rss_mb()
    started = time.perf_counter()
    sockets = [connect_and_subscribe(broker.port, i) for i in range(count)]
    elapsed = time.perf_counter() - started
    time.sleep(0.5)  # let the broker settle (its RSS is read once more below)
    after = broker.rss_mb()
    if not keep:
        for sock in sockets:
            sock.close()
    result: dict[str, Any] = {
        "count": count, "seconds": elapsed, "per_s": count / elapsed,
        "kib_each": (after - before) * 1024 / count, "rss_before_mb": before,
        "rss_after_mb": after,
    }  # fmt: skip
    if keep:
        result["sockets"] = sockets
    return result


def rate_curve(broker: Broker, rate: int, seconds: float = 2.0) -> dict[str, Any]:
    """Our ping_client and echo_client at ``rate`` pings/s for ``seconds``: p50, p99, loss."""
    echo = start_program("echo_client", broker.port)
    try:
        asyncio.run(echo_ready(broker.port))
        summary = ping(broker.port, int(rate * seconds), 1 / rate, "--timeout", "2")
    finally:
        echo.terminate()
        echo.wait(10)
    r = summary["rtt_ms"]
    return {"rate": rate, "p50": r["p50"], "p99": r["p99"], "lost": summary["lost"],
            "sent": summary["sent"]}  # fmt: skip


FANOUT_READER = """
import os, selectors, socket, struct, sys, time
port, count, watched = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sel = selectors.DefaultSelector()
socks = []
def packet(kind, flags, body):
    return bytes([kind << 4 | flags, len(body)]) + body
def string(text):
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(packet(1, 0, string("MQTT") + bytes([4, 2, 0, 0]) + string(f"fan-{i}"))
              + packet(8, 2, b"\\x00\\x01" + string("fan/out") + b"\\x00"))
    got = b""
    while len(got) < 9:
        got += s.recv(9 - len(got))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
    socks.append(s)
sys.stdout.write("ready\\n"); sys.stdout.flush()
first, last, received, buffers = [], [], 0, {}
while not os.path.exists(sys.argv[4]):
    for key, _ in sel.select(0.2):
        data = key.fileobj.recv(1 << 16)
        if not data:
            continue
        received += len(data)
        if key.data < watched or key.data >= count - watched:  # parse these, with send times
            buf = buffers.get(key.data, b"") + data
            into = first if key.data < watched else last
            while len(buf) >= 2 and len(buf) >= 2 + buf[1]:
                body, buf = buf[2 : 2 + buf[1]], buf[2 + buf[1] :]
                into.append((time.monotonic() - float(body[2 + 7 :])) * 1000)
            buffers[key.data] = buf
for found in (first, last):
    found.sort()
    n = len(found)
    print(n, found[n // 2] if n else "nan", found[int(n * 0.99)] if n else "nan")
print(received)
"""


def fan_out(broker: Broker, subscribers: int = 1000, rate: int = 100, seconds: float = 3.0,
            workdir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One publisher at ``rate`` msg/s to ``subscribers`` on one topic: delivery p50/p99, CPU.

    Delivery times are those of the first 20 subscribers (written first) and of the last 20
    (written last: the whole fan-out's time, read back by one Python process); both sets are
    counted, so that a subscriber left out shows.
    """
    raise_open_files(subscribers + 100)
    assert workdir is not None
    done = workdir / f"fan-done-{broker.port}"
    script = workdir / "fan_reader.py"
    script.write_text(FANOUT_READER)
    watched = 20
    reader = subprocess.Popen(
        [PYTHON, str(script), str(broker.port), str(subscribers), str(watched), str(done)],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout is not None
    if reader.stdout.readline().strip() != "ready":
        raise RuntimeError("the fan-out readers did not connect")
    pub, _ = isolation.connect(broker.port, "fan-publisher")
    cpu_before = cpu_seconds(broker.proc.pid)
    started = time.monotonic()
    count = int(rate * seconds)
    for n in range(count):
        due = started + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.sendall(_packet(3, 0, _string("fan/out") + f"{time.monotonic():.6f}".encode()))
    time.sleep(0.5)  # the last deliveries
    cpu = cpu_seconds(broker.proc.pid) - cpu_before
    done.touch()
    out, _ = reader.communicate(timeout=30)
    pub.close()
    (n_first, p50, p99), (n_last, last_p50, last_p99), _ = (
        line.split() for line in out.strip().splitlines()
    )  # fmt: skip
    expected = count * watched
    return {"subscribers": subscribers, "rate": rate, "messages": count,
            "p50": float(p50), "p99": float(p99), "last_p50": float(last_p50),
            "last_p99": float(last_p99), "delivered_to_watched": int(n_first) + int(n_last),
            "expected_to_watched": 2 * expected, "cpu_s": cpu,
            "cpu_us_per_delivery": cpu / (count * subscribers) * 1e6}  # fmt: skip


CONNECT_ROUNDS = 5
"""Rounds of ``devices``, the two brokers in turn: one round's ratio moved from 0.64x to 0.76x."""
FANOUT_ROUNDS = 3
"""Rounds of ``fan_out``: its first-20 p50 moved from 1.0x to 1.9x mosquitto's between runs."""


def in_rounds(
    what: str, tmp: Path, rounds: int, measure: Callable[[Broker], dict[str, Any]], key: str
) -> dict[str, Any]:
    """``measure`` ``rounds`` times for each kind, in turn, each on a fresh broker.

    ``what`` names it in the progress lines. Each kind's result is its median round by
    ``key``, with every round's ``key`` under "rounds"; "ratios" holds each round's ours /
    mosquitto, in order.
    """
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for number in range(rounds):
        for kind in KINDS if number % 2 == 0 else KINDS[::-1]:
            sys.stderr.write(f"{what}: {kind}, round {number + 1} of {rounds}\n")
            broker = start_broker(kind, tmp)
            try:
                found[kind].append(measure(broker))
            finally:
                broker.stop()
    out: dict[str, Any] = {}
    for kind, results in found.items():
        median = sorted(results, key=lambda r: r[key])[len(results) // 2]
        out[kind] = {**median, "rounds": [round(r[key], 3) for r in results]}
    out["ratios"] = [a[key] / b[key] for a, b in zip(*found.values(), strict=True)]
    return out


def run(device_count: int = 10_000, rounds: int = CONNECT_ROUNDS) -> dict[str, Any]:
    """Every scale row: the connect rounds, the rate curves, then the fan-out rounds."""
    out: dict[str, Any] = {kind: {} for kind in KINDS}
    with workspace() as tmp:
        connects = in_rounds("devices", tmp, rounds, lambda b: devices(b, device_count), "per_s")
        out["connect_ratios"] = connects.pop("ratios")
        for kind in KINDS:
            out[kind]["devices"] = connects[kind]
            broker = start_broker(kind, tmp)
            try:
                sys.stderr.write(f"rate curve: {kind}\n")
                out[kind]["curve"] = [rate_curve(broker, rate) for rate in RATES]
            finally:
                broker.stop()
        fanouts = in_rounds("fan-out", tmp, FANOUT_ROUNDS, lambda b: fan_out(b, workdir=tmp), "p50")
        out["fanout_ratios"] = fanouts.pop("ratios")
        for kind in KINDS:
            out[kind]["fanout"] = fanouts[kind]
    return out


RATES = (200, 1000, 2000, 5000)


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows: metric, ours, mosquitto, ratio."""
    o, t = r["ours"], r["mosquitto"]
    out = []
    n = o["devices"]["count"]
    a, b = o["devices"]["kib_each"], t["devices"]["kib_each"]
    out.append((f"memory per idle subscribed connection ({n:,})", f"{a:.1f} KiB", f"{b:.1f} KiB",
                f"{a / b:.2f}x"))  # fmt: skip
    ratios = sorted(r.get("connect_ratios", []))
    a, b = o["devices"]["per_s"], t["devices"]["per_s"]
    # The median of the rounds' ratios, each round's two brokers measured back to back; with
    # the range, as this row is the noisiest of the scale rows.
    ratio = f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else (
        f"{a / b:.2f}x"
    )  # fmt: skip
    rounds = f", median of {len(ratios)} rounds" if ratios else ""
    out.append((f"CONNECT + SUBSCRIBE per second, sequential{rounds}", f"{a:.1f} /s",
                f"{b:.1f} /s", ratio))  # fmt: skip
    base = t["curve"][0]["p50"]
    for mine, theirs in zip(o["curve"], t["curve"], strict=True):
        # Where even mosquitto's p50 is 10x its p50 at the lowest rate, pings queue in our two
        # Python clients (aiomqtt over paho), not in the broker: the row says so.
        limited = " (clients saturated)" if theirs["p50"] > 10 * base else ""
        for p in ("p50", "p99"):
            out.append((f"{mine['rate']:,} pings/s through our clients, {p}{limited}",
                        f"{mine[p]:.3f} ms ({mine['lost']} lost)",
                        f"{theirs[p]:.3f} ms ({theirs['lost']} lost)",
                        f"{mine[p] / theirs[p]:.2f}x"))  # fmt: skip
    fo, ft = o["fanout"], t["fanout"]
    label = f"fan-out 1 -> {fo['subscribers']:,} at {fo['rate']} msg/s"
    fan = sorted(r.get("fanout_ratios", []))
    for key, who in (("", "first 20"), ("last_", "last 20")):
        for p in ("p50", "p99"):
            a, b = fo[key + p], ft[key + p]
            metric, ratio = f"{label}, delivery {p}, {who}", f"{a / b:.2f}x"
            if fan and key + p == "p50":  # the rounds' median ratio; the others are its round's
                metric += f", median of {len(fan)} rounds"
                ratio = f"{fan[len(fan) // 2]:.2f}x ({fan[0]:.2f}-{fan[-1]:.2f})"
            out.append((metric, f"{a:.2f} ms", f"{b:.2f} ms", ratio))
    out.append((f"{label}, deliveries seen to the 40 watched",
                f"{fo['delivered_to_watched']} of {fo['expected_to_watched']}",
                f"{ft['delivered_to_watched']} of {ft['expected_to_watched']}", ""))  # fmt: skip
    out.append((f"{label}, broker CPU per delivery", f"{fo['cpu_us_per_delivery']:.2f} us",
                f"{ft['cpu_us_per_delivery']:.2f} us",
                f"{fo['cpu_us_per_delivery'] / ft['cpu_us_per_delivery']:.2f}x"))  # fmt: skip
    return out


def main() -> None:
    """Run, print the rows, write bench/scale.json."""
    parser = argparse.ArgumentParser(prog="bench.scale", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    result = run(args.devices)
    result["date"] = time.strftime("%Y-%m-%d")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write("| metric | ours | mosquitto | ours / mosquitto |\n|---|---|---|---|\n")
    for row in rows(result):
        sys.stdout.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
