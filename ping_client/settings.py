"""The ping client's settings: one frozen value, built once from flags and environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import cli
from common.client import ClientSettings, add_client_options, client_settings

DEFAULT_CONNECT_TIMEOUT_WITH_COUNT = 10.0


@dataclass(frozen=True, slots=True)
class PingSettings:
    """What the probe sends, how long it waits, and how it reports."""

    client: ClientSettings
    interval: float = 1.0
    count: int | None = None
    timeout: float = 2.0
    connect_timeout: float | None = None
    silence: float = 5.0
    stats_interval: float = 60.0
    json: bool = False


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> PingSettings:
    """Parse flags, falling back to ``MQTT_*`` variables; exit 64 on a malformed value."""
    parser = cli.Parser(
        prog="ping_client",
        description=(
            "Publish a Unix timestamp to the ping topic every interval and time its echo on the "
            "pong topic, like ping(8). Exit status: 0 all answered, 1 some lost, "
            "2 never connected, 64 bad usage."
        ),
    )
    add_client_options(parser, environ)
    add = cli.add_option
    add(
        parser,
        environ,
        "--interval",
        convert=cli.positive_seconds,
        default=1.0,
        help="seconds between pings (fractions such as 0.01 work)",
    )
    add(
        parser,
        environ,
        "--count",
        convert=cli.positive_int,
        default=None,
        help="stop after this many pings, once each is answered or timed out",
    )
    add(
        parser,
        environ,
        "--timeout",
        convert=cli.positive_seconds,
        default=2.0,
        help="seconds to wait for an echo before the ping counts as lost",
    )
    add(
        parser,
        environ,
        "--connect-timeout",
        convert=cli.positive_seconds,
        default=None,
        help=(
            "give up with exit 2 if the first connection takes longer "
            f"(default: {DEFAULT_CONNECT_TIMEOUT_WITH_COUNT:g} s with --count, else wait)"
        ),
    )
    add(
        parser,
        environ,
        "--silence",
        convert=cli.positive_seconds,
        default=5.0,
        help="warn once when no echo has come back for this many seconds",
    )
    add(
        parser,
        environ,
        "--stats-interval",
        convert=cli.seconds,
        default=60.0,
        help="log a rolling summary this often, in seconds (0 turns it off)",
    )
    cli.add_flag(
        parser,
        environ,
        "--json",
        help="print one JSON object per event on stdout instead of log lines",
    )
    args = parser.parse_args(argv)
    connect_timeout = args.connect_timeout
    if connect_timeout is None and args.count is not None:
        connect_timeout = DEFAULT_CONNECT_TIMEOUT_WITH_COUNT
    return PingSettings(
        client=client_settings(parser, args, "ping_client"),
        interval=args.interval,
        count=args.count,
        timeout=args.timeout,
        connect_timeout=connect_timeout,
        silence=args.silence,
        stats_interval=args.stats_interval,
        json=args.json,
    )
