"""The broker's entry point: parse settings, listen, serve until SIGTERM/SIGINT, stop in bound."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from broker.server import BindError, Listener, PingPongBroker, amqtt_config, bind, tls_context
from broker.settings import BrokerSettings, parse
from common import logs
from common.constants import EXIT_OK, EXIT_UNAVAILABLE
from common.lifecycle import install_stop_handlers

logger = logging.getLogger("broker")


async def serve(settings: BrokerSettings) -> int:
    """Run the broker until a stop signal; return the exit code."""
    stop = asyncio.Event()
    install_stop_handlers(stop, hard_limit=settings.shutdown_timeout + 1.0)
    listeners: dict[str, Listener] = {}
    try:
        listeners["default"] = Listener(bind(settings.host, settings.port))
        if settings.tls_port is not None and settings.tls_cert and settings.tls_key:
            context = tls_context(settings.tls_cert, settings.tls_key)
            listeners["tls"] = Listener(bind(settings.host, settings.tls_port), context)
    except BindError as exc:
        for listener in listeners.values():
            listener.sock.close()
        sys.stderr.write(f"broker: error: {exc}\n")
        return EXIT_UNAVAILABLE
    broker = PingPongBroker(
        amqtt_config(settings, listeners), listeners, settings.limits, settings.max_connections
    )
    await broker.start()
    for listener in listeners.values():
        host, port = listener.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        kind = "MQTT over TLS" if listener.tls else "MQTT"
        logger.info("Listening on %s:%d for %s (pid %d).", shown, port, kind, os.getpid())
    if settings.password_file is not None:
        logger.info("Clients must authenticate: users from %s.", settings.password_file)
    await stop.wait()
    logger.info("Shutting down.")
    try:
        await asyncio.wait_for(broker.shutdown(), settings.shutdown_timeout)
    except TimeoutError:
        logger.warning(
            "amqtt did not shut down within %.1f s; closing anyway.", settings.shutdown_timeout
        )
    for listener in listeners.values():
        listener.sock.close()
    logger.info("Stopped.")
    return EXIT_OK


class _AlreadyLogged(logging.Filter):
    """Drop amqtt's line for a refused connection: the broker has logged it with its address."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to initialize client session")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the broker as a program: ``python -m broker --help``."""
    settings = parse(argv, os.environ)
    logs.configure("broker", settings.log_level)
    logging.getLogger("amqtt.broker").addFilter(_AlreadyLogged())
    sys.exit(asyncio.run(serve(settings)))
