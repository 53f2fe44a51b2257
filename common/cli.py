"""Command-line parsing shared by the three programs: flags with environment fallbacks.

Every flag ``--name`` can also be set by ``MQTT_NAME`` (dashes become underscores). The flag wins
over the environment. A malformed value, from either place, ends the program with one line on
stderr and exit code 64 (``EX_USAGE``), never with a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from common.constants import ENV_PREFIX, EXIT_USAGE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def exit_codes(*codes: tuple[int, str]) -> str:
    """Return the --help epilog that lists a program's exit codes, one a line."""
    return "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in codes)


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts, keeps texts of several lines (the exit codes) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit with ``EX_USAGE``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - argparse's
        """Make the parser; multi-line epilogs (the exit codes) keep their lines."""
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Report a usage error in one line and exit 64."""
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def env_name(flag: str) -> str:
    """Return the variable that backs ``flag``: ``--log-level`` -> ``MQTT_LOG_LEVEL``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def add_option(
    parser: Parser,
    environ: Mapping[str, str],
    flag: str,
    *,
    convert: Callable[[str], Any],
    default: object,
    help: str,
    short: str | None = None,
    secret: bool = False,
    **kwargs: Any,  # noqa: ANN401 - passed through to argparse
) -> None:
    """Add ``flag`` to ``parser``; its default comes from the environment when that is set.

    ``short`` is its one-letter spelling too (``-c`` for ``--count``, as ping has it). A
    ``secret`` (a password) is never shown: not in an error, not as the default in ``--help``.
    """
    name = env_name(flag)
    raw = environ.get(name)
    if raw is not None and raw != "":
        try:
            default = convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{name}={'(not shown)' if secret else repr(raw)}: {exc}")
    if "(default:" in help:
        suffix = f"[env: {name}]"  # the help says the default in words already
    else:
        shown = "unset" if default is None else "none" if default == () else repr(default)
        if secret and default is not None:
            shown = "set (not shown)"
        suffix = f"[env: {name}; default: {shown}]"
    parser.add_argument(
        *([short] if short else []),
        flag,
        type=_reasoned(convert),
        default=default,
        help=f"{help} {suffix}",
        **kwargs,
    )


