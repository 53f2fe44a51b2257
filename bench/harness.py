"""What the benchmark and the soak share: brokers as processes, clients, and measurements.

Everything runs on 127.0.0.1, on free ports, as real processes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.protocol import remaining_length

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
QUIET = {"MQTT_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}

BARE_AMQTT = """
import asyncio, sys, logging
from amqtt.broker import Broker
logging.basicConfig(level=logging.CRITICAL)
async def main(port):
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                 {"allow_anonymous": True}}})
    await broker.start()
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[1])))
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    """The environment for our programs: quiet logs, no stray MQTT_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    return {**base, **QUIET, **extra}


def mosquitto_path() -> str:
    """The mosquitto binary, or exit with how to install it."""
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if path is None:
        sys.stderr.write(
            "mosquitto is not installed: apt-get install mosquitto (it is the reference broker "
            "every figure is compared with)\n"
        )
        sys.exit(69)
    return path


def connack_within(port: int, timeout: float, version: int = 4) -> bool:
    """Try once to CONNECT (protocol level ``version``); True when a CONNACK comes back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(connect_packet("", version, keepalive=60))
            return s.recv(4)[:1] == b"\x20"
    except OSError:
        return False


@dataclass
class Broker:
    """A broker process under test."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    startup: float
    """Seconds from process start to the first CONNACK."""
    idle_rss: float = 0.0

    def rss_mb(self) -> float:
        """Resident memory in MiB."""
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


MQTT_VERSION = {"mqttools": 5}
"""The protocol level each broker kind is spoken to in (4, MQTT 3.1.1, unless listed)."""


def mqttools_available() -> bool:
    """Whether the mqttools broker (pip install mqttools; in the dev extra) can be started."""
    return importlib.util.find_spec("mqttools") is not None


def broker_command(
    kind: str, port: int, workdir: Path, passwords: tuple[str, str] | None = None
) -> list[str]:
    """The command that starts a broker of ``kind`` on ``port``; ``passwords``: one user."""
    if kind == "ours":
        command = [PYTHON, "-m", "broker", "--port", str(port)]
        if passwords is not None:
            from broker.users import add_user  # noqa: PLC0415 - only for this case

            path = workdir / f"passwords-{port}.txt"
            add_user(path, *passwords)
            command += ["--password-file", str(path)]
        return command
    if kind == "mqttools":  # the other asyncio broker the tracker compares with; MQTT 5 only
        return [PYTHON, "-m", "mqttools", "broker", "--host", "127.0.0.1", "--port", str(port)]
    if kind == "amqtt":
        script = workdir / "bare_amqtt.py"
        script.write_text(BARE_AMQTT)
        return [PYTHON, str(script), str(port)]
    conf = workdir / f"mosquitto-{port}.conf"
    # TCP_NODELAY on, as ours has: a fair comparison of the brokers, not of Nagle.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
    if passwords is not None:
        path = workdir / f"mosquitto-passwords-{port}.txt"
        subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b",
                        "-c", str(path), *passwords], check=True, capture_output=True)  # fmt: skip
        # Run as root, mosquitto reads the file after dropping to its own user.
        workdir.chmod(0o755)
        path.chmod(0o644)
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                        f"set_tcp_nodelay true\npassword_file {path}\n")  # fmt: skip
    return [mosquitto_path(), "-c", str(conf)]


def start_broker(
    kind: str, workdir: Path, port: int | None = None, passwords: tuple[str, str] | None = None
) -> Broker:
    """Start a broker and wait for its first CONNACK (a refusal counts), timing it."""
    port = port or free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        broker_command(kind, port, workdir, passwords), env=env(), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = started + 20
    while not connack_within(port, 1, MQTT_VERSION.get(kind, 4)):
        if proc.poll() is not None or time.perf_counter() > deadline:
            raise RuntimeError(f"{kind} broker did not start on port {port}")
        time.sleep(0.002)
    return Broker(kind, port, proc, time.perf_counter() - started)


@contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory for config files."""
    with tempfile.TemporaryDirectory(prefix="pingpong-bench-") as tmp:
        yield Path(tmp)


