"""Process lifecycle shared by the three programs: stop on SIGTERM/SIGINT, within a bound."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import sys
import threading

from common.constants import EXIT_FORCED

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

CLIENT_SHUTDOWN_LIMIT = 4.0
"""Seconds a client's shutdown may take before its watchdog ends it with exit 124: under
supervisord's stopwaitsecs (5 s), so that our own bound acts first and says so in the log."""


def install_stop_handlers(stop: asyncio.Event, hard_limit: float) -> None:
    """Make SIGTERM/SIGINT set ``stop``; arm a watchdog that ends the process after ``hard_limit``.

    The handler only sets the event: main() does the orderly shutdown. The watchdog is the bound
    on that shutdown whatever a library does (amqtt's shutdown can hang); when it fires, the
    process exits 124 (EXIT_FORCED), not 0, so that a forced stop never looks clean. A second
    signal exits at once, with 1.
    """
    loop = asyncio.get_running_loop()
    install_exception_handler()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("Second %s: exiting now.", signal.Signals(signum).name)
            _hard_exit(1)
        logger.info("Got %s: shutting down.", signal.Signals(signum).name)
        stop.set()
        _arm_watchdog(hard_limit)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)


def install_exception_handler() -> None:
    """Report exceptions from loop callbacks in one log line (with a traceback at DEBUG).

    aiomqtt schedules paho's socket callbacks with call_soon_threadsafe; when a connection
    closes while one is queued, asyncio reports `add_writer(...)` on a closed descriptor with a
    full traceback, though nothing is wrong. Real errors still show, in one line.
    """
    loop = asyncio.get_running_loop()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        found = context.get("exception")
        exc = found if isinstance(found, BaseException) else None
        message = context.get("message", "")
        if isinstance(exc, OSError) and exc.errno == errno.EBADF:
            logger.debug("Callback on a closed socket: %s (%r)", message, exc)
            return
        logger.error(
            "%s: %r", message, exc, exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None
        )  # fmt: skip

    loop.set_exception_handler(handler)


def _arm_watchdog(limit: float) -> None:
    def expire() -> None:
        logger.error("Shutdown did not finish within %.1f s: exiting anyway.", limit)
        _hard_exit(EXIT_FORCED)

    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()


def _hard_exit(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def raise_open_files() -> int:
    """Raise this process's open-files limit to the hard limit, say so; return the soft limit.

    Every connection is a file descriptor, and the usual soft limit (1024) would refuse the
    1,021st; the hard limit is what the administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("Open files: cannot raise the limit of %d: %s.", soft, exc)
            return soft
        logger.info("Open files: raised the limit from %d to %d (the hard limit).", soft, target)
    return max(soft, target)
