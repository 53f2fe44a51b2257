"""Build and run the amqtt broker on a socket we bind ourselves."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.errors import MQTTError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0
from amqtt.session import Session

from broker import protocol
from broker.handler import CORK, StrictHandler
from broker.protocol import ProtocolViolation
from broker.settings import BrokerSettings, Limits

logger = logging.getLogger(__name__)


class BindError(Exception):
    """The broker could not listen on the requested address."""


def bind(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket, turning each OS error into a one-line reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    # Create the socket with IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted
    # sockets whose proto is IPPROTO_TCP, and socket.create_server() leaves it 0. Without
    # NODELAY, a pong that follows another packet to the same client waits on Nagle.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # SO_REUSEADDR: a restart never waits out TIME_WAIT (it does not allow two listeners).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"port {port} on {host} is already in use") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError(f"address {host} is not an address of this machine") from exc
        if exc.errno == errno.EACCES:
            raise BindError(f"permission denied to listen on {where}") from exc
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return sock


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound socket and, for the TLS listener, its TLS context."""

    sock: socket.socket
    tls: ssl.SSLContext | None = None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Build a server TLS context (TLS 1.2 or newer) for the certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise BindError(f"cannot load TLS certificate {cert} and key {key}: {exc}") from exc
    return context


def amqtt_config(settings: BrokerSettings, listeners: dict[str, Listener]) -> dict[str, Any]:
    """Return the amqtt configuration: our listeners, our plugins, nothing on disk."""
    config: dict[str, Any] = {"listeners": {}}
    for name, listener in listeners.items():
        host, port = listener.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        # max_connections stays 0 for amqtt, whose limit makes extra clients wait in silence;
        # PingPongBroker refuses them at once instead.
        config["listeners"][name] = {"type": "tcp", "bind": f"{shown}:{port}"}
    # amqtt's loader needs an auth plugin whenever `plugins` is given, or it refuses everyone.
    auth: dict[str, Any] = {"broker.plugins.AllowAnonymous": {}}
    if settings.password_file is not None:
        auth = {
            "amqtt.plugins.authentication.FileAuthPlugin": {
                "password_file": str(settings.password_file)
            }
        }
    config["plugins"] = {**auth, "broker.plugins.ConnectionLog": {}}
    return config


