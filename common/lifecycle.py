"""Process lifecycle shared by the three programs: stop on SIGTERM/SIGINT, within a bound."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_handlers(stop: asyncio.Event, hard_limit: float) -> None:
    """Make SIGTERM/SIGINT set ``stop``; arm a watchdog that ends the process after ``hard_limit``.

    The handler only sets the event: main() does the orderly shutdown. The watchdog is the bound
    on that shutdown whatever a library does (amqtt's shutdown can hang). A second signal exits
    at once.
    """
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("Second %s: exiting now.", signal.Signals(signum).name)
            _hard_exit(1)
        logger.info("Got %s: shutting down.", signal.Signals(signum).name)
        stop.set()
        _arm_watchdog(hard_limit)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)


def _arm_watchdog(limit: float) -> None:
    def expire() -> None:
        logger.error("Shutdown did not finish within %.1f s: exiting anyway.", limit)
        _hard_exit(0)

    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()


def _hard_exit(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
