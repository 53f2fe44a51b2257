"""Fixtures: a free port and a process spawner per test; no test passes past a broker's bug."""

from __future__ import annotations

import gc
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_raw import RawClient
from tests.support import (
    Spawner,
    base_env,
    check_broker_output,
    free_port,
    reference_broker,
)


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


@pytest.fixture
def password_file(tmp_path: Path, spawn: Spawner) -> Path:
    """A password file with user alice, made by the same command `make add-user` runs."""
    path = tmp_path / "passwords.txt"
    result = spawn.run("broker.users", "add", "alice", "--file", str(path),
                       env=base_env(MQTT_NEW_PASSWORD="wonderland"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("alice:$argon2")
    return path


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made now."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def mosquitto(tmp_path: Path, port: int) -> Iterator[int]:
    """The reference broker on a free port, anonymous, for our clients."""
    with reference_broker(port, tmp_path):
        yield port
