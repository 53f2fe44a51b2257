"""The broker's settings: one frozen value, built once from flags and environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from broker.protocol import DEFAULT_MAX_PACKET_SIZE
from common import cli
from common.constants import DEFAULT_HOST, DEFAULT_PORT


@dataclass(frozen=True, slots=True)
class Limits:
    """What the broker accepts from clients."""

    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    connect_timeout: float = 10.0
    """Seconds a new connection may take to send CONNECT before it is closed."""
    deny_subscribe: tuple[str, ...] = ()
    """Topic filters no client may subscribe to (granted 0x80 in SUBACK)."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker listens, what it accepts, and how it stops."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_connections: int = 0
    shutdown_timeout: float = 2.0
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)


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
        description="Run the in-memory amqtt MQTT 3.1.1 broker for mqtt-pingpong.",
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
        convert=cli.positive_int,
        default=DEFAULT_MAX_PACKET_SIZE,
        help="largest MQTT packet accepted, in bytes; a larger one closes the connection",
    )
    add(
        parser,
        environ,
        "--connect-timeout",
        convert=cli.positive_seconds,
        default=10.0,
        help="seconds a new connection may take to send CONNECT",
    )
    add(
        parser,
        environ,
        "--deny-subscribe",
        convert=filter_list,
        default=(),
        help="comma-separated topic filters no client may subscribe to, e.g. 'secret/#'",
    )
    add(parser, environ, "--log-level", convert=cli.log_level, default="INFO", help="log level")
    args = parser.parse_args(argv)
    return BrokerSettings(
        host=args.host,
        port=args.port,
        max_connections=args.max_connections or 0,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        limits=Limits(
            max_packet_size=args.max_packet_size,
            connect_timeout=args.connect_timeout,
            deny_subscribe=args.deny_subscribe,
        ),
    )
