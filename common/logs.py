"""Logging set-up, done once in each program's main()."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s {label}: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"

# Libraries that log on every packet or connection at INFO. Our own loggers say what matters.
QUIET = ("amqtt", "transitions", "aiomqtt", "paho", "asyncio")
# paho's messages, through aiomqtt's "mqtt" logger, repeat at ERROR what the reconnect loop
# already reports once per outage ("failed to receive on socket: Connection reset by peer"),
# once per failed attempt: ten lines a second while a broker resets connections.
SILENT = ("mqtt",)


class Formatter(logging.Formatter):
    """The standard formatter, with the date and time formatted once a second, not per line.

    ``time.strftime`` was a quarter of what a line cost (7.4 us here, with the lookups below).
    """

    _second: int | None = None
    _formatted = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """Return the record's time to the second (``%(msecs)03d`` adds the milliseconds)."""
        second = int(record.created)
        if second != self._second:
            self._formatted = time.strftime(datefmt or DATEFMT, self.converter(second))
            self._second = second
        return self._formatted


def configure(label: str, level: str, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr), each line marked with ``label``.

    No line says where in the source it was logged, or from which thread, process or task:
    logging then skips finding out (the logging HOWTO's "Optimization"), 1.9 us a line here.
    The broker logs a line for every connection that comes and goes.
    """
    logging._srcfile = None  # the documented switch: no frame lookup for the caller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12 and later
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(Formatter(FORMAT.format(label=label), DATEFMT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    third_party = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in QUIET:
        logging.getLogger(name).setLevel(third_party)
    for name in SILENT:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