def add_flag(
    parser: Parser,
    environ: Mapping[str, str],
    flag: str,
    *,
    help: str,
    short: str | None = None,
) -> None:
    """Add a boolean ``flag``; ``MQTT_NAME=1/true/yes`` turns it on from the environment."""
    name = env_name(flag)
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        default = False
    elif raw in ("1", "true", "yes", "on"):
        default = True
    else:
        parser.error(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
    parser.add_argument(*([short] if short else []), flag, action="store_true", default=default,
                        help=f"{help} [env: {name}]")  # fmt: skip


class _Version(argparse.Action):
    """``--version``: print what ``describe`` says, and exit 0 (computed only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, describe: Callable[[], str],
                 **kwargs: Any) -> None:  # noqa: ANN401 - argparse's  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit",
                         **kwargs)  # fmt: skip
        self.describe = describe

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,  # noqa: ARG002
        values: object, option_string: str | None = None,  # noqa: ARG002 - argparse's signature
    ) -> None:  # fmt: skip
        sys.stdout.write(self.describe() + "\n")
        parser.exit(0)


def add_version(parser: Parser, describe: Callable[[], str]) -> None:
    """Add ``--version``, which prints ``describe()`` (a package lookup, only when asked)."""
    parser.add_argument("--version", action=_Version, describe=describe, default=argparse.SUPPRESS)


def versions(program: str, *packages: str) -> str:
    """One line: the program, mqtt-pingpong's version, and those of ``packages``."""
    from importlib import metadata  # noqa: PLC0415 - slow to import; only --version needs it

    def version_of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    found = ", ".join(f"{name} {version_of(name)}" for name in packages)
    return f"{program} (mqtt-pingpong {version_of('mqtt-pingpong')}; {found})"


def _reasoned(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Make argparse show the converter's message instead of "invalid port value"."""

    def wrapper(text: str) -> Any:  # noqa: ANN401 - whatever the converter returns
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return wrapper


# --- value converters: each raises ValueError with a message a user can act on ---------------


def port(text: str) -> int:
    """Parse a TCP port, 0..65535 (0 asks the OS for a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be 0..65535, got {value}")
    return value


def host(text: str) -> str:
    """Accept a host name or an IP address; reject empty and blank strings."""
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"not a host name or address: {text!r}")
    return value


def _address_parts(text: str) -> tuple[str, str | None]:
    """Split ``HOST:PORT`` (``[IPv6]:PORT``) into host and port text; a bare host has None."""
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1], None  # [IPv6] alone
    where, colon, port_text = text.rpartition(":")
    if colon and (text.count(":") == 1 or (where.startswith("[") and where.endswith("]"))):
        return where.removeprefix("[").removesuffix("]"), port_text
    return text, None


def broker_address(text: str) -> str:
    """Accept ``HOST`` or ``HOST:PORT`` (``[IPv6]:PORT``); the text comes back as given."""
    value = host(text)
    if "://" in value:
        raise ValueError(f"a host name or address (HOST or HOST:PORT), not a URL: {text!r}")
    where, port_text = _address_parts(value)
    if port_text is not None:
        if not where:
            raise ValueError(f"no host before the port: {text!r}")
        port(port_text)
    if "[" in where or "]" in where:
        raise ValueError(f"not a host name or address: {text!r} (an IPv6 one is [ADDRESS]:PORT)")
    if ":" in where:  # only an IPv6 address has colons
        try:
            ipaddress.IPv6Address(where)
        except ValueError:
            raise ValueError(f"not a host name or address: {text!r}") from None
    return value


def join_address(host: str, port: int) -> str:
    """``host:port`` as it is typed back: an IPv6 address in brackets (``[::1]:1883``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(text: str, default_port: int) -> tuple[str, int]:
    """Split a checked :func:`broker_address` into host and port (``default_port`` if none)."""
    where, port_text = _address_parts(text)
    return where, default_port if port_text is None else int(port_text)


class Repeatable(argparse.Action):
    """Collect each use of a flag in a list, which the first use starts (dropping the default)."""

    def __call__(  # noqa: D102 - argparse's method
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,  # noqa: ARG002
        values: Any, option_string: str | None = None,  # noqa: ANN401, ARG002 - its signature
    ) -> None:  # fmt: skip
        current = getattr(namespace, self.dest, None)
        collected = current if isinstance(current, list) else []
        collected.append(values)
        setattr(namespace, self.dest, collected)


MAX_SECONDS = 2**32 - 1
"""The most seconds any flag takes: MQTT's longest interval (a four-byte integer: message and
session expiry). A ping's --timeout becomes its message expiry, and longer made the PUBLISH
fail to encode; a watchdog's timer cannot wait much longer either (threading.TIMEOUT_MAX)."""


def seconds(text: str) -> float:
    """Parse a finite, non-negative number of seconds, at most :data:`MAX_SECONDS`."""
    return _number(text, "a number of seconds", "seconds", positive=False, most=MAX_SECONDS)


def positive_seconds(text: str) -> float:
    """Parse a number of seconds greater than zero, at most :data:`MAX_SECONDS`."""
    return _number(text, "a number of seconds", "seconds", positive=True, most=MAX_SECONDS)


def positive_rate(text: str) -> float:
    """Parse a finite rate, per second, greater than zero."""
    return _number(text, "a rate per second", "a rate per second", positive=True)


def _number(text: str, kind: str, what: str, *, positive: bool, most: float | None = None) -> float:
    """Parse a finite number: more than 0 if ``positive``, else at least 0; at most ``most``.

    ``kind`` and ``what`` name it in the errors, which say what would have been accepted.
    """
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not {kind}: {text!r}") from None
    least = "> 0" if positive else ">= 0"
    bounds = least if most is None else f"{least} and <= {most:,.0f}"
    too_small = value <= 0 if positive else value < 0
    if not math.isfinite(value) or too_small or (most is not None and value > most):
        raise ValueError(f"{what} must be a finite number {bounds}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


MAX_STRING = 65535
"""The most bytes an MQTT string holds (its length is two bytes, section 1.5.4)."""


def mqtt_string(text: str) -> str:
    """Accept what goes into an MQTT string (a client id, a user name, a password)."""
    if "\x00" in text:
        raise ValueError("must not contain U+0000")
    size = len(text.encode())
    if size > MAX_STRING:
        raise ValueError(f"must be at most {MAX_STRING:,} bytes of UTF-8 (a two-byte length), "
                         f"got {size:,}")  # fmt: skip
    return text


def keepalive(text: str) -> int:
    """Parse a keep alive: whole seconds, 1 to 65535 (MQTT's two-byte field)."""
    value = positive_int(text)
    if value > 65535:
        raise ValueError(f"must be <= 65535 (a two-byte field), got {value}")
    return value


def interval_seconds(text: str) -> int:
    """Parse MQTT 5's whole seconds of an interval: 1 to :data:`MAX_SECONDS`.

    A four-byte field, whose largest value means never (as for a session expiry).
    """
    value = positive_int(text)
    if value > MAX_SECONDS:
        raise ValueError(f"must be <= {MAX_SECONDS:,} (a four-byte field: never), got {value}")
    return value


def qos(text: str) -> int:
    """Parse an MQTT QoS level: 0, 1 or 2."""
    if text.strip() not in ("0", "1", "2"):
        raise ValueError(f"QoS must be 0, 1 or 2, got {text!r}")
    return int(text)


def topic_name(text: str) -> str:
    """Accept a topic name a client may publish to: non-empty, no wildcards, no U+0000, no "$"."""
    if not text:
        raise ValueError("a topic must not be empty")
    if "+" in text or "#" in text:
        raise ValueError(f"a topic to publish to must not contain '+' or '#': {text!r}")
    if "\x00" in text:
        raise ValueError("a topic must not contain U+0000")
    if text.startswith("$"):
        # Section 4.7.2: "$" topics are the broker's ($SYS), and brokers drop what a client
        # publishes there: every ping would be lost, without a word to the client.
        raise ValueError(f"a topic starting with '$' is the broker's, not a client's: {text!r}")
    if len(text.encode()) > MAX_STRING:
        raise ValueError("a topic must be at most 65535 bytes of UTF-8")
    return text


def log_level(text: str) -> str:
    """Parse a logging level name, case-insensitively."""
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value
