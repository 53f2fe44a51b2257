"""The broker's entry point: parse settings, listen, serve until SIGTERM/SIGINT, stop in bound."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker import acl, systopics
from broker.connection import Connection
from broker.engine import Engine, EngineMismatch
from broker.hub import Hub
from broker.server import BACKLOG, BindError, Listener, bind, tls_context
from broker.settings import BrokerSettings, parse, user_names
from broker.settings import password_file as checked_password_file
from common import logs
from common.constants import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE
from common.lifecycle import install_stop_handlers, raise_open_files

logger = logging.getLogger("broker")


def listen(settings: BrokerSettings) -> dict[str, Listener]:
    """Bind the plain listener and those configured (TLS, WebSockets); raise BindError."""
    listeners: dict[str, Listener] = {}
    host = settings.host
    try:
        listeners["default"] = Listener(bind(host, settings.port))
        context = None
        if settings.tls_cert and settings.tls_key:
            context = tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca,
                                  require=settings.require_certificate)  # fmt: skip
        if settings.tls_port is not None and context is not None:
            listeners["tls"] = Listener(bind(host, settings.tls_port), context)
        if settings.ws_port is not None:
            listeners["ws"] = Listener(bind(host, settings.ws_port), websocket=True)
        if settings.wss_port is not None and context is not None:
            listeners["wss"] = Listener(bind(host, settings.wss_port), context, websocket=True)
    except BindError:
        for listener in listeners.values():
            listener.sock.close()
        raise
    return listeners


def _websockets(settings: BrokerSettings) -> Callable[[Hub, int], asyncio.Protocol]:
    """Make the WebSocket listeners' protocols, with the live page if there is one.

    Imported only when a WebSocket listener is asked for: a broker without one does not load
    ``websockets`` at start-up (tests/test_deferred.py).
    """
    from broker.page import Page  # noqa: PLC0415
    from broker.websocket import WebSocket  # noqa: PLC0415

    page = Page(settings.http_dir) if settings.http_dir is not None else None
    return lambda hub, tcp_port: WebSocket(hub, page, tcp_port)


@dataclass(frozen=True, slots=True)
class Running:
    """A broker serving: its hub (connections, routing), its engine (amqtt) and its sockets."""

    hub: Hub
    engine: Engine
    listeners: dict[str, Listener]


@contextlib.asynccontextmanager
async def running(settings: BrokerSettings, open_files: int = 0) -> AsyncIterator[Running]:
    """Serve until the block ends, then shut down within ``settings.shutdown_timeout``.

    ``open_files``, the process's open-file limit, caps the connections served at once.

    Raise BindError when a socket cannot be bound, EngineMismatch when amqtt is not the one
    the engine was written for.
    """
    rules = acl.load(settings.acl_file) if settings.acl_file is not None else None
    listeners = listen(settings)
    hub = Hub(settings.limits, settings.max_connections)
    hub.cap_connections(open_files)
    hub.set_acl(rules)
    loop = asyncio.get_running_loop()
    servers: dict[str, asyncio.Server] = {}
    try:
        # In one direction: the servers first (not serving yet), then the engine over them,
        # then accept; a client never meets a broker whose engine is not up.
        web = _websockets(settings) if any(x.websocket for x in listeners.values()) else None
        tcp_port = listeners["default"].sock.getsockname()[1]
        for name, listener in listeners.items():
            factory: Callable[[], asyncio.Protocol] = (
                functools.partial(web, hub, tcp_port) if web is not None and listener.websocket
                else functools.partial(Connection, hub)
            )  # fmt: skip
            if listener.websocket and "ws" in name and hub.websocket_url is None:
                hub.websocket_url = f"{'wss' if listener.tls else 'ws'}://{listener.address}/mqtt"
            servers[name] = await loop.create_server(
                factory,
                sock=listener.sock,
                backlog=BACKLOG,
                ssl=listener.tls,
                ssl_handshake_timeout=settings.limits.connect_timeout if listener.tls else None,
                start_serving=False,
            )
        engine = Engine(
            listeners=[(name, listener.address) for name, listener in listeners.items()],
            password_file=str(settings.password_file) if settings.password_file else None,
            servers=servers,
            broadcast=hub.publish,
        )
        hub.engine = engine
        await engine.start()
        for server in servers.values():
            await server.start_serving()
    except BaseException:
        for server in servers.values():
            server.close()
        for listener in listeners.values():
            listener.sock.close()
        raise
    if settings.sys_interval:
        version = f"mqtt-pingpong broker (amqtt {engine.amqtt_version})"
        hub.spawn(systopics.publish_forever(hub, settings.sys_interval, version), "$SYS")
    try:
        yield Running(hub, engine, listeners)
    finally:
        for server in servers.values():
            server.close()  # accept no more
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                await hub.close_all(grace=settings.shutdown_timeout / 2)
                await engine.shutdown()
        except TimeoutError:
            logger.warning(
                "The broker did not shut down within %.1f s; closing anyway.",
                settings.shutdown_timeout,
            )
        for listener in listeners.values():
            listener.sock.close()


async def serve_metrics(broker: Running, settings: BrokerSettings) -> asyncio.Server | None:
    """Serve the $SYS figures to Prometheus, when --metrics-port asks; raise BindError."""
    if settings.metrics_port is None:
        return None
    # Imported only when asked for: prometheus_client is not part of a plain broker's start.
    from broker.metrics import registry  # noqa: PLC0415
    from common.metrics import MetricsPortError, serve  # noqa: PLC0415

    try:
        server = await serve(registry(broker.hub), settings.host, settings.metrics_port)
    except MetricsPortError as exc:
        raise BindError(f"--metrics-port: {exc}") from exc
    logger.info("Metrics for Prometheus at http://%s:%d/metrics.", settings.host,
                settings.metrics_port)  # fmt: skip
    return server


def warn_unknown_users(rules: acl.Acl, password_file: Path | None) -> None:
    """Warn of each ACL user the password file does not know (they could never log in)."""
    if password_file is None:
        return
    for user in sorted(set(rules.users) - user_names(password_file)):
        logger.warning("The ACL names user %s, who is not in %s.", user, password_file)


def warn_no_users(password_file: Path) -> None:
    """Say that no client can log in: the password file has nobody in it."""
    logger.warning("%s has no users: every client will be refused (add one: make add-user "
                   "NAME=...).", password_file)  # fmt: skip


async def reload(broker: Running, settings: BrokerSettings) -> None:
    """SIGHUP: re-read the ACL and the password file, as mosquitto does.

    Connected clients stay connected; their next subscribe, and every next delivery, use the
    new rules. A file that does not read keeps the old rules, and the log says why.
    """
    logger.info("Got SIGHUP: reloading.")
    if settings.acl_file is not None:
        try:
            rules = acl.load(settings.acl_file)
        except acl.AclError as exc:
            logger.warning("Reload: kept the old topic access rules: %s.", exc)
        else:
            broker.hub.set_acl(rules)
            logger.info("Reload: topic access from %s: %s.", settings.acl_file, rules)
            warn_unknown_users(rules, settings.password_file)
    if settings.password_file is not None:
        try:
            checked_password_file(str(settings.password_file))
            users = await broker.engine.reload_passwords()
        except (ValueError, OSError, EngineMismatch) as exc:
            logger.warning("Reload: kept the old passwords: %s.", exc)
        else:
            logger.info("Reload: %d users from %s.", users, settings.password_file)
            if not users:
                warn_no_users(settings.password_file)


FULL_COLLECTION_EVERY = 100
"""Collections of the middle generation between two full ones (CPython's default: 10)."""


def collect_less() -> None:
    """Tune the garbage collector for a heap that grows by every connection, once started.

    Everything made at start-up (modules, amqtt, the listeners) lives as long as the broker:
    frozen, no collection rescans it. Start-up's own garbage (177 objects) is frozen with it:
    a collection first would take 7 ms, while the listeners already serve.

    A full collection rescans every connection's objects, and in a connect storm CPython makes
    one each time the heap has grown by a quarter: 7 us of the 29 a CONNECT and SUBSCRIBE cost
    in process, with 10,000 clients. Ten times rarer, they cost little memory, because a closed
    connection leaves no reference cycles to collect (tests/test_garbage.py): 15 rounds of
    2,000 clients connecting and closing keep the broker at 36-37 MB either way (they grew it
    to 80 MB while connections were cycles).
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


async def serve(settings: BrokerSettings) -> int:
    """Run the broker until a stop signal; return the exit code."""
    stop = asyncio.Event()
    install_stop_handlers(stop, hard_limit=settings.shutdown_timeout + 1.0)
    open_files = raise_open_files()
    try:
        async with running(settings, open_files) as broker:
            # Every listener is bound before the first "Listening" line, the one that says the
            # broker is ready: a --metrics-port in use ends the start before it is claimed.
            metrics = await serve_metrics(broker, settings)
            loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            for listener in broker.listeners.values():
                logger.info(
                    "Listening on %s for %s (pid %d, %s loop).",
                    listener.address, listener.kind, os.getpid(), loop,
                )  # fmt: skip
                if listener.websocket and settings.http_dir is not None and not listener.tls:
                    logger.info("The live page: http://%s/", listener.address)
            if settings.password_file is not None:
                users = len(user_names(settings.password_file))
                logger.info("Clients must authenticate: users from %s (%d).",
                            settings.password_file, users)  # fmt: skip
                if not users:
                    warn_no_users(settings.password_file)
            if broker.hub.acl is not None:
                logger.info("Topic access from %s: %s.", settings.acl_file, broker.hub.acl)
                warn_unknown_users(broker.hub.acl, settings.password_file)
            collect_less()
            reloading: set[asyncio.Task[None]] = set()

            def on_hup() -> None:
                task = asyncio.ensure_future(reload(broker, settings))
                reloading.add(task)
                task.add_done_callback(reloading.discard)

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
            await stop.wait()
            if metrics is not None:
                metrics.close()
            logger.info("Shutting down.")
    except BindError as exc:
        sys.stderr.write(f"broker: error: {exc}\n")
        return EXIT_UNAVAILABLE
    except EngineMismatch as exc:
        sys.stderr.write(f"broker: error: {exc}; this broker was written for amqtt 0.12.1\n")
        return EXIT_SOFTWARE
    except acl.AclError as exc:
        sys.stderr.write(f"broker: error: {exc}\n")
        return EXIT_CONFIG
    logger.info("Stopped.")
    return EXIT_OK


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Choose the event loop: uvloop's when asked for or, for ``auto``, when installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional, and only the broker program needs it
    except ImportError:
        if choice == "uvloop":
            sys.stderr.write("broker: error: --event-loop uvloop: uvloop is not installed\n")
            sys.exit(EXIT_USAGE)
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> None:
    """Run the broker as a program: ``python -m broker --help``."""
    settings = parse(argv, os.environ)
    logs.configure("broker", settings.log_level)
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        code = runner.run(serve(settings))
    sys.exit(code)
