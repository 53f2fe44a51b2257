"""``make add-user``'s command, ``python -m broker.users add``: at a prompt, from a pipe, refused.

Each case runs the real command; the saved user is then checked against the real broker.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, Spawner, base_env

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"


def add(path: Path, name: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """Run the command with ``stdin`` as its (non-terminal) standard input."""
    return subprocess.run(
        [PYTHON, "-m", "broker.users", "add", name, "--file", str(path)],
        input=stdin, capture_output=True, text=True, timeout=30, cwd=REPO, env=base_env(),
        check=False,
    )  # fmt: skip


def publish_as(port: int, user: str, password: str) -> int:
    """mosquitto_pub's exit code for one message as ``user``: 0 when the broker let it in."""
    return subprocess.run(
        [MOSQUITTO_PUB, "-p", str(port), "-u", user, "-P", password, "-t", "t", "-m", "x"],
        capture_output=True, timeout=10, check=False,
    ).returncode  # fmt: skip


@pytest.mark.skipif(not Path(MOSQUITTO_PUB).exists(), reason="mosquitto-clients not installed")
def test_a_password_piped_in_is_saved_and_lets_the_user_in(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    """`printf %s "$pw" | make add-user NAME=alice`: it was a traceback (EOFError at 'Again')."""
    path = tmp_path / "passwords.txt"
    result = add(path, "alice", "wonder land\n")  # the line's end is not part of it
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"User alice saved in {path}.\n"
    assert result.stderr == ""
    assert path.stat().st_mode & 0o777 == 0o600
    spawn.broker(port, "--password-file", str(path)).wait_for(r"users from \S+ \(1\)")
    assert publish_as(port, "alice", "wonder land") == 0
    assert publish_as(port, "alice", "wonder land\n") != 0
    assert publish_as(port, "alice", "wrong") != 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "a user name must be non-empty"),
        ("a:b", "without ':'"),
        ("bob smith", "or spaces"),
        ("#bob", "not starting with '#'"),
        ("x" * 65_536, "a user name must be at most 65,535 bytes of UTF-8"),
    ],
)
def test_a_name_the_file_cannot_hold_is_refused_before_any_password(
    tmp_path: Path, name: str, reason: str
) -> None:
    path = tmp_path / "passwords.txt"
    result = add(path, name, "secret\n")
    assert result.returncode == 64
    assert result.stderr.startswith("broker.users: error: ")
    assert reason in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert not path.exists()


def test_no_password_or_no_file_is_one_line_and_its_own_exit_code(tmp_path: Path) -> None:
    empty = add(tmp_path / "passwords.txt", "alice", "")
    assert empty.returncode == 64
    assert empty.stderr == (
        "broker.users: error: no password: standard input is empty (and is not a terminal)\n"
    )
    blank = add(tmp_path / "passwords.txt", "alice", "\n")
    assert (blank.returncode, blank.stderr) == (64, "broker.users: error: the password must "
                                                "not be empty\n")  # fmt: skip
    long = add(tmp_path / "passwords.txt", "alice", "p" * 65_536)
    assert long.returncode == 64
    assert "a password must be at most 65,535 bytes" in long.stderr
    assert not (tmp_path / "passwords.txt").exists()
    unwritable = add(tmp_path, "alice", "secret")  # a directory
    assert (unwritable.returncode, unwritable.stderr) == (
        73, f"broker.users: error: {tmp_path}: Is a directory\n")  # fmt: skip


def at_a_terminal(path: Path, typed: list[bytes], interrupt: bool = False) -> tuple[int, str]:
    """Run the command on a pseudo-terminal, typing each of ``typed`` at its prompt in turn.

    With ``interrupt``, Ctrl-C goes at the first prompt instead. Return the exit code and what
    the terminal showed.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its standard streams on the terminal
        os.chdir(REPO)
        argv = [PYTHON, "-m", "broker.users", "add", "alice", "--file", str(path)]
        os.execve(PYTHON, argv, base_env())  # noqa: S606 - the command itself, no shell
    shown = since = b""
    deadline = time.monotonic() + 20
    answers = list(typed)
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break  # nothing more within the deadline
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the child has gone: the terminal is closed
                break
            if not chunk:
                break
            shown += chunk
            since += chunk
            if since.rstrip().endswith(b":"):  # a prompt: "Password for alice:" or "Again:"
                since = b""  # what comes after this prompt is looked at for the next one
                if interrupt:
                    os.write(fd, b"\x03")  # the terminal turns it into SIGINT
                    interrupt = False
                elif answers:
                    os.write(fd, answers.pop(0) + b"\r")
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:  # still at a prompt after the deadline: a hang, which the caller sees
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_at_a_terminal_the_password_is_asked_twice_and_must_match(tmp_path: Path) -> None:
    path = tmp_path / "passwords.txt"
    code, shown = at_a_terminal(path, [b"first", b"second"])
    assert code == 64, shown
    assert "broker.users: error: the passwords differ" in shown
    assert not path.exists()
    code, shown = at_a_terminal(path, [b"same", b"same"])
    assert code == 0, shown
    assert "Password for alice:" in shown
    assert "Again:" in shown
    assert "same" not in shown.replace("Again", "")  # never echoed
    assert path.read_text().startswith("alice:$argon2")


def test_ctrl_c_at_the_prompt_exits_130_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "passwords.txt"
    code, shown = at_a_terminal(path, [], interrupt=True)
    assert code == 128 + signal.SIGINT, shown
    assert "Traceback" not in shown
    assert not path.exists()
