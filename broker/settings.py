"""The broker's settings: one frozen value, built once from flags and environment."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.protocol import DEFAULT_MAX_PACKET_SIZE
from common import cli
from common.constants import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    EXIT_CONFIG,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
"""The live page's directory in a checkout (the default of --http-dir)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the broker accepts from clients."""

    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    connect_timeout: float = 10.0
    """Seconds a new connection may take to send CONNECT before it is closed."""
    deny_subscribe: tuple[str, ...] = ()
    """Topic filters no client may subscribe to (granted 0x80 in SUBACK)."""
    max_inflight: int = 20
    """Unacknowledged QoS 1/2 messages per client; the rest wait in its session, in order."""
    max_queued: int = 1000
    """QoS 1/2 messages waiting per session (offline, or behind the window); more are dropped."""
    identity_as_username: bool = False
    """TLS: a client certificate's common name is the user name (--use-identity-as-username)."""
    max_keepalive: int = 65535
    """MQTT 5: a client asking for more (or for none, 0) is told this in CONNACK's server keep
    alive, and held to it. As mosquitto's max_keepalive: 3.1.1 clients are left as they ask."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker listens, what it accepts, and how it stops."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_connections: int = 0
    shutdown_timeout: float = 2.0
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)
    password_file: Path | None = None
    """When set, only the users in this file may connect (amqtt's FileAuthPlugin)."""
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """CA certificates that sign the clients' certificates (TLS listeners)."""
    require_certificate: bool = False
    """TLS: a client without a certificate from --tls-ca is refused in the handshake."""
    acl_file: Path | None = None
    """Who may read and write what (mosquitto's acl_file format); None allows everything."""
    ws_port: int | None = None
    """MQTT over WebSockets (and the live page) on this port; off when None."""
    wss_port: int | None = None
    """MQTT over secure WebSockets (the TLS certificate and key) on this port."""
    metrics_port: int | None = None
    """Prometheus metrics at http://HOST:PORT/metrics; off when None."""
    http_dir: Path | None = None
    """The live page's directory, served on the WebSocket ports; None serves no page."""
    sys_interval: float = 10.0
    """Seconds between $SYS updates; 0 turns them off."""
    event_loop: str = "auto"
    """``auto`` (uvloop where installed), ``uvloop`` or ``asyncio``."""


def readable_file(text: str) -> Path:
    """Accept the path of an existing, readable file."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    try:
        path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {text}: {exc.strerror}") from None
    return path


def password_file(text: str) -> Path:
    """Accept a password file of ``name:argon2-hash`` lines (make add-user writes them)."""
    path = readable_file(text)
    for number, name, digest in _password_entries(path):
        if not name or not digest.startswith("$argon2"):
            raise ValueError(f"{text}:{number}: expected 'name:$argon2...' (see make add-user)")
    return path


def user_names(path: Path) -> set[str]:
    """Return the users of a password file (its comments and blank lines skipped)."""
    return {name for _, name, _ in _password_entries(path)}


def _password_entries(path: Path) -> Iterator[tuple[int, str, str]]:
    """Each entry of a password file: its line number, name and hash."""
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, digest = line.partition(":")
            yield number, name, digest


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def directory(text: str) -> Path | Literal[""]:
    """Parse a directory that exists, or ``none`` (given back as "": no directory)."""
    if text.lower() == "none":
        return ""
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"{text} is not a directory")
    return path


def event_loop(text: str) -> str:
    """Parse an event loop choice."""
    value = text.strip().lower()
    if value not in EVENT_LOOPS:
        raise ValueError(f"must be one of {', '.join(EVENT_LOOPS)}, got {text!r}")
    return value


MIN_PACKET_SIZE = 20
"""The smallest --max-packet-size: below it a client's CONNECT hardly fits (mosquitto refuses
the same values of its max_packet_size)."""
MAX_PACKET_SIZE = 268_435_460
"""The largest MQTT packet there can be: a remaining length of 268,435,455 (four bytes of
variable-length integer) and its five-byte fixed header (sections 1.5.5 and 2.1.4)."""


def packet_size_limit(text: str) -> int:
    """Parse --max-packet-size: bytes, from 20 to the largest packet MQTT can encode."""
    value = cli.positive_int(text)
    if value < MIN_PACKET_SIZE:
        raise ValueError(f"must be >= {MIN_PACKET_SIZE} bytes (a CONNECT must fit), got {value}")
    if value > MAX_PACKET_SIZE:
        raise ValueError(
            f"must be <= {MAX_PACKET_SIZE:,} bytes (the largest MQTT packet), got {value}"
        )
    return value


def filter_list(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of topic filters."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    for item in items:
        if "\x00" in item:
            raise ValueError("a topic filter must not contain U+0000")
    return items


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> BrokerSettings:
    """Parse flags, falling back to ``MQTT_*`` variables; exit 64 on a malformed value."""
    parser = cli.Parser(
        prog="broker",
        description=(
            "Run the in-memory MQTT 5.0 and 3.1.1 broker of mqtt-pingpong (amqtt keeps its state)."
        ),
        epilog=cli.exit_codes(
            (EXIT_OK, "stopped by SIGTERM or SIGINT"),
            (EXIT_USAGE, "bad usage: a malformed flag or environment variable"),
            (EXIT_UNAVAILABLE, "a port cannot be bound (in use, or not allowed)"),
            (EXIT_SOFTWARE, "amqtt is not the version this broker was written for"),
            (EXIT_CONFIG, "the ACL file is malformed (its line is named)"),
            (EXIT_FORCED, "a shutdown overran its bound and the watchdog ended the process"),
        ),
    )
    add = cli.add_option
    add(
        parser,
        environ,
        "--host",
        convert=cli.host,
        default=DEFAULT_HOST,
        help="address to listen on (127.0.0.1 keeps it private to this machine)",
    )
    add(
        parser,
        environ,
        "--port",
        convert=cli.port,
        default=DEFAULT_PORT,
        help="TCP port to listen on (0 picks a free one)",
    )
    add(
        parser,
        environ,
        "--max-connections",
        convert=cli.positive_int,
        default=None,
        help="refuse to serve more than this many clients at once (default: no limit)",
    )
    add(
        parser,
        environ,
        "--shutdown-timeout",
        convert=cli.positive_seconds,
        default=2.0,
        help="seconds a clean shutdown may take before the broker exits anyway",
    )
    add(
        parser,
        environ,
        "--max-packet-size",
        convert=packet_size_limit,
        default=DEFAULT_MAX_PACKET_SIZE,
        help="largest MQTT packet accepted, in bytes; a larger one closes the connection",
    )
    add(
        parser,
        environ,
        "--max-inflight",
        convert=cli.positive_int,
        default=20,
        help="unacknowledged QoS 1/2 messages per client; later ones wait in its session",
    )
    add(
        parser,
        environ,
        "--max-queued",
        convert=cli.positive_int,
        default=1000,
        help="QoS 1/2 messages kept per client while it is offline or behind; more are dropped",
    )
    add(
        parser,
        environ,
        "--max-keepalive",
        convert=cli.keepalive,
        default=65535,
        help="MQTT 5: the longest keep alive a client may ask for, in seconds; one asking for "
        "more, or for none, is told this one (server keep alive)",
    )
    add(
        parser,
        environ,
        "--handshake-timeout",
        convert=cli.positive_seconds,
        default=10.0,
        help="seconds a new connection may take to finish TLS and send CONNECT",
    )
    add(
        parser,
        environ,
        "--deny-subscribe",
        convert=filter_list,
        default=(),
        help="comma-separated topic filters no client may subscribe to, e.g. 'secret/#'",
    )
    add(
        parser,
        environ,
        "--password-file",
        convert=password_file,
        default=None,
        help="require user names and passwords from this file (default: anonymous access)",
    )
    add(
        parser,
        environ,
        "--tls-port",
        convert=cli.port,
        default=None,
        help="also listen for MQTT over TLS on this port (needs --tls-cert and --tls-key)",
    )
    add(
        parser,
        environ,
        "--tls-cert",
        convert=readable_file,
        default=None,
        help="PEM certificate chain for the TLS listener",
    )
    add(
        parser,
        environ,
        "--tls-key",
        convert=readable_file,
        default=None,
        help="PEM private key for the TLS listener",
    )
    add(
        parser,
        environ,
        "--tls-ca",
        convert=readable_file,
        default=None,
        help="PEM CA certificates that sign client certificates (TLS listeners)",
    )
    cli.add_flag(
        parser,
        environ,
        "--require-certificate",
        help="TLS listeners: refuse a client without a certificate signed by --tls-ca",
    )
    cli.add_flag(
        parser,
        environ,
        "--use-identity-as-username",
        help="TLS listeners: the client certificate's common name is the user name (for the "
        "ACL), and the certificate is the client's credential (no password asked)",
    )
    add(
        parser,
        environ,
        "--acl-file",
        convert=readable_file,
        default=None,
        help="who may read and write which topics, in mosquitto's acl_file format; "
        "SIGHUP re-reads it (default: everyone everything)",
    )
    add(
        parser,
        environ,
        "--ws-port",
        convert=cli.port,
        default=None,
        help="also listen for MQTT over WebSockets (ws://HOST:PORT/mqtt) on this port, and "
        "serve the live page there (default: off)",
    )
    add(
        parser,
        environ,
        "--wss-port",
        convert=cli.port,
        default=None,
        help="also listen for MQTT over secure WebSockets on this port (needs --tls-cert and "
        "--tls-key)",
    )
    add(
        parser,
        environ,
        "--http-dir",
        convert=directory,
        default=None,
        help="the live page's directory, served on the WebSocket ports (default: web/ of this "
        "checkout; 'none' serves no page)",
    )
    add(
        parser,
        environ,
        "--metrics-port",
        convert=cli.port,
        default=None,
        help="serve the $SYS figures as Prometheus metrics at http://HOST:PORT/metrics "
        "(default: off)",
    )
    add(
        parser,
        environ,
        "--sys-interval",
        convert=cli.seconds,
        default=10.0,
        help="publish the broker's figures to $SYS/broker/... this often, in seconds (0: off)",
    )
    add(
        parser,
        environ,
        "--event-loop",
        convert=event_loop,
        default="auto",
        help="auto (uvloop where installed, else asyncio's own), uvloop or asyncio",
    )
    add(parser, environ, "--log-level", convert=cli.log_level, default="INFO", help="log level")
    cli.add_version(
        parser,
        lambda: cli.versions("broker", "amqtt", "mqtt5").replace(
            "(mqtt-pingpong", "speaks MQTT 5.0 and 3.1.1 (mqtt-pingpong", 1
        ),
    )
    args = parser.parse_args(argv)
    secure = args.tls_port is not None or args.wss_port is not None
    if secure != (args.tls_cert is not None) or (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-port (or --wss-port), --tls-cert and --tls-key go together")
    if args.require_certificate and args.tls_ca is None:
        parser.error("--require-certificate needs --tls-ca (the CA of the client certificates)")
    if args.use_identity_as_username and not args.require_certificate:
        parser.error("--use-identity-as-username needs --require-certificate")
    if args.tls_ca is not None and not secure:
        parser.error("--tls-ca needs a TLS listener (--tls-port or --wss-port)")
    ports = [p for p in (args.port, args.tls_port, args.ws_port, args.wss_port,
                         args.metrics_port) if p]  # fmt: skip
    if len(ports) != len(set(ports)):
        parser.error(f"two listeners on one port: {', '.join(map(str, ports))}")
    http_dir = args.http_dir
    if http_dir is None:  # not given: the checkout's page, if there is one
        http_dir = WEB_DIR if WEB_DIR.is_dir() else ""
    return BrokerSettings(
        host=args.host,
        port=args.port,
        max_connections=args.max_connections or 0,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        limits=Limits(
            max_packet_size=args.max_packet_size,
            connect_timeout=args.handshake_timeout,
            deny_subscribe=args.deny_subscribe,
            max_inflight=args.max_inflight,
            max_queued=args.max_queued,
            max_keepalive=args.max_keepalive,
            identity_as_username=args.use_identity_as_username,
        ),
        password_file=args.password_file,
        tls_port=args.tls_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        require_certificate=args.require_certificate,
        acl_file=args.acl_file,
        ws_port=args.ws_port,
        metrics_port=args.metrics_port,
        wss_port=args.wss_port,
        http_dir=http_dir or None,
        event_loop=args.event_loop,
        sys_interval=args.sys_interval,
    )
