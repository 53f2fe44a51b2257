"""Scale, ours beside mosquitto: memory per connection, connect rate, cost under rate, fan-out.

    python -m bench.scale            # about two minutes; `make bench` runs the quick rows

Every client here is a raw socket or a small asyncio client with many connections per process,
so that the client side is not what is measured; where it was the limit, the row says so.
"""

from __future__ import annotations

import resource
import socket
import struct
import time
from typing import Any

from bench import isolation
from bench.harness import Broker, _packet, _string, start_broker, workspace

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


def devices(broker: Broker, count: int) -> dict[str, Any]:
    """Connect ``count`` devices one after another; memory per connection and connects/s."""
    raise_open_files(count + 100)
    before = broker.rss_mb()
    started = time.perf_counter()
    sockets = [connect_and_subscribe(broker.port, i) for i in range(count)]
    elapsed = time.perf_counter() - started
    time.sleep(0.5)  # let the broker settle (its RSS is read once more below)
    after = broker.rss_mb()
    for sock in sockets:
        sock.close()
    return {"count": count, "seconds": elapsed, "per_s": count / elapsed,
            "kib_each": (after - before) * 1024 / count, "rss_before_mb": before,
            "rss_after_mb": after}  # fmt: skip


def run_devices(count: int) -> dict[str, dict[str, Any]]:
    """The devices row for each broker kind."""
    out: dict[str, dict[str, Any]] = {}
    with workspace() as tmp:
        for kind in KINDS:
            broker = start_broker(kind, tmp)
            try:
                out[kind] = devices(broker, count)
            finally:
                broker.stop()
    return out


if __name__ == "__main__":
    import json
    import sys

    result = run_devices(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
