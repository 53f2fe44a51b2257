"""The ping client's settings: one frozen value, built once from flags and environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import cli
from common.client import ClientSettings, client_parser, client_settings
from common.constants import EXIT_FORCED, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE

DEFAULT_CONNECT_TIMEOUT_WITH_COUNT = 10.0
DEADLINE_SLACK = 1.0
"""Seconds a derived deadline adds to what a counted run needs, for a slow machine."""


MAX_REMAINING_LENGTH = 268_435_455
"""MQTT's largest remaining length: four bytes of variable-length integer (section 1.5.5)."""
PING_OVERHEAD = (2 + cli.MAX_STRING) + 2 + 4 + (1 + 2 + cli.MAX_STRING) + (1 + 2 + 32) + (1 + 4)
"""The most a ping's PUBLISH adds to its payload: the topic with its length, a packet id, the
properties' length, and the properties: a response topic as long, correlation data (a timestamp),
the expiry (identifier, length or value)."""
MAX_SIZE = MAX_REMAINING_LENGTH - PING_OVERHEAD
"""The largest --size that fits any PUBLISH (268,304,334). paho failed with a traceback on a
larger one."""


def payload_size(text: str) -> int:
    """Parse --size: bytes of payload, 1 to :data:`MAX_SIZE`."""
    value = cli.positive_int(text)
    if value > MAX_SIZE:
        raise ValueError(f"must be <= {MAX_SIZE:,} bytes (the largest MQTT packet), got {value}")
    return value


def device_names(client: ClientSettings, index: int) -> tuple[str, str, str]:
    """Return the names of a fleet's device ``index``: client id, response topic, ping topic.

    The response topic is MQTT 5's; the ping topic MQTT 3.1.1's, which has no response topic.
    """
    client_id = f"{client.client_id}-{index}"
    return client_id, f"{client.pong_topic}/{client_id}", f"{client.ping_topic}/{client_id}"


def derived_deadline(count: int, interval: float, timeout: float, connect_timeout: float) -> float:
    """Return the deadline a counted run gets when none is given: all it needs, plus slack.

    The link must be up within ``connect_timeout``; the first ping goes one interval later and
    the last one ``count - 1`` intervals after that (ticks missed in an outage are skipped, not
    added); the last ping then has ``timeout`` to be answered.
    """
    return connect_timeout + count * interval + timeout + DEADLINE_SLACK