class PingPongBroker(Broker):
    """amqtt's Broker, serving on a socket bound before it starts, made MQTT 3.1.1 conformant.

    Each override below names the amqtt 0.12.1 behaviour it replaces and the statement of the
    specification it implements; tests/test_conformance.py checks each one on the wire.
    """

    def __init__(
        self,
        config: dict[str, Any],
        listeners: dict[str, Listener],
        limits: Limits,
        max_connections: int = 0,
    ) -> None:
        """Create the broker; must run inside the event loop (amqtt takes the running loop)."""
        super().__init__(config)
        self._listeners = listeners
        self._limits = limits
        self._max_connections = max_connections
        self._connections = 0
        self._refused = 0
        self._live: dict[str, asyncio.Event] = {}
        """Client id -> set when that client's current connection has fully ended."""
        self._match_cache: dict[str, list[tuple[Session, int]]] = {}

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,  # noqa: ARG002 - amqtt's signature; the socket is already bound
        port: int,  # noqa: ARG002
        ssl_context: Any,  # noqa: ANN401, ARG002 - ours is in self._listeners
    ) -> asyncio.Server:
        # Replaces amqtt's Broker._create_server_instance, which binds by host and port itself.
        # We bind first so that a taken port is a clear error before amqtt is involved.
        if listener_type != ListenerType.TCP:
            raise BindError(f"unsupported listener type {listener_type}")
        listener = self._listeners[listener_name]
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            sock=listener.sock,
            ssl=listener.tls,
            ssl_handshake_timeout=self._limits.connect_timeout if listener.tls else None,
        )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """Serve one TCP connection, or refuse it at once when --max-connections are in use."""
        # amqtt's own limit (a semaphore) makes the extra client wait without a word.
        if self._max_connections and self._connections >= self._max_connections:
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                logger.warning(
                    "Refused a connection: %d of --max-connections %d in use (%d refused so far).",
                    self._connections, self._max_connections, self._refused,
                )  # fmt: skip
            writer.close()
            return
        self._connections += 1
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self._connections -= 1

    # --- connecting ------------------------------------------------------------------------

    async def _initialize_client_session(
        self,
        reader: Any,  # noqa: ANN401 - amqtt's ReaderAdapter
        writer: Any,  # noqa: ANN401 - amqtt's WriterAdapter
        remote_address: str,
        remote_port: int,
    ) -> tuple[StrictHandler, Session]:
        # Replaces amqtt's version, which parses the first packet as CONNECT whatever its type,
        # waits for it for ever, and leaves the connection open when it fails.
        where = f"{remote_address}:{remote_port}"
        try:
            async with asyncio.timeout(self._limits.connect_timeout):
                frame = await protocol.read_frame(reader, self._limits.max_packet_size)
            protocol.check(frame, connected=False)
            protocol.check_connect(frame)
            handler, session = await StrictHandler.init_from_connect(
                BufferReader(frame.raw), writer, self.plugins_manager
            )
        except TimeoutError:
            await _close(writer)
            logger.info("Closed %s: no CONNECT within %g s.", where, self._limits.connect_timeout)
            raise MQTTError("connect timeout") from None
        except ProtocolViolation as exc:
            await _close(writer)
            logger.warning("Closed %s: %s.", where, exc)
            raise MQTTError(str(exc)) from None
        except (EOFError, asyncio.IncompleteReadError, ConnectionError) as exc:
            await _close(writer)
            raise MQTTError("connection closed before CONNECT") from exc
        except MQTTError:
            await _close(writer)  # amqtt refused it with a CONNACK code and says why
            raise
        if not await self._authenticate(session, None):
            # Before take-over and session lookup: a client that fails to log in must not
            # knock off, or end the session of, the client whose id it used.
            logger.warning("Client %s from %s refused: not authorized.", session.client_id, where)
            with contextlib.suppress(ConnectionError, OSError):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await _close(writer)
            raise MQTTError("not authorized")
        handler.max_packet_size = self._limits.max_packet_size
        handler.router = self
        await self._take_over(session.client_id)
        if session.clean_session:
            # [MQTT-3.1.2-6]: a clean session starts empty and ends with the connection.
            await self._delete_session(session.client_id)
            session.parent = 0
        elif (
            session.client_id in self._sessions
            and not self._sessions[session.client_id][0].clean_session
        ):
            # [MQTT-3.2.2-2]: resume the stored session, with this connection's will and
            # keepalive, and say so in CONNACK (session present = 1).
            stored, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                         "keep_alive", "username", "password", "remote_address",
                         "remote_port"):  # fmt: skip
                setattr(stored, name, getattr(session, name))
            session = stored
            session.parent = 1
        else:
            session.parent = 0
        return handler, session

    async def _take_over(self, client_id: str) -> None:
        # amqtt leaves the existing connection of a client id open when a clean session
        # connects with the same id: the old client stops receiving but can still publish.
        # [MQTT-3.1.4-2]: the server must disconnect the existing client first.
        done = self._live.get(client_id)
        entry = self._sessions.get(client_id)
        if done is None or entry is None or done.is_set():
            return
        logger.info("Client %s connected again: closing its previous connection.", client_id)
        await entry[1].stop()
        try:
            await asyncio.wait_for(done.wait(), 2.0)
        except TimeoutError:
            logger.warning("Previous connection of %s did not end within 2 s.", client_id)

    async def _handle_client_session(  # noqa: PLR0917 - amqtt's signature
        self,
        reader: Any,  # noqa: ANN401 - amqtt's ReaderAdapter
        writer: Any,  # noqa: ANN401 - amqtt's WriterAdapter
        client_session: Session,
        handler: StrictHandler,
        server: Any,  # noqa: ANN401, ARG002 - amqtt's Server
        listener_name: str,  # noqa: ARG002
    ) -> None:
        # Replaces amqtt's version, which on connect sends the client the retained messages of
        # every subscription of every client [against MQTT-3.3.1-6], waits for queued QoS 1/2
        # messages to be acknowledged before reading, and authenticates only after take-over.
        client_id = client_session.client_id
        done = asyncio.Event()
        self._live[client_id] = done
        try:
            if client_session.transitions.is_connected():
                client_session.transitions.disconnect()
            client_session.transitions.connect()
            handler.attach(client_session, reader, writer)
            self._sessions[client_id] = (client_session, handler)
            await handler.mqtt_connack_authorize(True)  # authenticated in _initialize_...
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=client_session
            )
            await handler.start()
            # Messages queued while a persistent session was offline [MQTT-3.1.2-5]: sent as
            # ordinary deliveries (RETAIN 0, [MQTT-3.3.1-9]), without holding up the reader.
            while not client_session.retained_messages.empty():
                queued = client_session.retained_messages.get_nowait()
                handler.deliver(queued.topic, queued.data, queued.qos, retain=False)
            try:
                await self._client_message_loop(client_session, handler)
            except Exception as exc:
                # As in the reader: a bug must close this connection, not leave it open with
                # nobody serving its subscriptions (asyncio would only log it).
                logger.error(  # noqa: TRY400 - one line; the traceback at DEBUG
                    "Client %s closed: internal error %r.", client_id, exc,
                    exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
                )  # fmt: skip
                await self._stop_handler(handler)
        finally:
            if client_session.clean_session and self._sessions.get(client_id, (None,))[0] is (
                client_session
            ):
                # [MQTT-3.1.2-6]: a clean session ends with its connection (amqtt keeps it
                # until its session monitor runs, up to a second later).
                await self._cleanup_session(client_id)
            done.set()
            if self._live.get(client_id) is done:
                del self._live[client_id]

    # --- publishing ------------------------------------------------------------------------

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: StrictHandler,  # noqa: ARG002 - amqtt's signature
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        # Replaces amqtt's version, which drops the publish QoS (so a QoS 0 message reached a
        # QoS 2 subscriber at QoS 2, against MQTT-3.8.4-6) and fires two plugin events per
        # message that nothing here listens to. Topic names were checked when read.
        message = wait_deliver.result()
        if message is not None:
            retain = message.publish_packet is not None and message.publish_packet.retain_flag
            await self.publish(
                client_session, message.topic, bytes(message.data), message.qos, retain=retain
            )
        return True

    async def route(self, source: Session, publish: protocol.Publish) -> None:
        """Deliver a QoS 0/1 PUBLISH straight from its reader to every matching subscriber."""
        await self.publish(
            source, publish.topic, publish.payload, publish.qos, retain=publish.retain
        )

    async def publish(
        self, source: Session, topic: str, data: bytes, qos: int, *, retain: bool
    ) -> None:
        """Handle a client's PUBLISH: deliver it now, and keep it when RETAIN is set."""
        if topic.startswith("$SYS"):
            # $SYS is the server's own (section 4.7.2); a client's publish there is dropped.
            logger.warning("Client %s published to %s: dropped.", source.client_id, topic)
            return
        await self._deliver(source, topic, data, qos)
        if retain:
            # [MQTT-3.3.1-5]: keep it for future subscribers; an empty payload clears it [-10].
            CORK.release()  # what was held goes first; retaining may let other tasks run
            await self.retain_message(source, topic, data, qos)

    async def _run_broadcast(self, running_tasks: Any) -> None:  # noqa: ANN401, ARG002 - a deque
        # Replaces amqtt's version, which ran a task per subscriber at the subscription's QoS.
        # Only wills and plugin broadcasts still come through amqtt's queue.
        broadcast = await self._broadcast_queue.get()
        await self._deliver(
            broadcast["session"], broadcast["topic"], broadcast["data"], broadcast.get("qos")
        )

    async def _deliver(
        self, source: Session | None, topic: str, data: bytes, publish_qos: int | None
    ) -> None:
        """Send a message to every matching subscriber, or queue it for an offline session.

        Each delivery's QoS is min(publish QoS, granted QoS) [MQTT-3.8.4-6, section 3.3.5]; a
        client whose filters overlap gets one copy at the highest granted QoS [MQTT-3.3.5-1].
        QoS 0 is encoded once and written at once; QoS 1/2 start their flow as a task.
        """
        frame: bytes | None = None
        for target, granted in self._matches_for(topic):
            qos = granted if publish_qos is None else min(publish_qos, granted)
            if not target.transitions.is_connected():
                if not target.clean_session and qos > QOS_0:
                    # [MQTT-3.1.2-5]: queue QoS 1/2 messages for an offline persistent session.
                    broadcast = {"session": source, "topic": topic, "data": data}
                    CORK.release()  # as above: queueing may let other tasks run
                    await self._retain_broadcast_message(broadcast, qos, target)
                continue
            handler = self._get_handler(target)
            if handler is None:
                continue
            if qos == QOS_0:
                if frame is None:
                    frame = protocol.encode_publish_qos0(topic, data)
                handler.write_frame(frame)
            else:
                handler.deliver(topic, data, qos, retain=False)

    def _matches_for(self, topic: str) -> list[tuple[Session, int]]:
        cached = self._match_cache.get(topic)
        if cached is not None:
            return cached
        best: dict[str, tuple[Session, int]] = {}
        for topic_filter, subscriptions in self._subscriptions.items():
            if not self._matches(topic, topic_filter):
                continue
            for session, granted in subscriptions:
                seen = best.get(session.client_id)
                if seen is None or granted > seen[1]:
                    best[session.client_id] = (session, granted)
        result = list(best.values())
        if len(self._match_cache) > 10_000:
            self._match_cache.clear()
        self._match_cache[topic] = result
        return result

    # --- subscriptions ---------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Grant a subscription, unless its filter is invalid or on the deny list (0x80)."""
        topic_filter, _ = subscription
        if any(_denied(topic_filter, pattern) for pattern in self._limits.deny_subscribe):
            logger.info("Client %s may not subscribe to %s.", session.client_id, topic_filter)
            return 0x80
        self._match_cache.clear()
        return int(await super().add_subscription(subscription, session))

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        self._match_cache.clear()
        return int(super()._del_subscription(a_filter, session))

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._match_cache.clear()
        await super()._del_all_subscriptions(session)


def _denied(topic_filter: str, pattern: str) -> bool:
    """Return whether a deny-list ``pattern`` (a topic filter) covers ``topic_filter``.

    The requested filter is matched level by level as if it were a topic name, so ``secret/#``
    denies ``secret``, ``secret/a`` and ``secret/+``.
    """
    wanted = topic_filter.split("/")
    for index, level in enumerate(pattern.split("/")):
        if level == "#":
            return True
        if index >= len(wanted) or level not in ("+", wanted[index]):
            return False
    return len(wanted) == len(pattern.split("/"))


async def _close(writer: Any) -> None:  # noqa: ANN401 - amqtt's WriterAdapter
    """Close a client connection, ignoring a peer that is already gone."""
    with contextlib.suppress(ConnectionError, OSError):
        await writer.close()
