"""A fleet of devices through ours and through mosquitto, side by side in one run.

    python -m bench.fleet               # 1,000 devices, about two minutes
    python -m bench.fleet --devices 300 # smaller

For each broker, a fresh one with our echo_client: ``ping_client --devices N`` at 1 ping/s per
device for a while (RTT p50/p99, loss, connect times), then again with the broker SIGKILLed in
the middle and started again on the same port ("fleet back in": from the first device back to
every device back). The CPU seconds of the broker and of the fleet's process over each run say
which one bounds the figures. Prints a table; writes bench/fleet.json.
"""

from __future__ import annotations

import argparse
import json
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

OUT = REPO / "bench" / "fleet.json"


def fleet(port: int, devices: int, seconds: float, tmp: Path) -> subprocess.Popen[bytes]:
    """Start ``ping_client --devices`` for ``seconds`` (its --deadline), JSON to a file.

    Files, not pipes: a pipe nobody reads while the fleet runs fills up and stops it.
    """
    with (tmp / "fleet.out").open("wb") as out, (tmp / "fleet.err").open("wb") as err:
        return subprocess.Popen(
            [PYTHON, "-m", "ping_client", "--port", str(port), "--devices", str(devices),
             "--interval", "1", "--deadline", str(seconds), "--json", "--connect-timeout",
             "30"],
            env=env(), cwd=REPO, stdout=out, stderr=err,
        )  # fmt: skip


def summary_of(proc: subprocess.Popen[bytes], timeout: float, tmp: Path) -> dict[str, Any]:
    """Wait for the fleet to end; return its JSON summary."""
    proc.wait(timeout)
    out = (tmp / "fleet.out").read_text()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    if not lines or lines[-1]["event"] != "summary":
        err = (tmp / "fleet.err").read_text()
        raise RuntimeError(f"the fleet did not finish: {err[-500:]}")
    summary: dict[str, Any] = lines[-1]
    return summary


def _children_cpu() -> float:
    """CPU seconds of the children waited for so far (the fleet, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def steady(kind: str, devices: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """The fleet for ``seconds`` against a fresh broker of ``kind``."""
    broker = start_broker(kind, tmp)
    echo = start_program("echo_client", broker.port)
    try:
        time.sleep(1.0)  # the echo subscribed (it logs nothing on stdout to wait for)
        cpu = cpu_seconds(broker.proc.pid)
        children = _children_cpu()
        proc = fleet(broker.port, devices, seconds, tmp)
        summary = summary_of(proc, seconds + 60, tmp)
        return {"summary": summary, "broker_cpu_s": cpu_seconds(broker.proc.pid) - cpu,
                "fleet_cpu_s": _children_cpu() - children}  # fmt: skip
    finally:
        echo.terminate()
        echo.wait(10)
        broker.stop()


def killed(kind: str, devices: int, tmp: Path) -> dict[str, Any]:
    """The fleet up, the broker SIGKILLed and started again on its port: how fast all are back."""
    port = free_port()
    broker = start_broker(kind, tmp, port)
    echo = start_program("echo_client", port)
    try:
        time.sleep(1.0)
        proc = fleet(port, devices, 30.0, tmp)
        time.sleep(12.0)  # the fleet up and pinging
        os.kill(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(5)
        broker = start_broker(kind, tmp, port)
        summary = summary_of(proc, 120, tmp)
        return {"summary": summary}
    finally:
        echo.terminate()
        echo.wait(10)
        broker.stop()


def main() -> None:
    """Measure both brokers, print the table, write bench/fleet.json."""
    parser = argparse.ArgumentParser(prog="bench.fleet", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with workspace() as tmp:
        for kind in ("ours", "mosquitto"):
            results[kind] = {"steady": steady(kind, args.devices, args.seconds, tmp),
                             "killed": killed(kind, args.devices, tmp)}  # fmt: skip
    rows = ["| metric | ours | mosquitto |", "|---|---|---|"]

    def row(label: str, get: Any) -> None:  # noqa: ANN401
        rows.append(f"| {label} | {get(results['ours'])} | {get(results['mosquitto'])} |")

    def s(r: dict[str, Any]) -> dict[str, Any]:
        summary: dict[str, Any] = r["steady"]["summary"]
        return summary

    n = args.devices
    row(f"{n} devices at 1 ping/s, RTT p50", lambda r: f"{s(r)['rtt_ms']['p50']:.2f} ms")
    row(f"{n} devices at 1 ping/s, RTT p99", lambda r: f"{s(r)['rtt_ms']['p99']:.2f} ms")
    row("pings sent / lost", lambda r: f"{s(r)['sent']} / {s(r)['lost']}")
    row("connect p50 / p99 (all at once)",
        lambda r: f"{s(r)['connect_ms']['p50']:.0f} / "
                  f"{s(r)['connect_ms']['p99']:.0f} ms")  # fmt: skip
    row("broker CPU / the fleet's CPU over the run",
        lambda r: f"{r['steady']['broker_cpu_s']:.1f} s / {r['steady']['fleet_cpu_s']:.1f} s "
                  f"in {s(r)['elapsed_s']:.0f} s")  # fmt: skip

    def back(r: dict[str, Any]) -> str:
        found = r["killed"]["summary"]["fleet_back_s"]
        return f"{found[0]['after_first_back']:.3f} s" if found else "never"

    row("fleet back after a SIGKILL, from the first device back", back)
    row("pings lost around the SIGKILL", lambda r: str(r["killed"]["summary"]["lost"]))
    sys.stdout.write("\n".join(rows) + "\n")
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    sys.stderr.write(f"written to {OUT}\n")


if __name__ == "__main__":
    main()
