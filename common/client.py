"""Settings and construction of the aiomqtt client both clients use."""

from __future__ import annotations

import argparse
import secrets
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import cli
from common.aiomqtt_fixes import Client, unsupported
from common.constants import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    EXIT_SOFTWARE,
    PING_TOPIC,
    PONG_TOPIC,
    RECONNECT_INTERVAL,
)

# paho (under aiomqtt) never sets TCP_NODELAY. Without it a QoS 1 round trip waits on Nagle's
# algorithm and the peer's delayed ACK, about 40 ms each way.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a client reaches the broker and which topics it plays on."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    ping_topic: str = PING_TOPIC
    pong_topic: str = PONG_TOPIC
    qos: int = 0
    reconnect_interval: float = RECONNECT_INTERVAL
    keepalive: int = 10
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    """CA bundle to verify the broker's certificate (default: the system's)."""
    log_level: str = "INFO"
    protocol: int = 5
    """5 (MQTT 5.0, falling back to 3.1.1 once if the broker refuses it) or 4 (MQTT 3.1.1)."""
    persistent: bool = False
    """Keep the session (and what is queued in it) across reconnects and restarts."""
    session_expiry: int = 3600
    """MQTT 5: how long the broker keeps a persistent session after the connection ends."""
    transport: Literal["tcp", "websockets"] = "tcp"
    """``tcp``, or ``websockets``: MQTT over WebSockets (wss with --tls), at ``ws_path``."""
    ws_path: str = "/mqtt"

    @property
    def address(self) -> str:
        """Where the broker is, as the logs say it: ``host:port``, or a ws:// or wss:// URL."""
        return self.address_of(self.host, self.port)

    def address_of(self, host: str, port: int) -> str:
        """Say ``host:port`` as :attr:`address` does (a fleet has more than one broker)."""
        where = cli.join_address(host, port)
        if self.transport != "websockets":
            return where
        return f"{'wss' if self.tls else 'ws'}://{where}{self.ws_path}"

    def __post_init__(self) -> None:
        """Reject topic pairs that would make the echo feed itself.

        The echo listens on the ping topic and one level under it (a device's own ping topic,
        ``<ping>/<device>``, answered on ``<pong>/<device>``), so the pong topic may be
        neither.
        """
        ping, pong = self.ping_topic, self.pong_topic
        if ping == pong:
            raise ValueError(
                f"ping and pong topics must differ (both are {ping!r}): the echo would feed itself"
            )
        if pong.startswith(f"{ping}/") and "/" not in pong[len(ping) + 1 :]:
            raise ValueError(
                f"the pong topic {pong!r} is a device's ping topic under {ping!r}: the echo "
                "would feed itself"
            )


def client_parser(
    prog: str, description: str, environ: Mapping[str, str], *, epilog: str | None = None,
    many_hosts: bool = False,
) -> cli.Parser:  # fmt: skip
    """Make the command line of a client program: its description, then every client option."""
    parser = cli.Parser(prog=prog, description=description, epilog=epilog)
    add_client_options(parser, environ, many_hosts=many_hosts)
    return parser


