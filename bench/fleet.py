"""A fleet of devices through ours and through mosquitto, side by side in one run.

    python -m bench.fleet               # 1,000 and 10,000 devices, about four minutes
    python -m bench.fleet --devices 300 # smaller

For each broker, a fresh one with our echo_client: ``ping_client --devices N`` at 1 ping/s per
device for a while (RTT p50/p99, loss, connect times), then again with the broker SIGKILLed in
the middle and started again on the same port ("fleet back in": from the first device back to
every device back), then 10,000 devices connected at once with 1 ping/s among them all. The CPU
seconds of the broker and of the fleet's process over each run say which one bounds the
figures. Prints a table; writes bench/fleet.json. ``make bench`` runs it too (:func:`run`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    PYTHON,
    REPO,
    cpu_seconds,
    env,
    free_port,
    start_broker,
    start_program,
    workspace,
)
from bench.scale import raise_open_files

OUT = REPO / "bench" / "fleet.json"


def fleet(
    port: int, devices: int, seconds: float, tmp: Path, interval: float = 1.0, *extra: str
) -> subprocess.Popen[bytes]:
    """Start ``ping_client --devices`` for ``seconds`` (its --deadline), JSON to a file.

    Each device pings every ``interval`` (its first ping at a random time within one).
    Files, not pipes: a pipe nobody reads while the fleet runs fills up and stops it.
    """
    raise_open_files(4 * devices + 100)  # each paho client holds a socket and a socketpair
    with (tmp / "fleet.out").open("wb") as out, (tmp / "fleet.err").open("wb") as err:
        return subprocess.Popen(
            [PYTHON, "-m", "ping_client", "--port", str(port), "--devices", str(devices),
             "--interval", f"{interval:g}", "--deadline", str(seconds), "--json",
             "--connect-timeout", "60", *extra],
            env=env(), cwd=REPO, stdout=out, stderr=err,
        )  # fmt: skip


def events_of(proc: subprocess.Popen[bytes], timeout: float, tmp: Path) -> list[dict[str, Any]]:
    """Wait for the fleet to end; return its JSON events, the summary last."""
    proc.wait(timeout)
    out = (tmp / "fleet.out").read_text()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    if not lines or lines[-1]["event"] != "summary":
        err = (tmp / "fleet.err").read_text()
        raise RuntimeError(f"the fleet did not finish: {err[-500:]}")
    return lines


def summary_of(proc: subprocess.Popen[bytes], timeout: float, tmp: Path) -> dict[str, Any]:
    """Wait for the fleet to end; return its JSON summary."""
    summary: dict[str, Any] = events_of(proc, timeout, tmp)[-1]
    return summary


LOSS_KINDS = ("before the kill", "while the broker died", "before the echo was back", "later")

FLEET_BOUND = 0.6
"""CPU seconds a second of the fleet's own process from which its RTTs are its own queue's.

