"""Isolation under abuse, ours beside mosquitto: one client's misbehaviour must not hurt another.

    python -m bench.isolation       # about a minute; `make soak` runs it too

Three scenarios, each against a fresh broker of each kind, on 127.0.0.1:

- **stuck subscriber**: a QoS 1 subscriber to ``t/#`` that never reads and never acknowledges;
  a publisher sends 70,000 QoS 1 messages and reads its PUBACKs. Is the publisher kept, and how
  much does the broker grow?
- **offline flood**: a persistent session subscribes ``t/#`` at QoS 1 and goes away; 200,000
  QoS 1 messages of 100 B follow. How much does the broker grow, and how many are kept (the
  session reconnects and counts what it gets)?
- **password storm**: 8 threads send CONNECTs with a wrong password for 5 s while an
  authenticated client times QoS 0 round trips to itself.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import Broker, _packet, _string, percentile, start_broker, workspace

RESULTS = Path(__file__).with_name("isolation.json")
KINDS = ("ours", "mosquitto")
USER = ("alice", "wonderland")


def connect(
    port: int, client_id: str, *, clean: bool = True, user: tuple[str, str] | None = None,
    rcvbuf: int | None = None,
) -> tuple[socket.socket, int]:  # fmt: skip
    """Open a connection, CONNECT; return the socket and the CONNACK code (-1: closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    flags = 0x02 if clean else 0
    payload = _string(client_id)
    if user is not None:
        flags |= 0xC0
        payload += _string(user[0]) + _string(user[1])
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + payload
    sock.sendall(_packet(1, 0, body))
    try:
        _, connack = read_packet(sock)
    except (OSError, EOFError):
        return sock, -1
    return sock, connack[1]


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """Read one packet: its first byte and its body; EOFError when the peer closed."""
    head = _exactly(sock, 2)
    length, shift, byte = head[1] & 0x7F, 7, head[1]
    while byte & 0x80:
        byte = _exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
    return head[0], _exactly(sock, length)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def subscribe(sock: socket.socket, topic_filter: str, qos: int) -> None:
    """SUBSCRIBE and wait for the SUBACK."""
    sock.sendall(_packet(8, 2, b"\x00\x01" + _string(topic_filter) + bytes([qos])))
    while read_packet(sock)[0] >> 4 != 9:
        pass


def publish_qos1(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH."""
    return _packet(3, 2, _string(topic) + struct.pack("!H", packet_id) + payload)


def publish_and_count_acks(port: int, client_id: str, count: int) -> tuple[int, bool]:
    """Send ``count`` QoS 1 messages of 100 B, reading PUBACKs; (acks, still connected)."""
    pub, code = connect(port, client_id)
    if code != 0:
        return 0, False
    acks = 0
    closed = False

    def reader() -> None:
        nonlocal acks, closed
        try:
            while acks < count:
                if read_packet(pub)[0] >> 4 == 4:
                    acks += 1
        except (OSError, EOFError):
            closed = True

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    payload = bytes(100)
    try:
        for start in range(0, count, 1000):
            pub.sendall(b"".join(publish_qos1("t/x", payload, i % 65535 + 1)
                                 for i in range(start, min(count, start + 1000))))  # fmt: skip
    except OSError:
        closed = True
    thread.join(60)
    kept = not closed
    if kept:
        try:
            pub.sendall(b"\xc0\x00")  # PINGREQ: is it still served?
            kept = read_packet(pub)[0] >> 4 == 13
        except (OSError, EOFError):
            kept = False
    pub.close()
    return acks, kept


def stuck_subscriber(broker: Broker, count: int = 70_000) -> dict[str, Any]:
    """A subscriber that never reads; a publisher of ``count`` QoS 1 messages."""
    sub, _ = connect(broker.port, "stuck-sub", rcvbuf=4096)
    subscribe(sub, "t/#", 1)
    before = broker.rss_mb()
    acks, kept = publish_and_count_acks(broker.port, "probe-pub", count)
    after = broker.rss_mb()
    sub.close()
    return {"sent": count, "acked": acks, "publisher_kept": kept, "rss_growth_mb": after - before}


def offline_flood(broker: Broker, count: int = 200_000) -> dict[str, Any]:
    """A persistent session offline while ``count`` QoS 1 messages arrive for it."""
    sub, _ = connect(broker.port, "offline-sub", clean=False)
    subscribe(sub, "t/#", 1)
    sub.sendall(b"\xe0\x00")  # DISCONNECT
    sub.close()
    before = broker.rss_mb()
    acks, _ = publish_and_count_acks(broker.port, "flood-pub", count)
    after = broker.rss_mb()
    back, _ = connect(broker.port, "offline-sub", clean=False)
    back.settimeout(2)
    received = 0
    try:
        while True:
            first, body = read_packet(back)
            if first >> 4 == 3:
                received += 1
                size = struct.unpack_from("!H", body)[0]
                packet_id = body[2 + size : 4 + size]
                back.sendall(b"\x40\x02" + packet_id)  # PUBACK
    except (TimeoutError, OSError, EOFError):
        pass
    back.close()
    return {"sent": acks, "kept": received, "dropped": acks - received,
            "rss_growth_mb": after - before}  # fmt: skip


def password_storm(broker: Broker, seconds: float = 5.0, threads: int = 8) -> dict[str, Any]:
    """Wrong-password CONNECTs from ``threads`` threads; another client's round trips meanwhile."""
    me, code = connect(broker.port, "storm-self", user=USER)
    if code != 0:
        raise RuntimeError(f"{broker.kind}: the authenticated client was refused ({code})")
    subscribe(me, "storm/self", 0)
    message = _packet(3, 0, _string("storm/self") + b"x")

    def round_trips(until: float) -> list[float]:
        times = []
        while time.perf_counter() < until:
            start = time.perf_counter()
            me.sendall(message)
            while read_packet(me)[0] >> 4 != 3:
                pass
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.002)
        return times

    quiet = round_trips(time.perf_counter() + 1.0)
    stop = time.perf_counter() + seconds
    refused = [0] * threads

    def storm(index: int) -> None:
        while time.perf_counter() < stop:
            try:
                sock, code = connect(broker.port, f"storm-{index}", user=(USER[0], "wrong"))
                sock.close()
            except OSError:
                continue
            if code != 0:
                refused[index] += 1

    workers = [threading.Thread(target=storm, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    during = round_trips(stop)
    for worker in workers:
        worker.join(60)
    me.close()
    return {
        "quiet_p50_ms": percentile(quiet, 50), "quiet_p99_ms": percentile(quiet, 99),
        "storm_p50_ms": percentile(during, 50), "storm_p99_ms": percentile(during, 99),
        "refused_logins": sum(refused),
    }  # fmt: skip


def run() -> dict[str, Any]:
    """Run the three scenarios against each kind of broker."""
    results: dict[str, Any] = {kind: {} for kind in KINDS}
    with workspace() as tmp:
        for kind in KINDS:
            for name, scenario in (("stuck", stuck_subscriber), ("offline", offline_flood)):
                sys.stderr.write(f"{name}: {kind}\n")
                broker = start_broker(kind, tmp)
                try:
                    results[kind][name] = scenario(broker)
                    results[kind][name]["broker_alive"] = broker.proc.poll() is None
                finally:
                    broker.stop()
            sys.stderr.write(f"password storm: {kind}\n")
            broker = start_broker(kind, tmp, passwords=USER)
            try:
                results[kind]["storm"] = password_storm(broker)
            finally:
                broker.stop()
    return results


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The Reliability table's rows for these scenarios, ours beside mosquitto."""
    out = []
    s = {kind: r[kind]["stuck"] for kind in KINDS}
    out.append((
        "Stuck QoS 1 subscriber; a publisher sends 70,000 QoS 1",
        "; ".join(f"{kind}: publisher {'kept' if s[kind]['publisher_kept'] else 'CLOSED'}, "
                  f"{s[kind]['acked']} acked, broker RSS {s[kind]['rss_growth_mb']:+.1f} MiB"
                  for kind in KINDS),
    ))  # fmt: skip
    o = {kind: r[kind]["offline"] for kind in KINDS}
    out.append((
        "Offline persistent session; 200,000 QoS 1 of 100 B arrive",
        "; ".join(f"{kind}: {o[kind]['kept']} kept, {o[kind]['dropped']} dropped, broker RSS "
                  f"{o[kind]['rss_growth_mb']:+.1f} MiB" for kind in KINDS),
    ))  # fmt: skip
    p = {kind: r[kind]["storm"] for kind in KINDS}
    out.append((
        "8 threads of wrong-password CONNECTs for 5 s",
        "; ".join(f"{kind}: another client's QoS 0 round trip p50 {p[kind]['storm_p50_ms']:.2f} ms,"
                  f" p99 {p[kind]['storm_p99_ms']:.2f} ms (quiet p99 "
                  f"{p[kind]['quiet_p99_ms']:.2f} ms), {p[kind]['refused_logins']} refused"
                  for kind in KINDS),
    ))  # fmt: skip
    return out


def main() -> None:
    """Run and print the rows."""
    results = run()
    results["date"] = time.strftime("%Y-%m-%d")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for a, b in rows(results):
        sys.stdout.write(f"| {a} | {b} |\n")


if __name__ == "__main__":
    main()
