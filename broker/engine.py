"""The engine: amqtt's sessions, subscriptions, retained messages, auth plugins and lifecycle.

This is the only module that reaches into amqtt's state (broker/plugins.py holds what the
broker plugs into amqtt: its auth plugin, and its session and message classes). The connection
layer (broker/connection.py) owns the wire: framing, codecs, keepalive, routing and limits; it
keeps its state here, in amqtt's objects, through the functions below.

amqtt 0.12.1 offers no public API for a broker that does its own I/O, so some names used here
are private. :func:`check_amqtt` verifies every one (listed in :mod:`broker.reliance`), with
the shape expected, before the broker starts. Elsewhere, a session (``amqtt.session.Session``)
is used only through the attributes listed in ``reliance.SESSION_ATTRIBUTES``, checked too.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import amqtt
from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.events import BrokerEvents
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from broker import reliance
from broker.plugins import AllowAnonymous, Incoming, LeanSession, Message, learn_defaults
from broker.reliance import EngineMismatch
from broker.topics import PLAIN, Match, SubOptions, subscribers, topic_matches
from broker.worker import Worker

if TYPE_CHECKING:
    from broker.records import Props

logger = logging.getLogger("broker")

__all__ = ["Engine", "EngineMismatch", "Incoming", "LeanSession", "Message", "Session",
           "check_amqtt"]  # fmt: skip


def check_amqtt() -> None:
    """Raise EngineMismatch, naming the first difference, unless amqtt has what we rely on."""
    reliance.check(
        reliance.Amqtt(str(getattr(amqtt, "__version__", "?")), Broker, Session, BrokerEvents,
                       OutgoingApplicationMessage, IncomingApplicationMessage)
    )  # fmt: skip
    learn_defaults()


Broadcast = Callable[[str, bytes, int | None], object]
"""Deliver a message published by a plugin (topic, payload, QoS or None for each granted)."""


class _Broker(Broker):
    """amqtt's Broker, serving through our connection layer."""

    def __init__(
        self, config: dict[str, Any], servers: dict[str, asyncio.Server], broadcast: Broadcast
    ) -> None:
        super().__init__(config)
        self._ready = servers
        self._broadcast = broadcast

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,  # noqa: ARG002 - amqtt's signature; our socket is bound already
        port: int,  # noqa: ARG002
        ssl_context: Any,  # noqa: ANN401, ARG002 - the connection layer holds its own
    ) -> asyncio.Server:
        if listener_type != ListenerType.TCP:
            raise EngineMismatch(f"unsupported listener type {listener_type}")
        return self._ready[listener_name]

    async def _run_broadcast(self, running_tasks: Any) -> None:  # noqa: ANN401, ARG002 - a deque
        # A plugin's broadcast_message() comes through amqtt's queue; the router delivers it.
        broadcast = await self._broadcast_queue.get()
        data = broadcast["data"]
        self._broadcast(str(broadcast["topic"]), bytes(data or b""), broadcast.get("qos"))