On this 2-core machine the fleet shares the cores with the broker and the echo_client. On
2026-12-01 the fleet used 0.5 s a second against either broker, and p50 was 1.4 to 1.8 ms; on
a slower day, 0.59 gave 5.3 ms, and 0.6 to 0.8 gave 8 to 96 ms, against either broker.
"""


def bound(steady_run: dict[str, Any]) -> str:
    """Say what bounds a steady run's RTTs: "" (the broker's share shows), or the fleet."""
    share = steady_run["fleet_cpu_s"] / steady_run["summary"]["elapsed_s"]
    return f"fleet-bound, {share:.2f} CPU s/s" if share >= FLEET_BOUND else ""


def losses(events: list[dict[str, Any]], killed_at: float) -> dict[str, int]:
    """When the pings lost around a SIGKILL at ``killed_at`` (wall clock) were sent.

    - before the kill: in the broker's or the echo's hands when the broker died;
    - while the broker died: after the kill, before the device saw its connection end (the
      kernel closes a killed process's sockets after unmapping its memory, and the device's
      process reads a thousand FINs one after another);
    - before the echo was back: by a device already back, to a broker the echo_client had not
      yet subscribed to again (its 100 ms retries run as the devices' do); the echo was back
      once a ping sent after the kill was answered, so the earliest such ping marks it;
    - later: none of these.
    """
    sent = {(e["device"], e["seq"]): e["time"] for e in events if e["event"] == "ping"}
    answered = (sent.get((e["device"], e["seq"]), 0.0) for e in events if e["event"] == "pong")
    echo_back = min((t for t in answered if t > killed_at), default=math.inf)
    down: dict[int, float] = {}
    for e in events:
        if e["event"] == "disconnected" and e["time"] >= killed_at:
            down.setdefault(e["device"], e["time"])
    found = dict.fromkeys(LOSS_KINDS, 0)
    for e in events:
        if e["event"] != "lost":
            continue
        at = sent[(e["device"], e["seq"])]
        if at < killed_at:
            found["before the kill"] += 1
        elif at < down.get(e["device"], math.inf):
            found["while the broker died"] += 1
        elif at < echo_back:
            found["before the echo was back"] += 1
        else:
            found["later"] += 1
    return found


def _children_cpu() -> float:
    """CPU seconds of the children waited for so far (the fleet, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def steady(
    kind: str, devices: int, seconds: float, tmp: Path, interval: float = 1.0
) -> dict[str, Any]:
    """The fleet for ``seconds`` against a fresh broker of ``kind``."""
    broker = start_broker(kind, tmp)
    echo = start_program("echo_client", broker.port)
    try:
        time.sleep(1.0)  # the echo subscribed (it logs nothing on stdout to wait for)
        cpu = cpu_seconds(broker.proc.pid)
        children = _children_cpu()
        proc = fleet(broker.port, devices, seconds, tmp, interval)
        summary = summary_of(proc, seconds + 120, tmp)
        return {"summary": summary, "broker_cpu_s": cpu_seconds(broker.proc.pid) - cpu,
                "fleet_cpu_s": _children_cpu() - children,
                "broker_rss_mb": broker.rss_mb()}  # fmt: skip
    finally:
        echo.terminate()
        echo.wait(10)
        broker.stop()


def killed(
    kind: str,
    devices: int,
    tmp: Path,
    *,
    qos: int = 0,
    seconds: float = 30.0,
    kill_at: float = 12.0,
) -> dict[str, Any]:
    """The fleet up, the broker SIGKILLed and started again on its port: how fast all are back.

    At QoS 1 the devices' clients (paho) send again, once reconnected, every ping the dead
    broker had not acknowledged.
    """
    port = free_port()
    broker = start_broker(kind, tmp, port)
    echo = start_program("echo_client", port, "--qos", str(qos))
    try:
        time.sleep(1.0)
        proc = fleet(port, devices, seconds, tmp, 1.0, "--qos", str(qos))
        time.sleep(kill_at)  # the fleet up and pinging
        killed_at = time.time()
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(5)
        broker = start_broker(kind, tmp, port)
        events = events_of(proc, 120, tmp)
        return {"summary": events[-1], "losses": losses(events, killed_at)}
    finally:
        echo.terminate()
        echo.wait(10)
        broker.stop()


def run(devices: int = 1000, seconds: float = 20.0, wide: int = 10_000,
        wide_seconds: float = 30.0) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every fleet measurement, ours then mosquitto: steady, killed, and ``wide`` devices."""
    results: dict[str, dict[str, Any]] = {}
    with workspace() as tmp:
        for kind in ("ours", "mosquitto"):
            results[kind] = {
                "steady": steady(kind, devices, seconds, tmp),
                "killed": killed(kind, devices, tmp),
                "killed_qos1": killed(kind, devices, tmp, qos=1, seconds=18.0, kill_at=8.0),
                # 1 ping/s among them all: each device every `wide` seconds.
                "wide": steady(kind, wide, wide_seconds, tmp, interval=float(wide)),
            }  # fmt: skip
    return results


def rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Table rows: metric, ours, mosquitto, ours / mosquitto (empty where it is no ratio)."""
    o, t = results["ours"], results["mosquitto"]
    out: list[tuple[str, str, str, str]] = []
    so, st = o["steady"]["summary"], t["steady"]["summary"]
    n = so["devices"]
    bo, bt = bound(o["steady"]), bound(t["steady"])
    for p in ("p50", "p99"):
        a, b = so["rtt_ms"][p], st["rtt_ms"][p]
        out.append((f"fleet, {n:,} devices at 1 ping/s each, RTT {p}",
                    f"{a:.2f} ms" + (f" ({bo})" if bo else ""),
                    f"{b:.2f} ms" + (f" ({bt})" if bt else ""), f"{a / b:.2f}x"))  # fmt: skip
    out.append((f"fleet, {n:,} devices: pings sent / lost", f"{so['sent']} / {so['lost']}",
                f"{st['sent']} / {st['lost']}", ""))  # fmt: skip
    for key, label in (("broker_cpu_s", "broker CPU"), ("fleet_cpu_s", "the fleet's own CPU")):
        a, b = o["steady"][key], t["steady"][key]
        out.append((f"fleet, {n:,} devices: {label} in {so['elapsed_s']:.0f} s", f"{a:.1f} s",
                    f"{b:.1f} s", f"{a / b:.2f}x" if b else ""))  # fmt: skip

    def back(r: dict[str, Any]) -> float | None:
        found = r["killed"]["summary"]["fleet_back_s"]
        return float(found[0]["after_first_back"]) if found else None

    a, b = back(o), back(t)
    out.append((f"fleet, {n:,} devices: back after a broker SIGKILL",
                "never" if a is None else f"{a:.3f} s", "never" if b is None else f"{b:.3f} s",
                f"{a / b:.2f}x" if a and b else ""))  # fmt: skip
    for key, qos in (("killed", 0), ("killed_qos1", 1)):
        ko, kt = o[key]["summary"], t[key]["summary"]
        out.append((f"fleet, {n:,} devices at QoS {qos}: pings lost / not sent around the SIGKILL",
                    f"{ko['lost']} / {ko['not_sent']}", f"{kt['lost']} / {kt['not_sent']}",
                    ""))  # fmt: skip
        lo, lt = o[key]["losses"], t[key]["losses"]
        out.append((f"fleet, {n:,} devices at QoS {qos}: of those lost, sent "
                    + " / ".join(LOSS_KINDS), " / ".join(str(lo[k]) for k in LOSS_KINDS),
                    " / ".join(str(lt[k]) for k in LOSS_KINDS), ""))  # fmt: skip
    wo, wt = o["wide"]["summary"], t["wide"]["summary"]
    m = wo["devices"]
    out.append((f"fleet, {m:,} devices, 1 ping/s among them: up / sent / lost",
                f"{wo['devices_ever_up']} / {wo['sent']} / {wo['lost']}",
                f"{wt['devices_ever_up']} / {wt['sent']} / {wt['lost']}", ""))  # fmt: skip
    a, b = wo["connect_ms"]["p99"], wt["connect_ms"]["p99"]
    out.append((f"fleet, {m:,} devices: connect p99 (all at once)", f"{a:.0f} ms", f"{b:.0f} ms",
                f"{a / b:.2f}x"))  # fmt: skip
    a, b = o["wide"]["broker_rss_mb"], t["wide"]["broker_rss_mb"]
    out.append((f"fleet, {m:,} devices: broker RSS", f"{a:.0f} MiB", f"{b:.0f} MiB",
                f"{a / b:.2f}x"))  # fmt: skip
    return out


def main() -> None:
    """Measure both brokers, print the table, write bench/fleet.json."""
    parser = argparse.ArgumentParser(prog="bench.fleet", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--wide", type=int, default=10_000,
                        help="devices of the run with 1 ping/s among them all")  # fmt: skip
    args = parser.parse_args()
    results = run(args.devices, args.seconds, args.wide)
    sys.stdout.write("| metric | ours | mosquitto | ours / mosquitto |\n|---|---|---|---|\n")
    for row in rows(results):
        sys.stdout.write("| " + " | ".join(row) + " |\n")
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    sys.stderr.write(f"written to {OUT}\n")


if __name__ == "__main__":
    main()
