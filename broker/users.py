"""Manage the broker's password file: ``python -m broker.users add NAME``.

Lines are ``name:argon2-hash``, the format amqtt's FileAuthPlugin reads. The password comes from
``MQTT_NEW_PASSWORD`` or, when that is unset, from a prompt (never from a flag, which would show
in the process list and the shell history).
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
from common.constants import EXIT_OK, EXIT_USAGE

DEFAULT_FILE = "passwords.txt"


def hash_password(password: str) -> str:
    """Return the argon2 hash amqtt's FileAuthPlugin verifies."""
    return str(PasswordHash((Argon2Hasher(),)).hash(password))


def add_user(path: Path, name: str, password: str) -> None:
    """Add ``name`` to the file, or replace its hash; the file is created with mode 0600."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"a user name must be non-empty, without ':' or spaces: {name!r}")
    if not password:
        raise ValueError("the password must not be empty")
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
    password = os.environ.get("MQTT_NEW_PASSWORD")
    if password is None:
        password = getpass.getpass(f"Password for {args.name}: ")
        if password != getpass.getpass("Again: "):
            sys.stderr.write("broker.users: error: the passwords differ\n")
            sys.exit(EXIT_USAGE)
    try:
        add_user(Path(args.file), args.name, password)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"broker.users: error: {exc}\n")
        sys.exit(EXIT_USAGE)
    sys.stdout.write(f"User {args.name} saved in {args.file}.\n")
    sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()
