"""`make run` from a user's point of view: logs stream, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support import (
    REPO,
    base_env,
    pid_alive,
    port_accepts,
    supervisor_children,
    wait_until,
)


def checkout(tmp: Path) -> Path:
    """A copy of the repository's run machinery in ``tmp``, sharing the installed .venv."""
    root = tmp / "repo"
    root.mkdir()
    for name in ("supervisord.conf", "Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "tools", root / "tools")
    (root / ".venv").symlink_to(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")))
    return root


def test_make_run_streams_logs_and_ctrl_c_stops_everything(tmp_path: Path, port: int) -> None:
    root = checkout(tmp_path)
    out_path = tmp_path / "make.out"
    with out_path.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=root,
            env=base_env(MQTT_PORT=str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal gives it
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
        pid = int((root / "run" / "supervisord.pid").read_text())
        family = [pid, *supervisor_children(pid)]
        assert len(family) >= 4
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C does
        make.wait(15)  # raises if make is still running after 15 s
        wait_until(lambda: not any(pid_alive(p) for p in family), 10, "every process to exit")
        assert not port_accepts(port)
        assert "Stopped." in out_path.read_text()
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(5)