@dataclass(frozen=True, slots=True)
class PingSettings:
    """What the probe sends, how long it waits, and how it reports."""

    client: ClientSettings
    interval: float = 1.0
    count: int | None = None
    timeout: float = 2.0
    connect_timeout: float | None = None
    deadline: float | None = None
    """Seconds after which the whole run ends, whatever happens (``ping -w``)."""
    silence: float = 5.0
    stats_interval: float = 60.0
    json: bool = False
    flood: bool = False
    """No line per ping, a dot per ping on a terminal (``ping -f``)."""
    back_to_back: bool = False
    """Send each ping as soon as the previous one is answered or lost (``--flood`` without
    ``--interval``, as ``ping -f`` without ``-i``)."""
    quiet: bool = False
    """Log no line per ping (``ping -q``): warnings, errors and the summary only."""
    size: int | None = None
    """Pad each ping's payload with spaces to this many bytes (``ping -s``)."""
    devices: int = 1
    """Simulated devices, each its own connection (``--devices``; 1: the plain probe)."""
    connect_rate: float = 0.0
    """Devices brought up per second (0: as fast as the broker takes them)."""
    jitter: float = 0.0
    """Each device's first ping waits up to this many seconds, so they do not fire together."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (a blackbox exporter)."""
    brokers: tuple[tuple[str, int], ...] = ()
    """Every broker given (``--host`` more than once): a fleet's devices take them in turn.
    Empty for one broker (``client.host`` and ``client.port``)."""


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> PingSettings:
    """Parse flags, falling back to ``MQTT_*`` variables; exit 64 on a malformed value."""
    parser = client_parser(
        "ping_client",
        "Publish a Unix timestamp to the ping topic every interval and time its echo on the "
        "pong topic, like ping(8), then print a summary.",
        environ,
        epilog=cli.exit_codes(
            (0, "every ping answered"),
            (1, "some pings lost, or left unanswered when a deadline cut the run short"),
            (2, "the link never became usable (no CONNACK or no SUBACK); one ERROR line says why"),
            (EXIT_USAGE, "bad usage: a malformed flag or environment variable"),
            (EXIT_UNAVAILABLE, "--metrics-port cannot be bound (in use, or not allowed)"),
            (EXIT_SOFTWARE, "the installed aiomqtt lacks the internals this client relies on"),
            (EXIT_FORCED, "a shutdown overran its bound and the watchdog ended the process"),
        ),
        many_hosts=True,
    )
    add = cli.add_option
    add(
        parser,
        environ,
        "--interval",
        short="-i",
        convert=cli.positive_seconds,
        default=None,
        help="seconds between pings, fractions such as 0.01 too (default: 1; with --flood:"
        " back to back)",
    )
    add(
        parser,
        environ,
        "--count",
        short="-c",
        convert=cli.positive_int,
        default=None,
        help="stop after this many pings, once each is answered or timed out",
    )
    add(
        parser,
        environ,
        "--timeout",
        short="-W",
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
            "give up with exit 2 if the link is not usable (CONNACK and SUBACK) within this "
            f"(default: {DEFAULT_CONNECT_TIMEOUT_WITH_COUNT:g} s with --count, else wait)"
        ),
    )
    add(
        parser,
        environ,
        "--deadline",
        short="-w",
        convert=cli.positive_seconds,
        default=None,
        help=(
            "end the whole run after this many seconds, whatever happens, like ping -w "
            "(default with --count: connect timeout + count x interval + timeout + "
            f"{DEADLINE_SLACK:g} s; else none)"
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
        "--flood",
        help="log no line per ping, and draw a dot per ping on a terminal, like ping -f; without"
        " --interval, send each ping as soon as the previous one is answered or lost: the round"
        " trip back to back",
    )
    cli.add_flag(
        parser,
        environ,
        "--json",
        help="print one JSON object per event on stdout (the log still goes to stderr)",
    )
    cli.add_flag(
        parser,
        environ,
        "--quiet",
        short="-q",
        help="log nothing per ping: warnings, errors and the summary only, like ping -q",
    )
    add(
        parser,
        environ,
        "--size",
        short="-s",
        convert=payload_size,
        default=None,
        help="pad each ping's timestamp with spaces to this many bytes, to measure what payload "
        "size costs (default: the timestamp alone)",
    )
    add(
        parser,
        environ,
        "--devices",
        convert=cli.positive_int,
        default=1,
        help="simulate this many devices, each its own connection and client id "
        "(<client-id>-<i>), pinging every interval: MQTT 5 with its own response topic, "
        "3.1.1 on its own topic (<ping-topic>/<client-id>-<i>)",
    )
    add(
        parser,
        environ,
        "--connect-rate",
        convert=cli.positive_rate,
        default=None,
        help="with --devices: devices brought up per second (default: as fast as the broker "
        "takes them)",
    )
    add(
        parser,
        environ,
        "--jitter",
        convert=cli.seconds,
        default=None,
        help="with --devices: each device's first ping waits a random 0..JITTER s (default: "
        "one interval), so that the fleet does not fire in lockstep",
    )
    add(
        parser,
        environ,
        "--metrics-port",
        convert=cli.port,
        default=None,
        help="serve Prometheus metrics (RTT histogram, pings sent, answered, lost, late, "
        "reconnects, link up) at http://127.0.0.1:PORT/metrics (default: off)",
    )
    cli.add_version(parser, lambda: cli.versions("ping_client", "aiomqtt", "paho-mqtt"))
    args = parser.parse_args(argv)
    if args.devices > 1 and args.flood:
        parser.error("--devices goes without --flood: a fleet pings at --interval")
    hosts = args.host if isinstance(args.host, list) else [args.host]
    brokers = tuple(cli.split_address(h, args.port) for h in hosts) if len(hosts) > 1 else ()
    if brokers and args.devices < len(brokers):
        parser.error(f"--host given {len(brokers)} times needs --devices {len(brokers)} or more: "
                     "a fleet's devices are spread over the brokers")  # fmt: skip
    back_to_back = args.flood and args.interval is None
    interval = 1.0 if args.interval is None else args.interval
    connect_timeout = args.connect_timeout
    if connect_timeout is None and args.count is not None:
        connect_timeout = DEFAULT_CONNECT_TIMEOUT_WITH_COUNT
    deadline = args.deadline
    if deadline is None and args.count is not None and connect_timeout is not None:
        spacing = args.timeout if back_to_back else interval  # such a ping takes at most that
        deadline = derived_deadline(args.count, spacing, args.timeout, connect_timeout)
    client = client_settings(parser, args, "ping_client", environ)
    if args.devices > 1:
        # Each of the last device's names is an MQTT string, at most 65,535 bytes.
        names = device_names(client, args.devices - 1)
        for what, name in zip(("client id", "topic", "topic"), names, strict=True):
            if len(name.encode()) > cli.MAX_STRING:
                why = f"a device's {what} would be over {cli.MAX_STRING:,} bytes"
                parser.error(f"--devices {args.devices}: {why}: shorten --client-id or the topics")
    return PingSettings(
        client=client,
        interval=interval,
        count=args.count,
        timeout=args.timeout,
        connect_timeout=connect_timeout,
        deadline=deadline,
        silence=args.silence,
        stats_interval=args.stats_interval,
        json=args.json,
        flood=args.flood,
        back_to_back=back_to_back,
        quiet=args.quiet,
        size=args.size,
        metrics_port=args.metrics_port,
        devices=args.devices,
        brokers=brokers,
        connect_rate=args.connect_rate or 0.0,
        jitter=interval if args.jitter is None else args.jitter,
    )