def add_client_options(
    parser: cli.Parser, environ: Mapping[str, str], *, many_hosts: bool = False
) -> None:
    """Add the connection flags every client has.

    With ``many_hosts`` (the fleet), ``--host`` may be given more than once, each ``HOST`` or
    ``HOST:PORT``; ``args.host`` is then a list when it was given.
    """
    add = cli.add_option
    if many_hosts:
        add(parser, environ, "--host", convert=cli.broker_address, default=DEFAULT_HOST,
            action=cli.Repeatable, help="broker host, or HOST:PORT; given more than once, "
            "a fleet's devices are spread over the brokers in turn")  # fmt: skip
    else:
        add(parser, environ, "--host", convert=cli.broker_address, default=DEFAULT_HOST,
            help="broker host, or HOST:PORT")  # fmt: skip
    add(parser, environ, "--port", convert=cli.port, default=DEFAULT_PORT, help="broker port")
    add(
        parser,
        environ,
        "--ping-topic",
        convert=cli.topic_name,
        default=PING_TOPIC,
        help="topic the pings go to",
    )
    add(
        parser,
        environ,
        "--pong-topic",
        convert=cli.topic_name,
        default=PONG_TOPIC,
        help="topic the echoes come back on",
    )
    add(parser, environ, "--qos", convert=cli.qos, default=0, help="QoS for publish and subscribe")
    add(
        parser,
        environ,
        "--reconnect-interval",
        convert=cli.positive_seconds,
        default=RECONNECT_INTERVAL,
        help="seconds between connection attempts",
    )
    add(
        parser,
        environ,
        "--keepalive",
        convert=cli.keepalive,
        default=10,
        help="MQTT keepalive in seconds; a silent broker is dropped after about 1.5x this",
    )
    add(
        parser,
        environ,
        "--client-id",
        convert=cli.mqtt_string,
        default=None,
        help=(
            "MQTT client id (default: the program name and a random suffix; under supervisord "
            "the program name is appended, so that each program has its own)"
        ),
    )
    add(parser, environ, "--username", convert=cli.mqtt_string, default=None,
        help="MQTT user name")  # fmt: skip
    add(
        parser,
        environ,
        "--password",
        convert=cli.mqtt_string,
        default=None,
        secret=True,
        help="MQTT password (prefer the environment variable to the flag)",
    )
    cli.add_flag(parser, environ, "--tls", help="connect with TLS (the broker's --tls-port)")
    add(
        parser,
        environ,
        "--tls-ca",
        convert=str,
        default=None,
        help="CA certificate file that signed the broker's certificate (implies --tls)",
    )
    add(
        parser,
        environ,
        "--session",
        convert=session_kind,
        default="clean",
        help="clean: a fresh session each connection; persistent: the broker keeps it (and "
        "queues QoS 1/2 messages) while the client is away; client ids become stable",
    )
    add(
        parser,
        environ,
        "--session-expiry",
        convert=cli.interval_seconds,
        default=3600,
        help="MQTT 5, --session persistent: seconds the broker keeps the session after a loss",
    )
    add(
        parser,
        environ,
        "--protocol",
        short="-V",
        convert=protocol,
        default=5,
        help="MQTT version: 5 (falls back to 3.1.1 once if the broker refuses it) or 3.1.1",
    )
    add(
        parser,
        environ,
        "--transport",
        convert=transport,
        default="tcp",
        help="tcp, or websockets: MQTT over WebSockets (wss with --tls), as browsers speak it;"
        " --port is then the broker's WebSocket port (ours: --ws-port, 10080 under supervisord)",
    )
    add(parser, environ, "--ws-path", convert=ws_path, default="/mqtt",
        help="with --transport websockets: the path of the upgrade")  # fmt: skip
    add(parser, environ, "--log-level", convert=cli.log_level, default="INFO", help="log level")


def transport(text: str) -> Literal["tcp", "websockets"]:
    """Parse a transport: tcp, or websockets (ws)."""
    value = text.strip().lower()
    if value == "tcp":
        return "tcp"
    if value in ("websockets", "websocket", "ws"):
        return "websockets"
    raise ValueError(f"transport must be tcp or websockets, got {text!r}")


def ws_path(text: str) -> str:
    """Parse a WebSocket path: it starts with /, and is printable ASCII without spaces."""
    if not text.startswith("/") or not all(33 <= ord(c) < 127 for c in text):
        raise ValueError(f"a WebSocket path starts with / and has no spaces, got {text!r}")
    return text


def session_kind(text: str) -> str:
    """Parse a session kind: clean or persistent."""
    value = text.strip().lower()
    if value not in ("clean", "persistent"):
        raise ValueError(f"session must be clean or persistent, got {text!r}")
    return value


def protocol(text: str) -> int:
    """Parse an MQTT version: 5 (or 5.0) gives 5, 3.1.1 (or 4) gives 4, the protocol level."""
    value = text.strip()
    if value in ("5", "5.0"):
        return 5
    if value in ("3.1.1", "311", "4"):
        return 4
    raise ValueError(f"MQTT version must be 5 or 3.1.1, got {text!r}")


def client_id(
    given: str | None, role: str, environ: Mapping[str, str], *, stable: bool = False
) -> str:
    """Return the MQTT client id: ``role`` and a random suffix, or the given one.

    ``stable`` (a persistent session) makes the default ``role`` and the host name, so that a
    restarted process finds its session again.

    Under supervisord (which names each program in ``SUPERVISOR_PROCESS_NAME``) a given id gets
    the program's name appended: supervisord hands one ``MQTT_CLIENT_ID`` to every program, and
    two clients with one id would take the connection from each other for ever.
    """
    if not given:
        return f"{role}-{socket.gethostname()}" if stable else f"{role}-{secrets.token_hex(4)}"
    program = environ.get("SUPERVISOR_PROCESS_NAME")
    return f"{given}-{program}" if program else given


