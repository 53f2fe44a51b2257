"""The 100 ms reconnect loop, seen from outside: real clients, a real broker that comes and goes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import socket
import threading
import time
from typing import Any

import aiomqtt
import pytest

from common.client import ClientSettings, make_client
from common.constants import EXIT_SOFTWARE
from common.reconnect import Link, Listener
from tests.hostile import (
    PUBLISH,
    DisconnectsAtQos2,
    DropsFirstPublish,
    RefusesAfterFirst,
    hostile_broker,
)
from tests.support import Proc, Spawner, wait_until


def pongs(ping: Proc) -> int:
    """Echoes the ping client has logged so far."""
    return ping.count(r"client: Got b'[\d.]+' on /pong")


async def stuck_link(
    port: int, listener: Listener | None = None
) -> tuple[Link, asyncio.Future[None]]:
    """A link up on ``port``, its session waiting on what the loss of the connection does not
    end (as a publish waiting for its confirmation does); and the task running it."""
    link = Link(make_client(ClientSettings(port=port)), address=f"127.0.0.1:{port}",
                interval=0.1, listener=listener)  # fmt: skip
    blocked = asyncio.Event()

    async def session(_client: object) -> None:
        blocked.set()
        await asyncio.Event().wait()

    runner = asyncio.ensure_future(link.run(session))
    await asyncio.wait_for(blocked.wait(), 10)
    return link, runner


async def stopped(link: Link, runner: asyncio.Future[None], within: float = 3.0) -> None:
    """Stop ``link`` as the programs do (stop, then cancel its task); fail unless it ends soon."""
    link.stop()
    runner.cancel()
    done, _ = await asyncio.wait({runner}, timeout=within)
    assert done, "the link ran on after its stop"
    if not runner.cancelled():
        runner.exception()  # seen: how it ended is not what these tests check


def test_clients_started_before_the_broker_wait_and_connect(spawn: Spawner, port: int) -> None:
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    ping = spawn.start("ping_client", "--port", str(port), "--interval", "0.1", name="ping")
    echo.wait_for("Cannot connect to")
    ping.wait_for("Cannot connect to")
    spawn.broker(port)
    wait_until(lambda: pongs(ping) >= 3, 15, "pongs once the broker is up")
    for proc in (echo, ping):
        assert proc.count("Cannot connect") == 1
        assert proc.count(r"Connected to 127\.0\.0\.1") == 1


def test_broker_restart_reconnects_resubscribes_and_resumes(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    ping = spawn.start("ping_client", "--port", str(port), "--interval", "0.1", name="ping")
    wait_until(lambda: pongs(ping) >= 3, 15, "first pongs")
    broker.signal(signal.SIGKILL)
    broker.wait(5)
    for proc in (echo, ping):
        proc.wait_for(r"Lost connection to 127\.0\.0\.1:\d+: .* Retrying every 100 ms\.")
    before = pongs(ping)
    spawn.broker(port)
    for proc in (echo, ping):
        proc.wait_for(r"Reconnected to 127\.0\.0\.1:\d+ after [\d.]+ s \(\d+ attempts\)\.")
    wait_until(lambda: pongs(ping) >= before + 3, 15, "pongs after the restart")
    for proc in (echo, ping):
        assert proc.count("Lost connection") == 1
        assert proc.count("Reconnected") == 1
    # One subscription each after the restart: one echo per ping, no duplicates.
    ping.signal(signal.SIGTERM)
    assert ping.wait(5) in (0, 1)  # pings in flight at the kill may be lost
    summary = ping.out()
    assert re.search(r", 0 duplicate,", summary), summary
    assert "1 reconnects" in summary


def test_retrying_every_100_ms_floods_no_log(spawn: Spawner, port: int) -> None:
    """While nothing speaks MQTT on the port, attempts go on and the log gets one line."""
    attempts = 0
    listening = threading.Event()
    done = threading.Event()

    def refuse_politely() -> None:
        nonlocal attempts
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
            server.listen(64)
            server.settimeout(0.2)
            listening.set()
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                attempts += 1
                conn.close()  # accept, then hang up: every CONNECT fails

    thread = threading.Thread(target=refuse_politely, daemon=True)
    thread.start()
    listening.wait(5)
    try:
        echo = spawn.start("echo_client", "--port", str(port), name="echo")
        wait_until(lambda: attempts >= 20, 15, "twenty connection attempts")
    finally:
        done.set()
        thread.join(5)
    assert echo.count("Cannot connect") == 1
    assert echo.count("Connected to") == 0
    assert len(echo.err().splitlines()) == 1, echo.err()


def test_clients_sharing_an_id_say_so_and_back_off(spawn: Spawner, port: int) -> None:
    """Two clients with one id take the connection from each other: they must say so plainly
    and slow down, not reconnect ten times a second for ever."""
    broker = spawn.broker(port)
    echoes = [
        spawn.start("echo_client", "--port", str(port), "--client-id", "demo", name=f"echo{i}")
        for i in (1, 2)
    ]

    def backed_off() -> bool:
        return any("Retrying in 2 s." in echo.err() for echo in echoes)

    # Without a back-off, the pauses would stay at 100 ms and this line would never come.
    wait_until(backed_off, 30, "a client to slow its retries to 2 s")
    warned = [echo for echo in echoes if "Is another client using the id 'demo'?" in echo.err()]
    assert warned, [echo.err() for echo in echoes]
    for echo in echoes:
        assert echo.count("Is another client using the id") <= 1
    # 100 ms pauses would have let them take the id from each other ~10 times a second.
    assert broker.count(r"Client demo connected") < 30, broker.err()


def test_a_crash_looping_broker_is_not_taken_for_a_shared_id(spawn: Spawner, port: int) -> None:
    """A broker killed soon after each start refuses the clients' first retry: that is not the
    flapping of two clients with one id, and the clients keep retrying every 100 ms."""
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    for cycle in range(1, 5):
        broker = spawn.broker(port)
        echo.wait_for(rf"(Subscribed to /ping, /ping/\+\.(.|\n)*){{{cycle}}}")
        broker.signal(signal.SIGKILL)
        broker.wait(5)
        echo.wait_for(rf"(Lost connection(.|\n)*){{{cycle}}}")
        # The scenario: the broker stays down for more than one retry interval, so that the
        # client's first retry is refused (a broker with its bytecode compiled restarts in
        # about 80 ms, within the 100 ms interval). Time passing is the condition here.
        down_until = time.monotonic() + 0.25
        while time.monotonic() < down_until:
            time.sleep(0.01)
    # Every recovery took more than one attempt: the first retry was indeed refused.
    attempts = [int(n) for n in re.findall(r"after [\d.]+ s \((\d+) attempts\)", echo.err())]
    assert len(attempts) == 3
    assert all(n >= 2 for n in attempts), echo.err()
    assert echo.count("Is another client using the id") == 0, echo.err()
    assert echo.count("Retrying in") == 0, echo.err()


def test_between_quick_failures_the_verdict_is_the_last_error() -> None:
    """A deadline that falls a few milliseconds into the next attempt names what failed the
    last one, not the answer the new attempt has barely started to wait for (CI saw `no
    SUBACK for /pong after 0.000141 s` for a broker that sends garbage after CONNACK)."""

    async def check() -> None:  # aiomqtt makes its client inside a running loop
        link = Link(make_client(ClientSettings()), address="127.0.0.1:1", interval=0.1,
                    clock=lambda: 100.0)  # fmt: skip
        link._last_error = "connection closed before SUBACK (Protocol error)"
        for stage in ("CONNACK", "SUBACK for /pong"):
            link._waiting = (stage, 100.0 - 0.0002)
            assert link.problem() == "connection closed before SUBACK (Protocol error)"
        link._waiting = ("SUBACK for /pong", 100.0 - 3)
        assert link.problem() == "no SUBACK for /pong after 3 s"

    asyncio.run(check())


def test_a_session_stuck_on_what_a_loss_does_not_end_still_sees_the_loss(
    spawn: Spawner, port: int
) -> None:
    """The loss is noticed however the session waits, not only in its message iteration.

    aiomqtt does not end a publish waiting for its confirmation when the connection is lost:
    an echo blocked in one noticed a SIGKILLed broker only at its 5 s timeout. The session here
    waits on an event the connection never sets, as that publish did.
    """
    broker = spawn.broker(port)
    seen: list[tuple[str, float]] = []

    async def check() -> None:
        link, runner = await stuck_link(
            port, listener=lambda event, _: seen.append((event, time.monotonic()))
        )
        killed = time.monotonic()
        broker.kill()
        while not any(event == "disconnected" for event, _ in seen):
            assert time.monotonic() - killed < 2, "the loss went unnoticed"
            await asyncio.sleep(0.01)
        await stopped(link, runner)
        lost = next(t for event, t in seen if event == "disconnected")
        assert lost - killed < 1.0  # LOSS_GRACE after paho saw it, not aiomqtt's 5 s timeout

    asyncio.run(check())


def test_a_link_is_unusable_from_the_moment_paho_sees_the_loss(spawn: Spawner, port: int) -> None:
    """``usable`` turns false when paho reads the broker's FIN, before ``connected`` clears.

    ``connected`` clears only once the session has wound down (here LOSS_GRACE, for a session
    the loss does not end; in a fleet of 1,000 devices, the other devices' winding down). The
    pings a fleet sent in between went to a client that could no longer send them, and were
    counted as lost: 98 of the 106 lost around a SIGKILL in one bench run.
    """
    broker = spawn.broker(port)
    seen: list[tuple[bool, bool]] = []

    async def check() -> None:
        link, runner = await stuck_link(port)
        assert link.usable
        lost = link.client.lost
        lost.add_done_callback(lambda _: seen.append((link.connected.is_set(), link.usable)))
        broker.kill()
        await asyncio.wait({lost}, timeout=5)  # done, with how the connection was lost
        await asyncio.sleep(0)  # the done callback has run
        deadline = time.monotonic() + 5
        while link.connected.is_set():
            assert time.monotonic() < deadline, "the link never went down"
            await asyncio.sleep(0.005)
        await stopped(link, runner)

    asyncio.run(check())
    assert seen == [(True, False)]  # still "connected", already unusable


def test_a_stop_that_comes_with_the_connack_ends_the_link(spawn: Spawner, port: int) -> None:
    """A stop in the loop iteration that reads the CONNACK is not lost.

    On Python 3.11, asyncio.wait_for, which aiomqtt waits for the CONNACK with, drops a
    cancellation that arrives as the future it waits for completes (python/cpython#86296). An
    echo_client SIGTERMed 5 ms before its CONNACK went on to subscribe, and overran its
    shutdown bound. Here the stop comes from inside paho's CONNACK callback.
    """
    spawn.broker(port)

    async def check() -> None:
        client = make_client(ClientSettings(port=port))
        link = Link(client, address=f"127.0.0.1:{port}", interval=0.1, topics=[("/ping", 0)])
        paho = client._client
        on_connect = paho.on_connect
        assert on_connect is not None

        def stop_with_the_connack(*args: Any) -> None:
            on_connect(*args)
            link.stop()
            runner.cancel()

        paho.on_connect = stop_with_the_connack

        async def session(_client: object) -> None:
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        done, _ = await asyncio.wait({runner}, timeout=3)
        assert done, "the link ran on after its stop"
        assert not link.ever_connected.is_set()

    asyncio.run(check())


def test_a_session_that_loses_its_cancellation_still_ends(spawn: Spawner, port: int) -> None:
    """A stopped link cancels its session until it ends, not once.

    The session here drops the first cancellation, as a publish does on Python 3.11 when its
    PUBACK comes with the cancellation (python/cpython#86296), and then waits for messages.
    """
    spawn.broker(port)

    async def check() -> None:
        link = Link(make_client(ClientSettings(port=port)), address=f"127.0.0.1:{port}",
                    interval=0.1)  # fmt: skip
        started = asyncio.Event()

        async def session(_client: object) -> None:
            started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        await asyncio.wait_for(started.wait(), 10)
        await stopped(link, runner)  # not waiting on its session

    asyncio.run(check())


@pytest.mark.parametrize("protocol", [4, 5])
def test_after_a_reconnect_the_subscription_goes_before_what_paho_sends_again(
    port: int, protocol: int
) -> None:
    """The SUBSCRIBE of a new connection goes out before paho's resend of an unacknowledged
    QoS 1 ping.

    paho sends those again right after its CONNACK callback. Subscribed from a coroutine, the
    SUBSCRIBE went after them, and the echo's answer to such a ping could reach the broker
    first, with nobody subscribed to deliver it to: a ping or two lost at QoS 1 in every
    SIGKILL of a 1,000-device fleet, through either broker.
    """
    watcher = DropsFirstPublish()

    async def check() -> None:
        client = make_client(ClientSettings(port=port, protocol=protocol))
        link = Link(client, address=f"127.0.0.1:{port}", interval=0.1, topics=[("/pong", 1)])

        async def session(client: aiomqtt.Client) -> None:
            await client.publish("/ping", b"1", qos=1)
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        deadline = time.monotonic() + 10
        while not {PUBLISH, 8} <= set(watcher.order):
            assert time.monotonic() < deadline, f"saw {watcher.order} on the second connection"
            await asyncio.sleep(0.01)
        await stopped(link, runner)

    with hostile_broker(port, watcher):
        asyncio.run(check())
    assert watcher.connections == 2
    assert watcher.order[:2] == [8, PUBLISH]  # SUBSCRIBE, then the ping sent again


def test_a_broker_that_hangs_up_at_each_publish_leaves_no_closed_socket_watched(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection the broker ends (DISCONNECT 0x9B) as paho sends its ping again, over and
    over, is reconnected every 100 ms, says why, and leaves the loop's selector clean.

    aiomqtt watched a socket for writing from a callback scheduled for later, and stopped
    watching at once: when paho wrote and closed first, the closed socket stayed in the
    selector, and the next connection (given the same file descriptor) failed with "Exception
    in callback ...add_reader: FileNotFoundError" at ERROR, then waited 5 s for a CONNACK.
    """
    broker = DisconnectsAtQos2()

    async def check() -> str:
        client = make_client(ClientSettings(port=port, client_id="resender"))
        link = Link(client, address=f"127.0.0.1:{port}", interval=0.1, topics=[("/pong", 1)])

        async def session(client: aiomqtt.Client) -> None:
            await client.publish("/ping", b"1", qos=2)
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        # Four connections: three quick losses, then the link backs off (it is flapping).
        deadline = time.monotonic() + 3
        while broker.connections < 4:
            assert time.monotonic() < deadline, f"{broker.connections} connections in 3 s"
            await asyncio.sleep(0.01)
        await stopped(link, runner)
        return link.problem()

    with caplog.at_level(logging.WARNING), hostile_broker(port, broker):
        problem = asyncio.run(check())
    # asyncio's own lines: "Exception in callback ...", "Task exception was never retrieved".
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    said = "the broker's DISCONNECT: QoS not supported, 0x9b"
    assert said in caplog.text or said in problem, caplog.text
    # A publish paho refused once it had seen the loss is the loss, not a mystery of its own.
    assert "not currently connected" not in caplog.text + problem


def test_a_reconnect_the_broker_refuses_says_why(port: int) -> None:
    """After a lost connection, a refusing CONNACK is the reason the link gives.

    aiomqtt kept the last connection's CONNACK as this one's: the client subscribed before its
    CONNACK, ignored the refusal, and the link said "connection closed before SUBACK", with
    a warning from aiomqtt on every attempt.
    """
    refuser = RefusesAfterFirst()

    async def check() -> str:
        client = make_client(ClientSettings(port=port, protocol=4))
        link = Link(client, address=f"127.0.0.1:{port}", interval=0.1, topics=[("/pong", 0)])

        async def session(client: aiomqtt.Client) -> None:
            async for _ in client.messages:
                pass

        runner = asyncio.ensure_future(link.run(session))
        deadline = time.monotonic() + 10
        while refuser.connections < 3 or link.connected.is_set():
            assert time.monotonic() < deadline, f"{refuser.connections} connections"
            await asyncio.sleep(0.01)
        await stopped(link, runner)
        return link.problem()

    with hostile_broker(port, refuser):
        problem = asyncio.run(check())
    assert "Not authorized" in problem, problem


def test_a_connect_stopped_in_its_thread_leaves_nothing_behind(
    spawn: Spawner, port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A link stopped while paho connects in aiomqtt's executor thread ends cleanly.

    The connect goes on in its thread after the stop, and then schedules aiomqtt's reader and
    its once-a-second task on the loop. A probe ended during a slow name lookup (here: 0.3 s)
    logged "Task was destroyed but it is pending!" at exit, and paho "Event loop is closed".
    """
    spawn.broker(port)
    lookup = socket.getaddrinfo
    looking = threading.Event()

    def slow_lookup(*args: Any, **kwargs: Any) -> Any:
        looking.set()
        time.sleep(0.3)
        return lookup(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)

    async def check() -> None:
        link = Link(make_client(ClientSettings(port=port)), address=f"127.0.0.1:{port}",
                    interval=0.1, topics=[("/pong", 0)])  # fmt: skip

        async def session(_client: object) -> None:
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        assert await asyncio.to_thread(looking.wait, 5), "no name lookup"
        await stopped(link, runner)

    with caplog.at_level(logging.WARNING):
        asyncio.run(check())
        gc.collect()  # a task still pending when the loop closed says so when collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_connect_stopped_before_its_connack_leaves_nothing_behind(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A link stopped while it waits for a CONNACK that never comes ends cleanly.

    The cancelled wait cancels aiomqtt's CONNACK future, which paho's disconnect callback then
    reads: "Exception in callback None(): CancelledError()" from an echo_client SIGTERMed
    while a broker dripped its CONNACK at one byte a second.
    """
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(5)

    async def check() -> None:
        link = Link(make_client(ClientSettings(port=port)), address=f"127.0.0.1:{port}",
                    interval=0.1)  # fmt: skip

        async def session(_client: object) -> None:
            await asyncio.Event().wait()

        runner = asyncio.ensure_future(link.run(session))
        sock, _ = await asyncio.to_thread(server.accept)
        accepted.append(sock)
        sock.settimeout(5)
        assert await asyncio.to_thread(sock.recv, 1) == b"\x10", "no CONNECT"
        await asyncio.sleep(0.05)  # the connect's thread is over: waiting for the CONNACK
        await stopped(link, runner)

    accepted: list[socket.socket] = []
    with server, caplog.at_level(logging.WARNING):
        asyncio.run(check())
        gc.collect()
        with accepted[0] as sock:
            rest = b""
            while chunk := sock.recv(4096):
                rest += chunk
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert rest.endswith(b"\xe0\x00")  # the rest of the CONNECT, a DISCONNECT, and a close


@pytest.mark.parametrize("name", ["_client_connect", "_on_disconnect", "_lock"])
def test_an_aiomqtt_without_what_the_client_relies_on_is_refused_at_start(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An override of a renamed aiomqtt method would silently never run: refused, in one line."""
    if name == "_lock":
        init = aiomqtt.Client.__init__

        def without(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            del self._lock

        monkeypatch.setattr(aiomqtt.Client, "__init__", without)
    else:
        monkeypatch.delattr(aiomqtt.Client, name)

    async def make() -> None:
        make_client(ClientSettings())

    with pytest.raises(SystemExit) as exited:
        asyncio.run(make())
    assert exited.value.code == EXIT_SOFTWARE
    err = capsys.readouterr().err
    assert f"has no {name}: this version is not supported" in err
    assert err.count("\n") == 1
