"""`make run` from a user's point of view: logs stream, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
from functools import partial
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    base_env,
    on_free_ports,
    pid_alive,
    port_accepts,
    supervisor_children,
    supervisord_pid,
    wait_until,
)


def checkout(tmp: Path) -> Path:
    """A copy of the repository's run machinery in ``tmp``, sharing this test run's venv."""
    root = tmp / "repo"
    root.mkdir()
    for name in ("supervisord.conf", "Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    conf = root / "supervisord.conf"
    conf.write_text(on_free_ports(conf.read_text()))
    shutil.copytree(REPO / "tools", root / "tools")
    # The page's files and this run's MQTT.js: make run finds them installed.
    shutil.copytree(REPO / "web", root / "web", ignore=shutil.ignore_patterns("node_modules"))
    (root / "web" / "node_modules").symlink_to(REPO / "web" / "node_modules")
    # The venv of the interpreter running the tests: .venv, or .venv-3.12 under make test-pythons.
    (root / ".venv").symlink_to(Path(sys.prefix))
    # The shared .venv is installed already: keep make from seeing pyproject.toml as newer.
    os.utime(root / "pyproject.toml", (0, 0))
    return root


def test_make_stop_and_status_say_when_nothing_runs(tmp_path: Path) -> None:
    """Not "unix:///.../run/sv.sock no such file" from supervisorctl, and not silence."""
    root = checkout(tmp_path)
    for target, said in (
        ("stop", "Not running.\n"),
        ("status", "Not running (make run starts it).\n"),
    ):
        make = ["make", "--no-print-directory", target]
        result = subprocess.run(make, cwd=root, env=base_env(), capture_output=True, text=True,
                                timeout=60, check=False)  # fmt: skip
        assert (result.returncode, result.stdout, result.stderr) == (0, said, ""), result


def test_make_run_streams_logs_and_ctrl_c_stops_everything(tmp_path: Path, port: int) -> None:
    run_and_interrupt(checkout(tmp_path), tmp_path, port)


@pytest.mark.timeout(240)
def test_ten_start_stop_cycles_leave_no_process_behind(tmp_path: Path, port: int) -> None:
    """Ctrl-C on make run and make stop, alternately, ten times in a row."""
    root = checkout(tmp_path)
    env = base_env(MQTT_PORT=str(port), MQTT_INTERVAL="0.2")
    try:
        for cycle in range(10):
            one_cycle(root, tmp_path, port, env, cycle)
    finally:
        # Whatever failed, leave no supervisord behind (make start daemonizes it).
        subprocess.run(["make", "--no-print-directory", "stop"], cwd=root, env=env,
                       capture_output=True, timeout=60, check=False)  # fmt: skip


def one_cycle(root: Path, tmp_path: Path, port: int, env: dict[str, str], cycle: int) -> None:
    """Start and stop once: Ctrl-C on make run for even cycles, make stop for odd ones."""
    if cycle % 2 == 0:
        run_and_interrupt(root, tmp_path, port, env)
        return
    ping_log = root / "logs" / "ping_client.log"
    seen = ping_log.read_text().count("client: Got b'") if ping_log.exists() else 0
    subprocess.run(["make", "--no-print-directory", "start"], cwd=root, env=env,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    wait_until(partial(more_pongs, ping_log, seen), 30, "a pong")
    family = supervisord_family(root)
    subprocess.run(["make", "--no-print-directory", "stop"], cwd=root, env=env,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    assert not any(pid_alive(p) for p in family), f"cycle {cycle}: processes left"
    assert not port_accepts(port), f"cycle {cycle}: port still open"


def more_pongs(ping_log: Path, seen: int) -> bool:
    """Whether the ping client has logged more than ``seen`` pongs."""
    return ping_log.read_text().count("client: Got b'") > seen


def terminal_signals() -> None:
    """Give the child Ctrl-C as a terminal does, whatever this process inherited.

    A test run started in the background of a non-interactive shell inherits SIGINT as
    ignored, and bash cannot trap a signal that was ignored when it started: `make run` would
    then never see the Ctrl-C this test sends.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def leave_nothing(group: subprocess.Popen[bytes], root: Path, env: dict[str, str] | None) -> None:
    """Whatever failed, end the run's process group and the supervisord it may have left.

    supervisord daemonizes into a session of its own, so killing the group does not reach it.
    """
    if group.poll() is None:
        os.killpg(group.pid, signal.SIGKILL)
    group.wait(5)
    subprocess.run(["make", "--no-print-directory", "stop"], cwd=root, env=env or base_env(),
                   capture_output=True, timeout=60, check=False)  # fmt: skip


