"""Fixtures: a free port and a process spawner per test."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_raw import RawClient
from tests.support import Spawner, free_port


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1 for this test alone."""
    return free_port()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Start real processes; whatever is still running when the test ends is killed."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.cleanup()


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
