"""The one timer for connections that have not sent CONNECT (broker/handshakes.py).

On real event loops (uvloop's clock has millisecond steps, asyncio's does not), then through the
real broker over real sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from broker.handshakes import RESOLUTION, Handshakes
from tests.mqtt_raw import RawClient
from tests.support import Spawner

TIMEOUT = 0.2

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine on the event loop the test is parametrized with."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


class Late:
    """A waiting connection that notes when (and how often) it was told its time ran out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        self.loop, self.done = loop, done
        self.started = loop.time()
        self.closed_at: list[float] = []

    def no_connect(self) -> None:
        self.closed_at.append(self.loop.time())
        self.done.set()


def test_each_late_connection_is_closed_once_at_its_own_deadline(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handshakes = Handshakes(TIMEOUT)
        first_closed, last_closed = asyncio.Event(), asyncio.Event()
        first = Late(loop, first_closed)
        handshakes.wait(first, loop)
        in_time = Late(loop, asyncio.Event())
        handshakes.wait(in_time, loop)
        await asyncio.sleep(TIMEOUT / 2)  # the second late one arrives halfway through
        second = Late(loop, last_closed)
        handshakes.wait(second, loop)
        handshakes.done(in_time)  # its first packet came
        await asyncio.wait_for(first_closed.wait(), 5)
        assert second.closed_at == [], "closed at the first one's deadline"
        await asyncio.wait_for(last_closed.wait(), 5)
        for late in (first, second):
            assert len(late.closed_at) == 1
            assert late.closed_at[0] >= late.started + TIMEOUT - RESOLUTION
        assert in_time.closed_at == []
        assert len(handshakes) == 0

    run(main())


def test_a_connection_that_arrives_after_the_timer_fired_gets_a_timer_again(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handshakes = Handshakes(TIMEOUT)
        for _ in range(2):  # the second after the first was closed: nothing armed in between
            closed = asyncio.Event()
            late = Late(loop, closed)
            handshakes.wait(late, loop)
            await asyncio.wait_for(closed.wait(), 5)
            assert late.closed_at[0] >= late.started + TIMEOUT - RESOLUTION

    run(main())


def test_cancel_closes_nobody(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handshakes = Handshakes(0.01)
        late = Late(loop, asyncio.Event())
        handshakes.wait(late, loop)
        handshakes.cancel()
        probe = Handshakes(0.05)  # a second clock, to know that the first one's time has passed
        passed = asyncio.Event()
        probe.wait(Late(loop, passed), loop)
        await asyncio.wait_for(passed.wait(), 5)
        assert late.closed_at == []

    run(main())


def test_the_broker_closes_each_silent_connection_after_its_own_timeout(
    spawn: Spawner, port: int
) -> None:
    """Silent connections opened 0.5 s apart are each closed 1 s after they opened; a client
    that sent CONNECT in time stays."""
    spawn.broker(port, "--handshake-timeout", "1")
    early, early_opened = RawClient(port, timeout=10), time.monotonic()
    client = RawClient(port)
    assert client.connect("in-time") == (False, 0)
    time.sleep(0.5)  # not a wait for a state: the second connection is to arrive later
    late, late_opened = RawClient(port, timeout=10), time.monotonic()
    assert early.closed_within(5)
    early_closed = time.monotonic()
    assert late.closed_within(5)
    late_closed = time.monotonic()
    # Not before its own deadline (the broker's clock may start a little after ours).
    assert early_closed >= early_opened + 1 - 0.05, early_closed - early_opened
    assert late_closed >= late_opened + 1 - 0.05, late_closed - late_opened
    assert client.barrier() == []  # still served
