"""Settings and construction of the aiomqtt client both clients use."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import math
import secrets
import socket
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common import cli
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
        convert=cli.positive_int,
        default=10,
        help="MQTT keepalive in seconds; a silent broker is dropped after about 1.5x this",
    )
    add(
        parser,
        environ,
        "--client-id",
        convert=str,
        default=None,
        help=(
            "MQTT client id (default: the program name and a random suffix; under supervisord "
            "the program name is appended, so that each program has its own)"
        ),
    )
    add(parser, environ, "--username", convert=str, default=None, help="MQTT user name")
    add(
        parser,
        environ,
        "--password",
        convert=str,
        default=None,
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
        convert=cli.positive_int,
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
    add(parser, environ, "--log-level", convert=cli.log_level, default="INFO", help="log level")


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
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--tls-ca {args.tls_ca}: {getattr(exc, 'strerror', None) or exc}")
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
        )
    except ValueError as exc:
        parser.error(str(exc))


class ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker ended the connection before it answered the CONNECT."""


INTERNALS: dict[str, type | tuple[type, ...]] = {
    "_connected": asyncio.Future,
    "_disconnected": asyncio.Future,
    "_pending_subscribes": dict,
    "_client": mqtt.Client,
    "_lock": asyncio.Lock,
    "_misc_task": (asyncio.Task, type(None)),
}
"""aiomqtt's private attributes that :class:`Client` relies on; checked when a client is made."""

OVERRIDDEN = ("_client_connect", "_on_connect", "_on_disconnect")
"""aiomqtt's private methods that :class:`Client` overrides: were one renamed, the override
would never be called. Checked with INTERNALS."""


