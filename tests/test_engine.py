"""broker/engine.py: amqtt is reached from one module, and a changed amqtt stops the broker."""

from __future__ import annotations

import asyncio
import re
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from amqtt.broker import Broker
from amqtt.session import Session

from broker import reliance
from broker.engine import EngineMismatch, LeanSession, check_amqtt
from broker.plugins import AllowAnonymous
from broker.topics import topic_matches
from tests.support import REPO, Spawner, base_env

BROKEN_AMQTT = """
import sys
import amqtt.broker
del amqtt.broker.Broker._del_subscription  # the fault: an amqtt that renamed it
from broker.main import main
main(sys.argv[1:])
"""


def test_the_installed_amqtt_has_every_name_the_engine_relies_on() -> None:
    check_amqtt()  # raises on a mismatch


def test_a_missing_method_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Broker, "retain_message")
    with pytest.raises(
        EngineMismatch, match=r"^amqtt 0\.12\.1: Broker\.retain_message is missing$"
    ):
        check_amqtt()


def test_a_changed_signature_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def _del_subscription(self: Broker, topic_filter: str, qos: int) -> int:  # noqa: ARG001
        return 0

    monkeypatch.setattr(Broker, "_del_subscription", _del_subscription)
    with pytest.raises(
        EngineMismatch,
        match=r"Broker\._del_subscription takes \(topic_filter, qos\), "
        r"not \(a_filter, session\)$",
    ):
        check_amqtt()


def _constructed(auth: list[object], topic: list[object]) -> SimpleNamespace:
    """A constructed Broker's attributes, as check_broker reads them, with these plugins."""
    manager = SimpleNamespace(fire_event=lambda *_: None, _event_plugin_callbacks={},
                              _auth_plugins=auth, _topic_plugins=topic)  # fmt: skip
    return SimpleNamespace(_sessions={}, _subscriptions={}, _retained_messages={},
                           _broadcast_queue=asyncio.Queue(), plugins_manager=manager)  # fmt: skip


def test_what_the_engine_answers_for_amqtt_is_checked_at_start_up() -> None:
    # Subscriptions go into amqtt's table without asking topic plugins; anonymous CONNECTs are
    # accepted without asking the auth plugin: both only while amqtt is configured so.
    reliance.check_broker(_constructed([AllowAnonymous.__new__(AllowAnonymous)], []), "x",
                          anonymous=True, allow=AllowAnonymous)  # fmt: skip
    reliance.check_broker(_constructed([object()], []), "x", anonymous=False, allow=AllowAnonymous)
    with pytest.raises(EngineMismatch, match=r"_topic_plugins is not empty"):
        reliance.check_broker(_constructed([], [object()]), "x", anonymous=False,
                              allow=AllowAnonymous)  # fmt: skip
    with pytest.raises(EngineMismatch, match=r"the auth plugins are"):
        reliance.check_broker(_constructed([object()], []), "x", anonymous=True,
                              allow=AllowAnonymous)  # fmt: skip


def test_a_missing_session_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Session, "next_packet_id")
    with pytest.raises(EngineMismatch, match=r"Session\.next_packet_id is missing"):
        check_amqtt()


def test_the_broker_exits_70_with_one_line_when_amqtt_changed(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    (tmp_path / "broken_amqtt_broker.py").write_text(BROKEN_AMQTT)
    result = spawn.run(
        "broken_amqtt_broker", "--port", str(port), env=base_env(PYTHONPATH=str(tmp_path))
    )
    assert result.returncode == 70, result.stderr
    assert result.stderr.splitlines() == [
        "broker: error: amqtt 0.12.1: Broker._del_subscription is missing; this broker was "
        "written for amqtt 0.12.1"
    ]


def test_only_the_engine_and_the_plugin_module_import_amqtt() -> None:
    importers = sorted(
        str(path.relative_to(REPO))
        for folder in ("broker", "common", "ping_client", "echo_client")
        for path in (REPO / folder).rglob("*.py")
        if re.search(r"^\s*(from|import) amqtt\b", path.read_text(), re.MULTILINE)
    )
    assert importers == ["broker/engine.py", "broker/plugins.py"]


@pytest.mark.parametrize(
    ("topic", "topic_filter", "expected"),
    [
        ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/b", "a/#", True), ("a", "a/#", True),
        ("a/b/c", "a/+", False), ("a", "a/+", False), ("b/a", "a/#", False),
        ("$SYS/x", "#", False), ("$SYS/x", "+/x", False), ("$SYS/x", "$SYS/#", True),
        ("/ping", "+/ping", True), ("/ping", "#", True), ("a//b", "a/+/b", True),
    ],
)  # fmt: skip
def test_topic_matching(topic: str, topic_filter: str, expected: bool) -> None:
    """Section 4.7.1 and [MQTT-4.7.2-1]."""
    assert topic_matches(topic, topic_filter) is expected


def test_a_lean_session_moves_through_amqtts_states() -> None:
    session = LeanSession()
    assert session.transitions.state == "new"
    session.transitions.connect()
    assert session.transitions.is_connected()
    assert session.last_connect_time is not None  # amqtt's own hook ran
    with pytest.raises(RuntimeError, match="already connected"):
        session.transitions.connect()
    session.transitions.disconnect()
    assert session.transitions.state == "disconnected"
    assert session.last_disconnect_time is not None
    session.transitions.connect()
    assert session.transitions.is_connected()


def test_a_lean_sessions_queues_behave_as_amqtt_uses_them() -> None:
    session = LeanSession()
    queue = session.retained_messages
    assert queue.empty()
    assert queue.qsize() == 0
    for item in ("a", "b"):
        queue.put_nowait(item)
    assert queue.qsize() == 2
    assert queue.get_nowait() == "a"
    session.clear_queues()  # amqtt's own method
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


def test_a_lean_session_has_amqtts_defaults_and_its_own_values() -> None:
    """The defaults are class attributes: setting one on a session leaves the others alone."""
    made, first, second = vars(Session()), LeanSession(), LeanSession()
    for name, value in made.items():
        if not isinstance(value, (dict, asyncio.Queue)) and name != "transitions":
            assert getattr(first, name) == value, name
    first.keep_alive, first.username, first.will_flag = 60, "alice", True
    first.inflight_out[1] = "message"
    assert (second.keep_alive, second.username, second.will_flag) == (0, None, False)
    assert second.inflight_out == {}
    assert first.attributes is not second.attributes


def test_a_lean_session_is_small() -> None:
    """amqtt's Session with its transitions.Machine and two asyncio.Queues: 22.9 KiB.

    A LeanSession was 0.75 KiB while it copied amqtt's defaults into itself; about 0.4 KiB now.
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sessions = [LeanSession() for _ in range(200)]
        each = (tracemalloc.get_traced_memory()[0] - before) / len(sessions)
    finally:
        tracemalloc.stop()
    assert each < 640, each