def client_settings(
    parser: cli.Parser, args: argparse.Namespace, role: str, environ: Mapping[str, str]
) -> ClientSettings:
    """Build ClientSettings from parsed flags; a bad combination is a usage error."""
    if args.tls_ca is not None:
        try:
            ssl.create_default_context(cafile=args.tls_ca)
        except ssl.SSLError as exc:
            # OpenSSL's words for it: "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate ...".
            why = ("holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                   if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else str(exc))  # fmt: skip
            parser.error(f"--tls-ca {args.tls_ca}: {why}")
        except OSError as exc:
            parser.error(f"--tls-ca {args.tls_ca}: {exc.strerror or exc}")
    first = args.host[0] if isinstance(args.host, list) else args.host
    try:
        host, port = cli.split_address(cli.broker_address(first), args.port)
        return ClientSettings(
            host=host,
            port=port,
            ping_topic=args.ping_topic,
            pong_topic=args.pong_topic,
            qos=args.qos,
            reconnect_interval=args.reconnect_interval,
            keepalive=args.keepalive,
            client_id=client_id(args.client_id, role, environ, stable=args.session == "persistent"),
            username=args.username,
            password=args.password,
            tls=args.tls or args.tls_ca is not None,
            tls_ca=args.tls_ca,
            log_level=args.log_level,
            protocol=args.protocol,
            persistent=args.session == "persistent",
            session_expiry=args.session_expiry,
            transport=args.transport,
            ws_path=args.ws_path,
        )
    except ValueError as exc:
        parser.error(str(exc))


def make_client(
    settings: ClientSettings, protocol: int | None = None, *, manual_ack: bool = False
) -> Client:
    """Create the one aiomqtt client a process reuses across reconnects.

    ``protocol`` overrides the settings' MQTT version (the 3.1.1 fallback). With ``manual_ack``
    received messages wait for :meth:`Client.ack`. Exits 70 with one line if aiomqtt no longer
    has the internals :class:`Client` relies on.
    """
    level = settings.protocol if protocol is None else protocol
    v5 = level == 5
    client = Client(
        settings.host,
        settings.port,
        identifier=settings.client_id,
        username=settings.username,
        password=settings.password,
        keepalive=settings.keepalive,
        # How long to wait for CONNACK and for acknowledgements before giving up on the link.
        timeout=5,
        socket_options=NODELAY,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # Clean: a fresh session every time (3.1.1's clean session; 5's clean start, and a
        # session that ends with the connection, expiry 0). Persistent: the broker keeps it.
        clean_session=None if v5 else not settings.persistent,
        clean_start=(not settings.persistent) if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=session_properties(settings) if v5 else None,
        # paho's defaults (20 in flight) and aiomqtt's (10 pending calls) throttle QoS 1/2 echo.
        max_inflight_messages=Client.max_inflight,
        tls_context=ssl.create_default_context(cafile=settings.tls_ca) if settings.tls else None,
        transport=settings.transport,
        websocket_path=settings.ws_path if settings.transport == "websockets" else None,
    )
    missing = unsupported(client)
    if missing:
        sys.stderr.write(
            f"aiomqtt {getattr(aiomqtt, '__version__', '?')} has no {', '.join(missing)}: "
            "this version is not supported (pyproject.toml pins the ones that are).\n"
        )
        sys.exit(EXIT_SOFTWARE)
    client.protocol_level = level
    client.address = settings.address
    if manual_ack:
        client.acknowledge_manually()
    return client


def session_properties(settings: ClientSettings) -> Properties | None:
    """MQTT 5 CONNECT properties: the session expiry of a persistent session."""
    if not settings.persistent:
        return None
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = settings.session_expiry
    return properties


def fallback(settings: ClientSettings, *, manual_ack: bool = False) -> Callable[[], Client] | None:
    """Return the maker of the 3.1.1 client that replaces a refused MQTT 5 one (None: 3.1.1)."""
    if settings.protocol != 5:
        return None
    return lambda: make_client(settings, 4, manual_ack=manual_ack)
