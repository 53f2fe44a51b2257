"""The hub: every connection of the broker, who is online as which client, and routing.

A PUBLISH is routed synchronously, inside the read that brought it (:meth:`Hub.publish`): each
subscriber online gets it there and then, in the connection's version; an offline persistent
session keeps QoS 1/2 messages; a shared subscription's group gives it to one member in turn.
What a callback makes each connection write is gathered and written once, when the callback
ends (:meth:`Hub.flush`). The hub also decides take-over, and keeps the timers of session
expiry and delayed wills through :class:`broker.lifetimes.Lifetimes`.

The hub sees connections only through :class:`Attached`; it does not import the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from broker import reasons as rc
from broker import replies
from broker.acl import Acl, Checker
from broker.engine import Engine, Message, Session
from broker.handshakes import Handshakes
from broker.lifetimes import Lifetimes
from broker.protocol import encode_publish
from broker.queues import Queues
from broker.records import Connect, Props, Wanted, Will
from broker.settings import Limits
from broker.systopics import Counters
from broker.topics import Match

logger = logging.getLogger("broker")

OPEN_FILES_KEPT = 64
"""Files kept for the broker's own use when the open-file limit caps connections: listeners,
the event loop's, logs, a password file being read, metrics scrapes."""
RETAIN_IF_NEW, RETAIN_NEVER = 1, 2
"""MQTT 5 retain handling (section 3.8.3.1): 0 sends retained messages on every SUBSCRIBE."""
FLUSH_FIRST, FLUSH_AFTER = 4, 32
"""A fan-out's writes go out in batches of connections: FLUSH_FIRST, doubling to FLUSH_AFTER."""
NEVER_EXPIRES = 0xFFFFFFFF
"""MQTT 5: a session expiry interval that never ends (section 3.1.2.11.2)."""


class Writer(Protocol):
    """A connection with writes gathered during a callback."""

    def flush(self) -> None:
        """Write what was gathered."""