def run_and_interrupt(
    root: Path, tmp_path: Path, port: int, env: dict[str, str] | None = None
) -> None:
    """make run, wait for a pong on the terminal, Ctrl-C, check that nothing is left."""
    out_path = tmp_path / "make.out"
    with out_path.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=root,
            env=env or base_env(MQTT_PORT=str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal gives it
            preexec_fn=terminal_signals,  # noqa: PLW1509 - a single-threaded reset before exec
        )
    try:
        wait_until(
            lambda: (
                "ping_client | " in out_path.read_text()
                and "client: Got b'" in out_path.read_text()
            ),
            30,
            "a pong streamed to the terminal",
        )
        text = out_path.read_text()
        assert "echo_client | " in text
        # The live page's address comes first (after make's own set-up lines: this checkout has
        # no sources to compile), on the port the configuration gives it.
        ws_port = re.search(r"MQTT_WS_PORT:-(\d+)", (root / "supervisord.conf").read_text())
        assert ws_port is not None
        own = [line for line in text.splitlines() if not line.startswith("Can't list")]
        assert own[0].startswith(f"Live page: http://127.0.0.1:{ws_port.group(1)}/"), own[:3]
        family = supervisord_family(root)
        assert len(family) >= 4
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C does
        make.wait(15)  # raises if make is still running after 15 s
        wait_until(lambda: not any(pid_alive(p) for p in family), 10, "every process to exit")
        assert not port_accepts(port)
        text = out_path.read_text()
        assert "Stopped." in text
        # Like ping(8) interrupted: the statistics on the terminal, after the programs stopped.
        after = text.split("Stopped.", 1)[1]
        assert re.search(r"--- 127\.0\.0\.1:\d+ ping statistics ---\n\d+ sent, \d+ received", after)
    finally:
        leave_nothing(make, root, env)


def controlling_terminal() -> None:
    """In the child: make the pty on stdin its controlling terminal, with Ctrl-C as usual."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    terminal_signals()


def supervisord_family(root: Path) -> list[int]:
    """supervisord and every process under it, once its pidfile is written."""
    pid = supervisord_pid(root / "run" / "supervisord.pid", 30)
    return [pid, *supervisor_children(pid)]


def assert_all_gone(family: list[int], port: int) -> None:
    """Every process of the run ends, and the port is free again."""
    wait_until(lambda: not any(pid_alive(p) for p in family), 20, "every process to exit")
    assert not port_accepts(port)


@pytest.mark.timeout(90)
def test_closing_the_terminal_stops_everything(tmp_path: Path, port: int) -> None:
    """make run on a real pty; the terminal hangs up (SIGHUP), as when its window is closed."""
    root = checkout(tmp_path)
    env = base_env(MQTT_PORT=str(port))
    master, slave = pty.openpty()
    seen = bytearray()
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run"], cwd=root, env=env,
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_terminal,  # noqa: PLW1509 - single-threaded set-up before exec
    )  # fmt: skip
    os.close(slave)
    family: list[int] = []
    try:

        def pong_on_screen() -> bool:
            if select.select([master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    seen.extend(os.read(master, 65536))
            return b"client: Got b'" in seen

        wait_until(pong_on_screen, 30, "a pong on the terminal")
        family = supervisord_family(root)
        assert len(family) >= 4
        os.close(master)  # the terminal goes away
        master = -1
        assert_all_gone([make.pid, *family], port)
    finally:
        if master >= 0:
            os.close(master)
        leave_nothing(make, root, env)


@pytest.mark.timeout(90)
def test_ctrl_c_through_tee_stops_everything(tmp_path: Path, port: int) -> None:
    """`make run | tee run.log`, then Ctrl-C: tee dies first, and the stop must still run."""
    root = checkout(tmp_path)
    env = base_env(MQTT_PORT=str(port))
    shell = subprocess.Popen(
        ["bash", "-c", "make --no-print-directory run | tee run.log"], cwd=root, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group for the pipeline, as a terminal gives it
        preexec_fn=terminal_signals,  # noqa: PLW1509 - single-threaded set-up before exec
    )  # fmt: skip
    try:
        log = root / "run.log"
        wait_until(lambda: log.exists() and "client: Got b'" in log.read_text(), 30, "a pong")
        family = supervisord_family(root)
        os.killpg(shell.pid, signal.SIGINT)
        assert_all_gone(family, port)
    finally:
        leave_nothing(shell, root, env)
