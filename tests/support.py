"""Helpers for tests that run the real programs as processes over real sockets.

Nothing here sleeps for a fixed time: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent

BROKER_FAULT = re.compile(r"internal error|panicked at|PanicException|Traceback \(most recent")
"""What a broker must never print: an internal error (a bug that ended a connection), a Rust
panic from the MQTT 5 codec, or a traceback."""


def broker_faults(text: str) -> list[str]:
    """Return the lines of a broker's output that show a bug (see :data:`BROKER_FAULT`)."""
    return [line for line in text.splitlines() if BROKER_FAULT.search(line)]


def check_broker_output(where: str, text: str) -> None:
    """Fail if a broker's output shows a bug: an internal error is never a way for a connection
    to end, so no test may pass while its broker logged one."""
    faults = broker_faults(text)
    if faults:
        shown = "\n  ".join(faults[:5])
        raise AssertionError(f"{where} logged {len(faults)} internal error(s):\n  {shown}")


PYTHON = sys.executable
ECHO_READY = r"Subscribed to /ping, /ping/\+\."
"""The echo_client's line once SUBACK granted the ping topic and the devices' topics under it."""
BIN = Path(PYTHON).parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing uses right now, for one test alone.

    Not from the ephemeral range: there, any outgoing connection (thousands, in these tests)
    may take the port between the check and the broker's bind. Each xdist worker draws from
    its own slice, so parallel tests never pick the same port; and a port is handed out once
    per worker, so that one test's two ports (``port`` and ``ws_port``, say) never coincide, as
    two random draws once did (CI on 3.13: "two listeners on one port: 10411, 10411").
    """
    low, high = 10000, _ephemeral_low()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    span = (high - low) // 8
    start = low + (index % 8) * span
    for _ in range(200):
        port = random.randrange(start, start + span)  # noqa: S311 - not a secret
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port found")


_HANDED_OUT: set[int] = set()
"""The ports :func:`free_port` has returned in this process."""


def tool(name: str) -> str:
    """Return the path of a mosquitto command-line tool, or fail with how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install mosquitto-clients (.ci/run does)")
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def supervisord_pid(pidfile: Path, timeout: float = 10) -> int:
    """supervisord's pid, once its pidfile holds a whole line.

    supervisord creates the file and writes it after: read too soon, it is empty (``int('')``
    failed a CI run).
    """

    def whole() -> str:
        try:
            text = pidfile.read_text()
        except FileNotFoundError:
            return ""
        return text if text.endswith("\n") else ""

    return int(wait_until(whole, timeout, f"a pid in {pidfile}"))