class Engine:
    """amqtt's state behind the few operations the connection layer needs."""

    def __init__(
        self,
        *,
        listeners: list[tuple[str, str]],
        password_file: str | None,
        servers: dict[str, asyncio.Server],
        broadcast: Broadcast,
    ) -> None:
        """Configure amqtt: the (name, "host:port") listeners, anonymous or file auth.

        ``servers`` are the listeners' asyncio servers, made (and not yet serving) by the
        caller: amqtt keeps and closes them; the caller starts serving once the engine runs.
        """
        check_amqtt()
        config: dict[str, Any] = {
            "listeners": {name: {"type": "tcp", "bind": bind} for name, bind in listeners}
        }
        # amqtt's loader needs an auth plugin whenever `plugins` is given, or it refuses all.
        auth: dict[str, Any] = {"broker.plugins.AllowAnonymous": {}}
        if password_file is not None:
            auth = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": password_file}}
        config["plugins"] = auth
        self._config = config
        self._servers = servers
        self._broadcast = broadcast
        self._passwords = Worker() if password_file is not None else None
        """The password thread, where there is a password file to check."""
        self._broker: _Broker | None = None
        self._matches: dict[str, tuple[list[Match], list[tuple[str, list[Match]]]]] = {}
        self._options: dict[tuple[str, str], SubOptions] = {}
        """(client id, filter) -> MQTT 5 subscription options other than the defaults."""
        self._filters: dict[str, set[str]] = {}
        """Client id -> its filters: found without scanning every filter (disconnect storms)."""
        self._retained_props: dict[str, Props] = {}
        """Topic -> the MQTT 5 properties of its retained message (amqtt keeps none)."""
        self._events: set[asyncio.Future[None]] = set()

    @property
    def amqtt_version(self) -> str:
        """The version of amqtt in use."""
        return str(getattr(amqtt, "__version__", "?"))

    @property
    def broker(self) -> _Broker:
        """The running amqtt broker."""
        if self._broker is None:
            raise RuntimeError("the engine has not started")
        return self._broker

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start amqtt over the listeners' servers."""
        broker = _Broker(self._config, self._servers, self._broadcast)
        reliance.check_broker(broker, self.amqtt_version, anonymous=self._passwords is None,
                              allow=AllowAnonymous)  # fmt: skip
        self._broker = broker
        await broker.start()

    async def shutdown(self) -> None:
        """Stop amqtt: plugins, sessions, retained messages, and the listeners' servers."""
        await self.broker.shutdown()
        if self._passwords is not None:
            self._passwords.shutdown()

    # --- sessions -------------------------------------------------------------------------------

    @staticmethod
    def new_session(client_id: str, *, clean: bool, peer: tuple[str, int]) -> Session:
        """Make a new session for a client (an empty id gets a unique one [MQTT-3.1.3-6])."""
        session = LeanSession()
        session.client_id = client_id or f"auto-{os.urandom(8).hex()}"
        session.clean_session = clean
        session.remote_address, session.remote_port = peer
        return session

    def stored(self, client_id: str) -> Session | None:
        """Return the persistent session kept for ``client_id``, if any."""
        entry = self.broker._sessions.get(client_id)
        if entry is None or entry[0].clean_session:
            return None
        return entry[0]

    def keep(self, session: Session) -> None:
        """Make ``session`` the one amqtt knows for its client id."""
        self.broker._sessions[session.client_id] = (session, None)

    def forget(self, client_id: str) -> None:
        """Delete the session of ``client_id`` with its subscriptions and queues."""
        entry = self.broker._sessions.pop(client_id, None)
        if entry is None:
            return
        session = entry[0]
        subscriptions = self.broker._subscriptions
        for topic_filter in self._filters.pop(client_id, ()):
            self.broker._del_subscription(topic_filter, session)
            if not subscriptions.get(topic_filter, True):
                del subscriptions[topic_filter]
            self._options.pop((client_id, topic_filter), None)
        self._matches.clear()
        session.inflight_in.clear()
        session.inflight_out.clear()
        self.drain(session)

    def connected(self, session: Session) -> None:
        """Mark the session connected and tell amqtt's plugins."""
        if session.transitions.is_connected():
            session.transitions.disconnect()
        session.transitions.connect()
        self._fire(BrokerEvents.CLIENT_CONNECTED, session)

    def disconnected(self, session: Session) -> None:
        """Mark the session disconnected and tell amqtt's plugins."""
        session.transitions.disconnect()
        self._fire(BrokerEvents.CLIENT_DISCONNECTED, session)

    def _fire(self, event: str, session: Session) -> None:
        manager = self.broker.plugins_manager
        if event in manager._event_plugin_callbacks:
            task = asyncio.ensure_future(
                manager.fire_event(event, client_id=session.client_id, client_session=session)
            )
            self._events.add(task)
            task.add_done_callback(self._events.discard)

    # --- authentication -------------------------------------------------------------------------

    def authenticate_now(self) -> bool | None:
        """Answer at once where the answer is known; None when the plugins must be asked.

        Without a password file the only auth plugin is AllowAnonymous (checked at start-up),
        which accepts everyone: asking it through amqtt's plugin manager cost a task and a
        gather per CONNECT, a third of what a connect cost the broker.
        """
        return None if self._passwords is not None else True

    async def authenticate(self, session: Session) -> bool:
        """Ask amqtt's auth plugins; password checks run in a worker thread, a few at a time."""
        if self._passwords is None:
            return bool(await self.broker._authenticate(session, None))
        return await self._passwords.run(lambda: self._authenticate_in_thread(session))

    async def reload_passwords(self) -> int:
        """Re-read the password file into amqtt's file plugin; return how many users it has.

        In the password threads' pool, so that no check runs against a half-read file. Raise
        EngineMismatch if amqtt's plugin no longer reads its file the way this relies on.
        """
        # Imported here: only a broker with a password file reloads one.
        from amqtt.plugins.authentication import FileAuthPlugin  # noqa: PLC0415

        if not callable(getattr(FileAuthPlugin, "_read_password_file", None)):
            raise EngineMismatch(f"amqtt {amqtt.__version__}: FileAuthPlugin cannot re-read")
        plugins = [p for p in self.broker.plugins_manager._auth_plugins
                   if isinstance(p, FileAuthPlugin)]  # fmt: skip
        if not plugins:
            return 0

        def reread() -> int:
            for plugin in plugins:
                plugin._users = {}
                plugin._read_password_file()
            return sum(len(plugin._users) for plugin in plugins)

        if self._passwords is None:
            return reread()
        return await self._passwords.run(reread)

    def _authenticate_in_thread(self, session: Session) -> bool:
        # A loop of the worker thread's own: the plugins' coroutines are CPU work (argon2) and
        # touch nothing of the broker's loop.
        return bool(asyncio.run(self.broker._authenticate(session, None)))

    # --- subscriptions --------------------------------------------------------------------------

    def subscribe(
        self, session: Session, topic_filter: str, qos: int, options: SubOptions | None = None
    ) -> tuple[int, bool]:
        """Add or replace a subscription: (granted QoS, whether it existed before).

        amqtt's table keeps (session, QoS) per filter; MQTT 5's options ride beside it. The
        entry is made as amqtt's add_subscription makes it, less what that does and the broker
        has done before: the codec checked the filter [MQTT-4.7.1], no topic plugin is loaded
        (checked at start-up), and no max-qos is set. add_subscription, a coroutine, cost a
        quarter of what a CONNECT and SUBSCRIBE cost the broker.
        """
        self._matches.clear()
        filters = self._filters.setdefault(session.client_id, set())
        existed = topic_filter in filters
        if existed:  # [MQTT-3.8.4-3]: a new subscription replaces the old one
            self.broker._del_subscription(topic_filter, session)
        else:
            filters.add(topic_filter)
        self.broker._subscriptions.setdefault(topic_filter, []).append((session, qos))
        key = (session.client_id, topic_filter)
        if options is None or options == PLAIN:
            self._options.pop(key, None)
        else:
            self._options[key] = options
        return qos, existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        """Remove a subscription; return whether there was one."""
        subscriptions = self.broker._subscriptions
        existed = bool(self.broker._del_subscription(topic_filter, session))
        if existed and not subscriptions.get(topic_filter):
            subscriptions.pop(topic_filter, None)
        self._filters.get(session.client_id, set()).discard(topic_filter)
        self._options.pop((session.client_id, topic_filter), None)
        self._matches.clear()
        return existed

    def has_subscribers(self, topic: str) -> bool:
        """Whether any subscription, plain or shared, matches ``topic``."""
        plain, shared = self.matches(topic)
        return bool(plain or shared)

    def matches(self, topic: str) -> tuple[list[Match], list[tuple[str, list[Match]]]]:
        """Return the subscribers of ``topic``: each session once, each shared group's members.

        A session whose filters overlap gets one delivery, at its highest granted QoS, with the
        identifiers of every matching subscription [MQTT-3.3.5-1]. Cached per topic until the
        subscriptions change.
        """
        found = self._matches.get(topic)
        if found is not None:
            return found
        found = subscribers(topic, self.broker._subscriptions, self._options)
        if len(self._matches) >= 10_000:
            self._matches.clear()
        self._matches[topic] = found
        return found

    def counts(self) -> tuple[int, int]:
        """How many sessions amqtt keeps, and how many subscriptions in all."""
        broker = self.broker
        subscriptions = broker._subscriptions.values()
        return len(broker._sessions), sum(len(s) for s in subscriptions)

    def retained_count(self) -> int:
        """How many retained messages amqtt keeps."""
        return len(self.broker._retained_messages)

    # --- retained messages ----------------------------------------------------------------------

    async def retain(
        self, source: Session | None, topic: str, data: bytes, qos: int, props: Props | None = None
    ) -> None:
        """Keep ``data`` as the retained message of ``topic``; empty data clears it.

        Its MQTT 5 properties are kept with it (section 3.3.1.3), and its expiry goes on
        counting down while it is kept [MQTT-3.3.2-6].
        """
        if data and props is not None:
            self._retained_props[topic] = props
        else:
            self._retained_props.pop(topic, None)
        await self.broker.retain_message(source, topic, data, qos)

    def retained(self, topic_filter: str, now: float) -> list[tuple[str, bytes, int, Props | None]]:
        """Return the retained messages matching ``topic_filter``: (topic, payload, QoS, props).

        One whose message expiry has passed (``now``, time.monotonic()) is deleted instead
        [MQTT-3.3.2-5].
        """
        found = []
        kept = self.broker._retained_messages
        if "+" not in topic_filter and "#" not in topic_filter:  # one topic: no scan
            message = kept.get(topic_filter)
            items = [] if message is None else [(topic_filter, message)]
        else:
            items = list(kept.items())
        for topic, message in items:
            if not topic_matches(topic, topic_filter):
                continue
            props = self._retained_props.get(topic)
            if props is not None and props.expired(now):
                del self.broker._retained_messages[topic]
                del self._retained_props[topic]
                continue
            found.append((topic, bytes(message.data), message.qos or 0, props))
        return found

    # --- a session's waiting messages -----------------------------------------------------------

    @staticmethod
    def enqueue(session: Session, message: Message) -> None:
        """Keep a message for ``session`` until it can be sent (offline, or window full)."""
        session.retained_messages.put_nowait(message)

    @staticmethod
    def queued(session: Session) -> int:
        """How many messages wait for ``session``."""
        return int(session.retained_messages.qsize())

    @staticmethod
    def dequeue(session: Session) -> Message | None:
        """Take the oldest message waiting for ``session``, or None."""
        queue = session.retained_messages
        return None if queue.empty() else cast("Message", queue.get_nowait())

    @staticmethod
    def drain(session: Session) -> None:
        """Empty the session's queue."""
        queue = session.retained_messages
        while not queue.empty():
            queue.get_nowait()