def start_program(module: str, port: int, *args: str) -> subprocess.Popen[bytes]:
    """Start one of our programs against ``port``."""
    return subprocess.Popen(
        [PYTHON, "-m", module, "--port", str(port), *args], env=env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def ping(port: int, count: int, interval: float, *extra: str) -> dict[str, Any]:
    """Run our ping client with --json and return its summary."""
    result = subprocess.run(
        [PYTHON, "-m", "ping_client", "--port", str(port), "--count", str(count),
         "--interval", str(interval), "--json", "--stats-interval", "0", *extra],
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines or lines[-1]["event"] != "summary":
        raise RuntimeError(f"ping_client failed: {result.stderr[-500:]}")
    # Every answered ping's RTT, in ms, for the pictures.
    return {**lines[-1], "rtts": [e["rtt_ms"] for e in lines if e["event"] == "pong"]}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def wait_connected(port: int, timeout: float = 10) -> None:
    """Wait until the broker answers CONNECT."""
    deadline = time.monotonic() + timeout
    while not connack_within(port, 1):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no broker on {port}")
        time.sleep(0.01)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


# --- a lean asyncio MQTT client for load: QoS 0 publish/subscribe, nothing else ---------------


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def connect_packet(client_id: str, version: int, *, keepalive: int) -> bytes:
    """A clean-session CONNECT at protocol level ``version`` (4 or 5, no properties)."""
    properties = b"\x00" if version == 5 else b""
    body = _string("MQTT") + bytes([version, 2]) + struct.pack("!H", keepalive) + properties
    return _packet(1, 0, body + _string(client_id))


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


class LeanClient:
    """The least Python an MQTT client can be, so that it is not the bottleneck.

    It speaks MQTT 3.1.1, or MQTT 5 (empty properties) to a broker that knows nothing else.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int = 4
    ) -> None:
        """Wrap an open connection."""
        self.reader, self.writer = reader, writer
        self.properties = b"\x00" if version == 5 else b""
        """What goes where MQTT 5 has a property length: no properties."""

    @classmethod
    async def connect(cls, port: int, client_id: str, version: int = 4) -> LeanClient:
        """Open a connection and complete CONNECT/CONNACK."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer, version)
        writer.write(connect_packet(client_id, version, keepalive=0))
        await client.read_packet()  # CONNACK
        return client

    async def read_packet(self) -> tuple[int, bytes]:
        """Read one packet; return its first byte and its body."""
        head = await self.reader.readexactly(2)
        length, shift, byte = head[1] & 0x7F, 7, head[1]
        while byte & 0x80:
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
        return head[0], await self.reader.readexactly(length)

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        """Subscribe and wait for SUBACK."""
        self.writer.write(
            _packet(8, 2, b"\x00\x01" + self.properties + _string(topic) + bytes([qos]))
        )
        while (await self.read_packet())[0] >> 4 != 9:
            pass

    def publish_packet(self, topic: str, payload: bytes) -> bytes:
        """A QoS 0 PUBLISH."""
        return _packet(3, 0, _string(topic) + self.properties + payload)

    async def read_publish(self) -> bytes:
        """Read one QoS 0 PUBLISH; return its payload."""
        _, body = await self.read_packet()
        (size,) = struct.unpack_from("!H", body)
        offset = 2 + size
        if self.properties:  # MQTT 5: skip the properties (a variable byte integer, then them)
            length, shift = 0, 0
            while True:
                byte = body[offset]
                offset += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            offset += length
        return body[offset:]

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()


async def lean_echo(
    port: int, ping: str, pong: str, ready: asyncio.Event, version: int = 4
) -> None:
    """Echo ping to pong with the lean client (the 'not the bottleneck' echo)."""
    client = await LeanClient.connect(port, f"lean-echo-{port}", version)
    await client.subscribe(ping)
    ready.set()
    try:
        while True:
            payload = await client.read_publish()
            client.writer.write(client.publish_packet(pong, payload))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        client.close()


async def windowed(
    port: int, window: int, seconds: float, ping: str, pong: str, *, version: int = 4
) -> dict[str, Any]:
    """Keep ``window`` pings in flight for ``seconds``; return round trips/s and RTTs."""
    client = await LeanClient.connect(port, f"lean-ping-{port}-{window}", version)
    await client.subscribe(pong)
    sent: dict[bytes, float] = {}
    rtts: list[float] = []
    seq = 0

    def send_one() -> None:
        nonlocal seq
        seq += 1
        payload = str(seq).encode()
        sent[payload] = time.perf_counter()
        client.writer.write(client.publish_packet(ping, payload))

    for _ in range(window):
        send_one()
    start = time.perf_counter()
    end = start + seconds
    lost = 0
    try:
        while time.perf_counter() < end:
            try:
                payload = await asyncio.wait_for(client.read_publish(), 1)
            except TimeoutError:
                # QoS 0 may lose a message (an echo not yet subscribed): refill the window.
                lost += len(sent)
                sent.clear()
                for _ in range(window):
                    send_one()
                continue
            began = sent.pop(payload, None)
            if began is not None:
                rtts.append(time.perf_counter() - began)
                send_one()
    finally:
        client.close()
    elapsed = time.perf_counter() - start
    return {
        "window": window,
        "lost": lost,
        "round_trips_per_s": len(rtts) / elapsed,
        "p50_ms": percentile(rtts, 50) * 1000 if rtts else float("nan"),
        "p99_ms": percentile(rtts, 99) * 1000 if rtts else float("nan"),
    }


async def echo_ready(
    port: int, ping: str = "/ping", pong: str = "/pong", within: float = 15, version: int = 4
) -> None:
    """Wait until an echo client answers on ``port`` (it subscribes some time after starting)."""
    client = await LeanClient.connect(port, f"ready-{port}-{time.monotonic_ns()}", version)
    try:
        await client.subscribe(pong)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            client.writer.write(client.publish_packet(ping, b"ready"))
            try:
                await asyncio.wait_for(client.read_publish(), 0.2)
            except TimeoutError:
                continue
            return
        raise RuntimeError(f"no echo on port {port} within {within} s")
    finally:
        client.close()