def port_accepts(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def reference_broker(port: int, directory: Path, settings: str = "") -> Iterator[int]:
    """mosquitto on 127.0.0.1:``port``, anonymous, with ``settings`` (lines of its
    configuration) added; its configuration is written in ``directory``. Yields the port."""
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{settings}")
    broker = subprocess.Popen([path, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: port_accepts(port), 10, "mosquitto to listen")
        yield port
    finally:
        broker.terminate()
        broker.wait(10)


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a child program: ours, unbuffered, minus any MQTT_* leftovers.

    Also minus make's own variables: under `make test-pythons`, MAKEFLAGS carries VENV and PYTHON
    to every make a test starts, which would then use another venv than the one under test.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MQTT_") and k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    """A real child process whose stdout and stderr go to files we can read while it runs."""

    name: str
    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    module: str = ""

    def out(self) -> str:
        """Everything the process wrote on stdout so far."""
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        """Everything the process wrote on stderr so far."""
        return self.err_path.read_text(errors="replace")

    def wait_for(
        self, pattern: str, timeout: float = 10.0, *, stream: str = "err"
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the process's output."""
        read = self.err if stream == "err" else self.out

        def found() -> re.Match[str] | None:
            match = re.search(pattern, read())
            if match is None and self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{pattern!r}:\n{self.err()}"
                )
            return match

        return wait_until(found, timeout, f"{pattern!r} from {self.name}")  # type: ignore[no-any-return]

    def count(self, pattern: str, stream: str = "err") -> int:
        """How many times ``pattern`` occurs in the output so far."""
        return len(re.findall(pattern, self.err() if stream == "err" else self.out()))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; fail if it has not within ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s") from None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process and return its exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


@dataclass
class Spawner:
    """Starts programs for one test and kills whatever is left when the test ends."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        interpreter_args: Sequence[str] = (),
        open_files: int | None = None,
    ) -> Proc:
        """Start ``python [interpreter_args] -m module args...``.

        ``open_files`` sets the process's open-file limit, soft and hard (as ``prlimit``).
        """
        limit = None
        if open_files is not None:
            limit = functools.partial(
                resource.setrlimit, resource.RLIMIT_NOFILE, (open_files, open_files)
            )
        label = name or f"{module}-{len(self.procs)}"
        out_path = self.tmp / f"{label}.out"
        err_path = self.tmp / f"{label}.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            popen = subprocess.Popen(
                [PYTHON, *interpreter_args, "-m", module, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else base_env(),
                cwd=cwd or REPO,
                preexec_fn=limit,  # noqa: PLW1509 - one setrlimit, no lock taken
            )
        proc = Proc(label, popen, out_path, err_path, module)
        self.procs.append(proc)
        return proc

    def broker(self, port: int, *args: str, **kwargs: Any) -> Proc:
        """Start the broker on ``port`` and wait until it listens."""
        proc = self.start("broker", "--port", str(port), *args, **kwargs)
        proc.wait_for(r"Listening on 127\.0\.0\.1:\d+")
        return proc

    def run(
        self, module: str, *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m module args...`` to completion and capture its output."""
        return subprocess.run(
            [PYTHON, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env if env is not None else base_env(),
            cwd=REPO,
            check=False,
        )

    def cleanup(self) -> None:
        """Kill every process this spawner started; fail if a broker among them logged a bug."""
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            if proc.module == "broker":
                check_broker_output(f"broker {proc.name}", proc.err() + proc.out())


class MqttProbe:
    """A paho MQTT 3.1.1 client run in its own thread: an independent peer for the tests."""

    def __init__(self, port: int, client_id: str = "", *, clean_session: bool = True) -> None:
        """Connect to 127.0.0.1:port and wait for CONNACK."""
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, "paho CONNACK")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """Subscribe and wait for the SUBACK."""
        done: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_a: done.put(True)
        self.client.subscribe(topic, qos)
        done.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish and wait until paho has sent it (and, for QoS > 0, it is acknowledged)."""
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(timeout=5)

    def expect(self, timeout: float = 5.0) -> tuple[str, bytes]:
        """Return the next message, failing after ``timeout`` seconds."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def drain(self) -> list[tuple[str, bytes]]:
        """Return and forget every message received so far."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def on_free_ports(conf: str, ws_port: int | None = None) -> str:
    """Return a supervisord.conf's text with the WebSocket port (10080) on a free port."""
    fixed = "${MQTT_WS_PORT:-10080}"
    assert fixed in conf, "supervisord.conf no longer sets the broker's WebSocket port"
    return conf.replace(fixed, f"${{MQTT_WS_PORT:-{ws_port or free_port()}}}")


def supervisor_conf(
    tmp: Path, port: int, extra_env: Sequence[str] = (), ws_port: int | None = None
) -> Path:
    """Copy the repository's supervisord.conf into ``tmp``: same programs, these ports, tmp logs.

    Only paths, ports and the environment change; every other setting is the one users run.
    """
    text = on_free_ports((REPO / "supervisord.conf").read_text(), ws_port)
    (tmp / "logs").mkdir(exist_ok=True)
    (tmp / "run").mkdir(exist_ok=True)
    text = text.replace("%(here)s/.venv/bin/python", PYTHON)
    text = text.replace("directory=%(here)s", f"directory={REPO}")
    text = text.replace("%(here)s", str(tmp))
    env = ",".join([f'MQTT_PORT="{port}"', *extra_env])
    text = text.replace(
        'environment=PYTHONUNBUFFERED="1"', f'environment=PYTHONUNBUFFERED="1",{env}'
    )
    conf = tmp / "supervisord.conf"
    conf.write_text(text)
    return conf


@contextlib.contextmanager
def supervised(
    tmp: Path, port: int, extra_env: Sequence[str] = (), ws_port: int | None = None
) -> Iterator[Path]:
    """Run real supervisord on a copy of our config; shut it down and check nothing is left."""
    conf = supervisor_conf(tmp, port, extra_env, ws_port)
    subprocess.run([str(BIN / "supervisord"), "-c", str(conf)], check=True, timeout=30)
    pid = supervisord_pid(tmp / "run" / "supervisord.pid")
    try:
        yield conf
    finally:
        children = supervisor_children(pid)
        subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        wait_until(lambda: not pid_alive(pid), 20, "supervisord to exit")
        wait_until(lambda: not any(pid_alive(p) for p in children), 10, "its programs to exit")


def supervisorctl(conf: Path, *args: str) -> str:
    """Run supervisorctl against ``conf`` and return its output."""
    result = subprocess.run(
        [str(BIN / "supervisorctl"), "-c", str(conf), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout + result.stderr


def pid_alive(pid: int) -> bool:
    """Return whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def supervisor_children(pid: int) -> list[int]:
    """Return every descendant of ``pid``."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        path = Path(f"/proc/{parent}/task/{parent}/children")
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone, or reaped
            kids = [int(x) for x in path.read_text().split()]
            found.extend(kids)
            frontier.extend(kids)
    return found


def program_log(tmp: Path, name: str) -> str:
    """The current text of one program's log file under ``tmp/logs``."""
    path = tmp / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def logged_pongs(tmp: Path) -> int:
    """Echoes the ping client has logged so far in ``tmp/logs/ping_client.log``."""
    return len(re.findall(r"client: Got b'[\d.]+' on /pong", program_log(tmp, "ping_client")))


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


def fleet_through_a_broker_kill(
    spawn: Spawner, port: int, devices: int, *args: str
) -> tuple[Proc, re.Match[str]]:
    """A fleet up through our echo_client, its broker SIGKILLed and started again on its port.

    Return the fleet (``ping_client --devices N --json *args``, still running) and its line
    ``Fleet back: …``, whose group 1 is the seconds from the first device back to the last.
    """
    broker = spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(ECHO_READY)
    fleet = spawn.start("ping_client", "--port", str(port), "--devices", str(devices), "--json",
                        *args, name="fleet")  # fmt: skip
    fleet.wait_for(rf"All {devices} devices up after", 15)
    broker.kill()
    fleet.wait_for(r"Device \d+ lost its link", 5)
    spawn.broker(port)
    back = fleet.wait_for(rf"Fleet back: all {devices} devices up again [\d.]+ s after the first "
                          r"lost its link, ([\d.]+) s after the first came back\.", 15)  # fmt: skip
    return fleet, back
