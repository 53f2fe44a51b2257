"""Password checks off the event loop: one thread, below the loop's CPU priority. amqtt-free.

A password check (argon2, in amqtt's file plugin) costs milliseconds of CPU. In the event loop
it would stall every connection; in one thread of lower priority, checks wait their turn, so a
flood of failed logins slows down only the logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")

WORKERS = 1
"""Password checks run in this many threads; more wait their turn (failed logins slow down)."""
NICENESS = 10
"""How much lower the password threads' CPU priority is than the event loop's (Linux nice)."""


def _lower_priority() -> None:
    """Run this thread (and the threads argon2 starts from it) below the event loop."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


class Worker:
    """The password thread, started when first needed."""

    def __init__(self) -> None:
        """Start no thread yet."""
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` in the thread, after the checks before it; return its result."""
        if self._pool is None:
            # Imported here: only a broker with a password file needs threads.
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            self._pool = ThreadPoolExecutor(
                WORKERS, thread_name_prefix="auth", initializer=_lower_priority
            )
        return await asyncio.get_running_loop().run_in_executor(self._pool, function)

    def shutdown(self) -> None:
        """Stop the thread, dropping checks that have not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
