"""The broker's settings: one frozen value, built once from flags and environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import cli
from common.constants import DEFAULT_HOST, DEFAULT_PORT


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker listens and how it stops."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_connections: int = 0
    shutdown_timeout: float = 2.0
    log_level: str = "INFO"


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
    add(parser, environ, "--log-level", convert=cli.log_level, default="INFO", help="log level")
    args = parser.parse_args(argv)
    return BrokerSettings(
        host=args.host,
        port=args.port,
        max_connections=args.max_connections or 0,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
    )
