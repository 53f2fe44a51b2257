"""Logging set-up, done once in each program's main()."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s {label}: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"

# Libraries that log on every packet or connection at INFO. Our own loggers say what matters.
QUIET = ("amqtt", "transitions", "aiomqtt", "paho", "asyncio")
# paho's messages, through aiomqtt's "mqtt" logger, repeat at ERROR what the reconnect loop
# already reports once per outage ("failed to receive on socket: Connection reset by peer"),
# once per failed attempt: ten lines a second while a broker resets connections.
SILENT = ("mqtt",)


def configure(label: str, level: str, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr), each line marked with ``label``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(label=label), DATEFMT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    third_party = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in QUIET:
        logging.getLogger(name).setLevel(third_party)
    for name in SILENT:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