class Client(aiomqtt.Client):
    """aiomqtt's Client with its fixes; the only place that touches aiomqtt's private names.

    - A connect fails at once when the broker hangs up before CONNACK. aiomqtt 2.5 ignores such
      a disconnect and waits out its whole timeout (5 s here), so a broker that accepts and
      closes connections would stretch the 100 ms reconnect loop to 5 s per attempt.
    - The error a lost connection leaves in aiomqtt's ``_disconnected`` future is marked as
      seen when it is set. Nobody reads it when the connection ends by another error first
      (no SUBACK, a cancelled task), or when the broker hangs up right after CONNACK (aiomqtt's
      ``__aenter__`` then replaces the future), and asyncio later logs "Future exception was
      never retrieved" at ERROR: a stray line for an outage the reconnect loop reports itself.
      Whoever awaits the future still gets the error.
    - A lost connection fails every subscription still waiting for its SUBACK at once. aiomqtt
      leaves them waiting out the whole timeout, so a broker that hangs up right after CONNACK
      would hold the 100 ms reconnect loop for 5 s per attempt.
    - After a lost connection the next connect waits for its own CONNACK, and reports a
      refusing one: aiomqtt left the last connection's CONNACK standing (see __aenter__).
    - The subscriptions in :attr:`at_connack` are sent from paho's CONNACK callback, before
      paho sends again the QoS 1 and 2 messages the last connection left unacknowledged (see
      :meth:`subscribed`).
    - A connect cancelled while paho connects in aiomqtt's executor thread waits for that
      thread, then says DISCONNECT and closes (see :meth:`_abandon`).
    - Manual acknowledgement (paho's ``manual_ack``), which aiomqtt 2.5 does not expose
      (empicano/aiomqtt#345): see :meth:`ack`.
    - :attr:`lost`, done when the connection ends, for what a lost connection does not end in
      aiomqtt: a publish waiting for its confirmation waits out its whole timeout.
    """

    protocol_level = 4
    """4 (MQTT 3.1.1) or 5, as made by make_client."""
    disconnect_reason: int | None = None
    """The reason code of the last disconnect (the broker's, in an MQTT 5 DISCONNECT)."""
    disconnect_text: str | None = None
    """The reason string of the broker's MQTT 5 DISCONNECT, if it gave one."""
    at_connack: Sequence[tuple[str, int]] = ()
    """(filter, QoS) pairs to subscribe to as soon as a connection is accepted."""
    _early: dict[str, asyncio.Future[Any]] | None = None
    _attempt: concurrent.futures.Future[None]
    """The current connect in aiomqtt's executor thread: not begun, under way, or over."""

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done once the current connection has ended (an error: how it was lost)."""
        return self._disconnected

    def acknowledge_manually(self) -> None:
        """Leave the PUBACK (QoS 1) or PUBCOMP (QoS 2) of each received message to :meth:`ack`.

        By default paho acknowledges a message as soon as it is queued for the application,
        before the application has seen it: a process that dies then has lost a message the
        broker counts as delivered.
        """
        self._client.manual_ack_set(True)

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge ``message`` (nothing to do at QoS 0).

        Acknowledge in the order the messages came [MQTT-4.6.0-2].
        """
        if message.qos:
            self._client.ack(message.mid, message.qos)

    async def __aenter__(self) -> Self:
        """Connect, and wait for this connection's own CONNACK.

        aiomqtt renews its CONNACK future only in a clean exit. After a lost connection it
        stayed done: the next connect went on before its CONNACK, and ignored a refusing one
        (a reconnect "not authorized" said "connection closed before SUBACK"). It is renewed
        here, before the connect, not when the connection is lost: a CONNACK and a loss read
        while the connect is still under way are then this connection's.
        """
        if not self._lock.locked():  # else aiomqtt refuses: entered twice at once
            if self._connected.done():
                self._connected = asyncio.Future()
            self._attempt = concurrent.futures.Future()
        try:
            return await super().__aenter__()
        except asyncio.CancelledError:
            await self._abandon()
            raise

    def _client_connect(self) -> None:
        """Connect, in aiomqtt's executor thread, unless the attempt was abandoned first."""
        attempt = self._attempt
        if not attempt.set_running_or_notify_cancel():
            return
        try:
            super()._client_connect()
        finally:
            attempt.set_result(None)

    async def _abandon(self) -> None:
        """After a cancelled connect: let a connect still in its thread end, then close it.

        A cancellation does not stop the thread. The connect went on after a stop, and then
        scheduled aiomqtt's reader and its once-a-second task on the loop: a probe stopped
        during a slow name lookup logged "Task was destroyed but it is pending!" at exit, and
        paho "Event loop is closed". aiomqtt also kept its lock, as if still connected.
        """
        if not self._attempt.cancel():  # under way, or over
            await asyncio.wrap_future(self._attempt)
            await asyncio.sleep(0)  # what the connect scheduled on the loop runs now
        if self._connected.cancelled():  # with the wait for it: paho's callbacks read it
            self._connected = asyncio.Future()
        self._client.disconnect()  # paho closes the socket once its DISCONNECT is out
        if self._misc_task is not None:
            self._misc_task.cancel()
        if self._lock.locked():
            self._lock.release()

    async def subscribed(self, topic: str, qos: int) -> Any:  # noqa: ANN401 - aiomqtt's
        """Subscribe to ``topic`` and return the SUBACK's codes, as ``subscribe`` does.

        A topic in :attr:`at_connack` was subscribed to from the CONNACK callback: this waits
        for that SUBACK. paho sends again what the last connection left unacknowledged right
        after that callback, before a coroutine can subscribe, and the echo's answer to such a
        ping could reach the broker before the SUBSCRIBE that would deliver it: lost, at
        QoS 1, after every broker restart. From the callback, the SUBSCRIBE goes first.
        """
        early = self._early.pop(topic, None) if self._early is not None else None
        if early is None:
            return await self.subscribe(topic, qos=qos, timeout=math.inf)
        try:
            return await early
        finally:
            for mid, pending in list(self._pending_subscribes.items()):
                if pending is early:  # waited for no more (a timeout): its SUBACK finds nobody
                    del self._pending_subscribes[mid]

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self._early = None
        if not self._connected.done() and reason_code == mqtt.CONNACK_ACCEPTED:
            self._early = {topic: self._subscribe_now(topic, qos) for topic, qos in self.at_connack}
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _subscribe_now(self, topic: str, qos: int) -> asyncio.Future[Any]:
        """Send SUBSCRIBE at once (in a paho callback); the future gets the SUBACK's codes."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Seen, whoever waits: a link that failed on an earlier topic never waits for it.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        result, mid = self._client.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            future.set_exception(aiomqtt.MqttCodeError(result, "Could not subscribe to topic"))
        else:
            self._pending_subscribes[mid] = future
        return future

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.disconnect_reason = getattr(reason_code, "value", None)
        self.disconnect_text = getattr(properties, "ReasonString", None)
        if not self._connected.done():
            self._connected.set_exception(
                ClosedBeforeConnack(f"connection closed before CONNACK ({reason_code})")
            )
            # Seen, like the disconnect error below: nobody awaits it if the wait was cancelled.
            self._connected.exception()
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()
        for pending in self._pending_subscribes.values():
            if not pending.done():
                pending.set_exception(
                    aiomqtt.MqttError(f"connection closed before SUBACK ({reason_code})")
                )


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
        max_inflight_messages=1000,
        tls_context=ssl.create_default_context(cafile=settings.tls_ca) if settings.tls else None,
    )
    missing = [n for n, kind in INTERNALS.items() if not isinstance(getattr(client, n, None), kind)]
    missing += [n for n in OVERRIDDEN if not callable(getattr(aiomqtt.Client, n, None))]
    if missing:
        sys.stderr.write(
            f"aiomqtt {getattr(aiomqtt, '__version__', '?')} has no {', '.join(missing)}: "
            "this version is not supported (pyproject.toml pins the ones that are).\n"
        )
        sys.exit(EXIT_SOFTWARE)
    client.protocol_level = level
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


def closed_before_connack(exc: aiomqtt.MqttError) -> bool:
    """Tell whether the broker hung up on a CONNECT without answering it.

    A broker that speaks only 3.1.1 may do that to an MQTT 5 CONNECT (RabbitMQ 3.10 does).
    """
    return isinstance(exc, ClosedBeforeConnack)


def refuses_mqtt5(exc: aiomqtt.MqttError) -> bool:
    """Tell whether a connect failed because the broker does not speak MQTT 5.

    That is CONNACK 0x84, or 3.1.1's 0x01, which paho reads as 0x84.
    """
    code = getattr(exc, "rc", None)
    return isinstance(exc, aiomqtt.MqttCodeError) and getattr(code, "value", code) == 0x84
