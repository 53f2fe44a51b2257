"""Fixtures: a free port and a process spawner per test; no test passes past a broker's bug."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_raw import RawClient
from tests.support import Spawner, check_broker_output, free_port


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1 for this test alone."""
    return free_port()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Start real processes; whatever is still running when the test ends is killed.

    A broker among them that logged an internal error or a panic fails the test.
    """
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.cleanup()


class BrokerFaults(logging.Handler):
    """Keeps what an in-process broker logs, for :func:`check_broker_output`."""

    def __init__(self) -> None:
        """Collect at WARNING and above (an internal error is logged at ERROR)."""
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record's message."""
        self.lines.append(record.getMessage())


@pytest.fixture(autouse=True)
def _no_broker_fault(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose broker logged an internal error, a panic or a traceback.

    Three places: brokers run in-process (the "broker" logger), brokers started by the spawner
    (checked in :meth:`Spawner.cleanup`), and broker output under the test's tmp_path
    (supervisord and ``make`` write ``logs/broker.log`` there; a test may keep ``broker.err``).
    """
    tmp_path: Path | None = None
    if "tmp_path" in request.fixturenames:
        tmp_path = request.getfixturevalue("tmp_path")
    handler = BrokerFaults()
    broker_logger = logging.getLogger("broker")
    broker_logger.addHandler(handler)
    try:
        yield
    finally:
        broker_logger.removeHandler(handler)
    check_broker_output("the in-process broker", "\n".join(handler.lines))
    if tmp_path is not None:
        for log in sorted(tmp_path.rglob("broker*")):
            if log.is_file() and (".log" in log.name or log.suffix in (".err", ".out")):
                check_broker_output(str(log), log.read_text(errors="replace"))


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    """Close the raw MQTT sockets a test opened, so none leaks into the next."""
    yield
    RawClient.close_all()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so that a leaked resource is blamed on its own test."""
    yield
    gc.collect()
