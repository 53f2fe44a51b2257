"""Manage the broker's password file: ``python -m broker.users add NAME``.

Lines are ``name:argon2-hash``, the format amqtt's FileAuthPlugin reads. The password comes from
``MQTT_NEW_PASSWORD``; when that is unset, from a prompt, asked twice, on a terminal, or else from
the first line of standard input (``printf '%s' "$pw" | make add-user NAME=alice``, as chpasswd
reads it); never from a flag, which would show in the process list and the shell history.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from common import cli
from common.constants import EXIT_CANTCREAT, EXIT_OK, EXIT_USAGE

EXIT_INTERRUPTED = 130
"""Ctrl-C at the prompt, as a shell reports a command SIGINT ended (128 + 2)."""

DEFAULT_FILE = "passwords.txt"


def hash_password(password: str) -> str:
    """Return the argon2 hash amqtt's FileAuthPlugin verifies."""
    return str(PasswordHash((Argon2Hasher(),)).hash(password))


def check_name(name: str) -> str:
    """Return ``name``, or refuse one the file or MQTT cannot hold.

    ``:`` would end it and a leading ``#`` make its line a comment; an MQTT string is at most
    65,535 bytes.
    """
    if not name or ":" in name or name.startswith("#") or any(c.isspace() for c in name):
        raise ValueError(
            f"a user name must be non-empty, without ':' or spaces, not starting with '#': "
            f"{name[:40]!r}"
        )
    try:
        return cli.mqtt_string(name)
    except ValueError as exc:
        raise ValueError(f"a user name {exc}") from None


def check_password(password: str) -> str:
    """Refuse an empty password, or one longer than MQTT carries; return it."""
    if not password:
        raise ValueError("the password must not be empty")
    try:
        return cli.mqtt_string(password)
    except ValueError as exc:
        raise ValueError(f"a password {exc}") from None


def add_user(path: Path, name: str, password: str) -> None:
    """Add ``name`` to the file, or replace its hash; the file is created with mode 0600."""
    check_name(name)
    check_password(password)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != name]
    kept.append(f"{name}:{hash_password(password)}")
    path.touch(mode=0o600, exist_ok=True)
    path.write_text("\n".join(kept) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Add or replace a user in the password file."""
    parser = cli.Parser(prog="broker.users", description="Manage the broker's password file.")
    parser.add_argument("command", choices=["add"], help="what to do")
    parser.add_argument("name", help="user name")
    parser.add_argument(
        "--file",
        default=os.environ.get("MQTT_PASSWORD_FILE", DEFAULT_FILE),
        help=f"password file [env: MQTT_PASSWORD_FILE; default: {DEFAULT_FILE}]",
    )
    args = parser.parse_args(argv)
    try:
        check_name(args.name)  # before asking for a password that could not be saved
        password = os.environ.get("MQTT_NEW_PASSWORD")
        if password is None:
            password = ask_password(args.name)
        add_user(Path(args.file), args.name, password)
    except ValueError as exc:
        sys.stderr.write(f"broker.users: error: {exc}\n")
        sys.exit(EXIT_USAGE)
    except OSError as exc:  # the file: unreadable, unwritable, a directory
        sys.stderr.write(f"broker.users: error: {args.file}: {exc.strerror or exc}\n")
        sys.exit(EXIT_CANTCREAT)
    sys.stdout.write(f"User {args.name} saved in {args.file}.\n")
    sys.exit(EXIT_OK)


def ask_password(name: str) -> str:
    """Ask for the password twice on a terminal; else read the first line of standard input."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise ValueError("no password: standard input is empty (and is not a terminal)")
        return line.rstrip("\r\n")
    try:
        password = getpass.getpass(f"Password for {name}: ")
        again = getpass.getpass("Again: ")
    except EOFError:
        sys.stderr.write("\n")
        raise ValueError("no password given") from None
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(EXIT_INTERRUPTED)
    if password != again:
        raise ValueError("the passwords differ")
    return password


if __name__ == "__main__":
    main()