class Attached(Writer, Protocol):
    """A client's connection, as the hub sees it."""

    session: Session | None

    @property
    def peer(self) -> str:
        """The peer's address, for log lines."""

    v5: bool
    expiry: int | None
    """MQTT 5: the session expiry interval the client asked for (seconds)."""

    @property
    def backlog(self) -> bool:
        """Whether messages wait in the session's queue."""

    def send_qos0(self, frame: bytes) -> None:
        """Send an encoded QoS 0 PUBLISH (or drop it, for a client too far behind)."""

    def deliver(
        self, topic: str, payload: bytes, qos: int, *, retain: bool, props: Props | None = None,
        ids: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        """Send a message through the session's flows, or queue it."""

    def close(self, *, will: bool, reason: int | None = None, why: str | None = None) -> None:
        """End the connection."""

    def abort(self) -> None:
        """Close the socket now."""


class Hub:
    """Every connection of the broker, who is online as which client, and routing between them."""

    def __init__(self, limits: Limits, max_connections: int = 0) -> None:
        """Create an empty hub; :attr:`engine` must be set before the first client connects."""
        self.limits = limits
        self.max_connections = max_connections
        """The most connections served at once, 0 for no limit (see :meth:`cap_connections`)."""
        self.limited_by = f"--max-connections {max_connections}"
        """What sets :attr:`max_connections`, for the line that refuses a connection."""
        self.acl: Acl | None = None
        """Who may read and write what (--acl-file); None lets everyone do everything."""
        self._checkers: dict[tuple[str, str | None], Checker] = {}
        self.websocket_url: str | None = None
        """Where MQTT over WebSockets is served, if it is (for the TCP port's HTTP answer)."""
        self.engine: Engine | None = None
        self.connections: set[Attached] = set()
        self.online: dict[str, Attached] = {}
        """Client id -> its current connection, from CONNACK to the end of that connection."""
        self.batching = False
        self.stopping = False
        self.refused = 0
        self._dirty: list[Writer] = []
        self._flush_at = FLUSH_FIRST
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed: asyncio.Event | None = None
        self.counters = Counters()
        """What $SYS reports (broker/systopics.py)."""
        self.queues = Queues(self, limits.max_queued, self.counters)
        """The messages waiting for each session."""
        self._turns: dict[str, int] = {}
        """Shared subscription group -> how many messages it has had (whose turn it is)."""
        self.lifetimes = Lifetimes()
        """Session expiry and delayed wills of the clients that are away."""
        self.handshakes = Handshakes(limits.connect_timeout)
        """The connections that have not sent their first packet yet, and their deadlines."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop, asked for once (each asking calls getpid(): 2 % of a connect)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # --- writes: gathered during a callback, one write per connection at its end ---------------

    def flush(self) -> None:
        """Write what each connection gathered, and stop gathering."""
        self.batching = False
        self._flush_at = FLUSH_FIRST
        if self._dirty:
            dirty, self._dirty = self._dirty, []
            for connection in dirty:
                connection.flush()

    def closed(self, connection: Attached) -> None:
        """Forget a connection that has ended (and wake a shutdown waiting for the last)."""
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def mark(self, connection: Writer) -> None:
        """Note that ``connection`` has writes to flush; past a batch of them, write now.

        Gathering saves writes when a read brings several packets for the same connections.
        A fan-out to many is another case: each gets one packet, and the first would wait
        for the last to be encoded. So once 4 connections have gathered something, they are
        written at once, then 8, 16 and 32 at a time: the first subscribers hear soon, the rest
        in large batches. Fewer than 4 (a pinger and its echo) are written once, at the end.
        """
        dirty = self._dirty
        dirty.append(connection)
        if len(dirty) >= self._flush_at:
            self._dirty = []
            self._flush_at = min(2 * self._flush_at, FLUSH_AFTER)
            for waiting in dirty:
                waiting.flush()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the hub keeps until it ends (and cancels at shutdown)."""
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- access control ---------------------------------------------------------------------

    def set_acl(self, acl: Acl | None) -> None:
        """Use ``acl`` from now on: every next subscribe and delivery is decided by it."""
        self.acl = acl
        self._checkers.clear()

    def checker(self, session: Session) -> Checker:
        """Return the ACL's decisions for a session's client (its user and client id)."""
        key = (session.client_id, session.username)
        found = self._checkers.get(key)
        if found is None:
            assert self.acl is not None  # noqa: S101 - callers check hub.acl first
            if len(self._checkers) >= 100_000:
                self._checkers.clear()
            found = self._checkers[key] = Checker(self.acl, session.username, session.client_id)
        return found

    def readable(self, session: Session, topic: str) -> bool:
        """Whether the session's client may receive a message on ``topic``."""
        return self.acl is None or self.checker(session).may_read(topic)

    def writable(self, session: Session, topic: str) -> bool:
        """Whether the session's client may publish to ``topic``."""
        return self.acl is None or self.checker(session).may_write(topic)

    def subscribable(self, session: Session, topic_filter: str) -> bool:
        """Whether the session's client may subscribe to ``topic_filter``."""
        return self.acl is None or self.checker(session).may_subscribe(topic_filter)

    # --- routing --------------------------------------------------------------------------------

    @property
    def state(self) -> Engine:
        """The engine (amqtt's state)."""
        if self.engine is None:
            raise RuntimeError("the hub has no engine")
        return self.engine

    def publish(
        self, topic: str, payload: bytes, qos: int | None, frame: bytes | None = None, *,
        retain: bool = False, props: Props | None = None, origin: str | None = None,
        frame5: bytes | None = None,
    ) -> bool:  # fmt: skip
        """Deliver a message to every subscriber now, or keep it for them (synchronous).

        Return whether any subscriber matched. Each delivery's QoS is min(publish QoS,
        granted QoS) [MQTT-3.8.4-6, section 3.3.5]; a client whose filters overlap gets one copy
        at the highest granted QoS [MQTT-3.3.5-1]. ``qos`` None (a plugin's broadcast) delivers
        at each granted QoS. ``frame``, when given, is the message already encoded as a 3.1.1
        QoS 0 PUBLISH with RETAIN 0, and ``frame5`` as an MQTT 5 one for the subscribers that
        need nothing of their own. ``retain`` is the published RETAIN, kept for MQTT 5
        subscriptions that ask for it; ``origin`` is the publisher's client id, for their No
        Local option.
        """
        plain, shared = self.state.matches(topic)
        online = self.online
        acl = self.acl
        for match in plain:
            session, granted, no_local, keep_retain, ids = match
            if no_local and session.client_id == origin:
                continue  # MQTT 5 [MQTT-3.8.3-3]
            if acl is not None and not self.checker(session).may_read(topic):
                continue  # a wildcard granted, this topic not readable: checked per message
            delivered = _downgrade(qos, granted)
            connection = online.get(session.client_id)
            if connection is None or connection.session is not session:
                if delivered and not session.clean_session:
                    # [MQTT-3.1.2-5]: QoS 1/2 messages wait for an offline persistent session.
                    self.queues.put(session, Message(None, topic, delivered, payload,
                                                keep_retain and retain, props, ids))  # fmt: skip
                continue
            if delivered == 0 and not connection.backlog and not connection.v5:
                if frame is None:
                    frame = encode_publish(topic, payload)
                connection.send_qos0(frame)
            elif (
                delivered == 0
                and not connection.backlog
                and not ids
                and not (keep_retain and retain)
            ):
                # MQTT 5, QoS 0, nothing per subscriber: encoded once for all of them.
                if frame5 is None:
                    frame5 = replies.encode_publish(topic, payload, 0, None, retain=False,
                                                    dup=False, props=props)  # fmt: skip
                connection.send_qos0(frame5)
            else:  # QoS 1/2, MQTT 5, or QoS 0 behind waiting messages [MQTT-4.6.0-6]
                connection.deliver(topic, payload, delivered, retain=keep_retain and retain,
                                   props=props, ids=ids)  # fmt: skip
        for group, members in shared:
            self._deliver_shared(group, members, topic, payload, qos=qos, props=props)
        return bool(plain or shared)

    def _deliver_shared(
        self, group: str, members: list[Match], topic: str, payload: bytes, *,
        qos: int | None, props: Props | None,
    ) -> None:  # fmt: skip
        """Give a message to one member of a shared subscription's group (MQTT 5 4.8.2).

        Members take turns; an online member comes before an offline one.
        """
        if self.acl is not None:
            members = [m for m in members if self.checker(m.session).may_read(topic)]
            if not members:
                return
        turn = self._turns.get(group, 0)
        self._turns[group] = turn + 1
        ordered = members[turn % len(members) :] + members[: turn % len(members)]
        for session, granted, _, _, ids in ordered:
            connection = self.online.get(session.client_id)
            if connection is not None and connection.session is session:
                delivered = _downgrade(qos, granted)
                connection.deliver(topic, payload, delivered, retain=False, props=props, ids=ids)
                return
        for session, granted, _, _, ids in ordered:
            delivered = _downgrade(qos, granted)
            if delivered and not session.clean_session:
                message = Message(None, topic, delivered, payload, False, props, ids)
                self.queues.put(session, message)
                return

    def publish_will(
        self, session: Session | None, will: Will, props: Props | None, delay: int = 0
    ) -> None:
        """Publish a will [MQTT-3.1.2-8], and retain it if it asks to be.

        MQTT 5: with a ``delay``, the will waits that many seconds for the session to go on.
        """
        if delay and session is not None:
            self.lifetimes.delay_will(session.client_id, delay,
                                      lambda: self.publish_will(session, will, props))  # fmt: skip
            return
        if session is not None and not self.writable(session, will.topic):
            # Checked when it would be published: the rules of that moment.
            logger.warning("Client %s may not publish to %s: its will is dropped.",
                           session.client_id, will.topic)  # fmt: skip
            self.counters.denied += 1
            return
        self.publish(will.topic, will.payload, will.qos, retain=will.retain, props=props)
        if will.retain:
            self.spawn(
                self.state.retain(session, will.topic, will.payload, will.qos, props),
                "retain will",
            )

    def cap_connections(self, open_files: int) -> None:
        """Serve no more connections than the open-file limit leaves room for.

        At the limit, accept() fails with EMFILE and libuv (uvloop) closes the connection
        without a word (asyncio logs an ERROR and stops accepting for a second); a refusal here
        says why, in a line now and then.
        """
        room = open_files - OPEN_FILES_KEPT
        if room > 0 and (not self.max_connections or room < self.max_connections):
            self.max_connections = room
            self.limited_by = (
                f"all that the open-file limit of {open_files} leaves room for (ulimit -n)"
            )

    def retained_for(
        self, session: Session, want: Wanted, granted: int, new: bool
    ) -> list[tuple[str, bytes, int, Props | None]]:
        """Return the retained messages a subscription gets [MQTT-3.3.1-6]: topic, payload, QoS.

        With their MQTT 5 properties, at most its granted QoS, as its retain handling asks (only
        for a ``new`` one, or never); none for a refused or a shared one (section 4.8.2); only
        those its client may read, checked as for every delivery.
        """
        handling = want.retain_handling
        if rc.failed(granted) or want.topic_filter.startswith("$share/"):
            return []
        if handling == RETAIN_NEVER or (handling == RETAIN_IF_NEW and not new):
            return []
        found = self.state.retained(want.topic_filter, time.monotonic())
        return [(topic, payload, min(granted, qos), props)
                for topic, payload, qos, props in found
                if self.readable(session, topic)]  # fmt: skip

    # --- sessions -------------------------------------------------------------------------------

    def attach(self, connection: Attached, connect: Connect, session: Session) -> bool:
        """Make ``connection`` the client's current one; return whether a session was resumed."""
        engine = self.state
        client_id = session.client_id
        previous = self.online.get(client_id)
        if previous is not None:
            # [MQTT-3.1.4-2]: the server disconnects the existing client first.
            logger.info("Client %s connected again: closing its previous connection.", client_id)
            why = f"session taken over by a connection from {connection.peer}"
            previous.close(will=True, reason=rc.SESSION_TAKEN_OVER, why=why)
        self.lifetimes.returned(client_id, clean=connect.clean_session)
        present = False
        if connect.clean_session:
            # [MQTT-3.1.2-6]: a clean session starts empty and ends with the connection.
            self._forget(client_id)
        else:
            stored = engine.stored(client_id)
            if stored is not None:
                # [MQTT-3.2.2-2]: resume the stored session with this connection's settings.
                for name in ("keep_alive", "username", "password", "remote_address",
                             "remote_port", "clean_session"):  # fmt: skip
                    setattr(stored, name, getattr(session, name))
                session, present = stored, True
        engine.keep(session)
        self.online[client_id] = connection
        self.counters.maximum = max(self.counters.maximum, len(self.online))
        connection.session = session
        engine.connected(session)
        return present

    def detach(self, connection: Attached, how: str = "disconnected") -> None:
        """End ``connection``'s hold on its session; a clean session ends with it.

        ``how`` says how the connection ended, for the log line.
        """
        session = connection.session
        if session is None or self.online.get(session.client_id) is not connection:
            return
        del self.online[session.client_id]
        engine = self.state
        engine.disconnected(session)
        logger.info("Client %s disconnected from %s: %s.", session.client_id, connection.peer, how)
        if session.clean_session:
            self._forget(session.client_id)
        elif connection.expiry is not None and connection.expiry < NEVER_EXPIRES:
            # MQTT 5: the session ends this many seconds after the connection [MQTT-3.1.2-23].
            client_id = session.client_id
            self.lifetimes.expire_after(client_id, connection.expiry,
                                        lambda: self._expire(client_id, session))  # fmt: skip

    def _expire(self, client_id: str, session: Session) -> None:
        if self.state.stored(client_id) is session and client_id not in self.online:
            logger.info("Session of client %s expired.", client_id)
            self._forget(client_id)

    def _forget(self, client_id: str) -> None:
        """End a client's session: its state in the engine, and its queue's drop count."""
        self.state.forget(client_id)
        self.queues.forget(client_id)

    # --- shutdown -------------------------------------------------------------------------------

    async def close_all(self, grace: float) -> None:
        """Close every connection: gently, then, after ``grace`` seconds, abruptly."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        self.lifetimes.cancel_all()
        self.handshakes.cancel()
        for connection in list(self.connections):
            connection.close(will=False, reason=rc.SERVER_SHUTTING_DOWN, why="server shutting down")
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for connection in list(self.connections):
            connection.abort()


def _downgrade(qos: int | None, granted: int) -> int:
    """Return the QoS of a delivery: min(publish QoS, granted QoS) [MQTT-3.8.4-6].

    ``qos`` None (a plugin's broadcast) delivers at the granted QoS (section 3.3.5).
    """
    return granted if qos is None or qos > granted else qos
