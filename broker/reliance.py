"""What the engine relies on of amqtt, by name and shape, and the check of it at start-up.

amqtt 0.12.1 offers no public API for a broker that does its own I/O, so the engine uses some
private names. Every one is listed here, with the shape the engine expects, and checked before
the broker starts: an amqtt that renamed one fails at start-up with one line (exit 70), rather
than silently dropping deliveries later. This module does not import amqtt: the engine hands it
amqtt's classes (:class:`Amqtt`), so the one adapter stays the only importer.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Amqtt:
    """The amqtt classes the checks look at, and its version."""

    version: str
    Broker: Any
    Session: Any
    BrokerEvents: Any
    Outgoing: Any
    Incoming: Any


class EngineMismatch(Exception):  # noqa: N818 - it names what happened, not an error kind
    """The installed amqtt lacks a name, or a shape, that the engine relies on."""


# Methods of amqtt's Broker the engine calls or replaces, with the parameters it passes.
BROKER_METHODS: dict[str, tuple[str, ...]] = {
    "start": (),
    "shutdown": (),
    "retain_message": ("source_session", "topic_name", "data", "qos"),
    "_del_subscription": ("a_filter", "session"),
    "_authenticate": ("session", "_"),
    "_create_server_instance": ("listener_name", "listener_type", "address", "port", "ssl_context"),
    "_run_broadcast": ("running_tasks",),
}
# Attributes a Broker has once constructed, and their types.
BROKER_ATTRIBUTES: dict[str, type] = {
    "_sessions": dict,
    "_subscriptions": dict,
    "_retained_messages": dict,
    "_broadcast_queue": asyncio.Queue,
}
# Attributes of a new Session the connection layer and the engine read or set.
SESSION_ATTRIBUTES: dict[str, type | None] = {
    "client_id": None, "clean_session": None, "keep_alive": int, "username": None,
    "password": None, "remote_address": None, "remote_port": None, "will_flag": bool,
    "will_topic": None, "will_message": None, "will_qos": None, "will_retain": None,
    "inflight_in": dict, "inflight_out": dict, "retained_messages": asyncio.Queue,
    "transitions": None, "is_anonymous": bool,
}  # fmt: skip
# What LeanSession makes afresh for each session; every other attribute of a new Session must
# be a plain value it can copy.
SESSION_MADE = frozenset({"attributes", "inflight_out", "inflight_in", "retained_messages",
                          "delivered_message_queue", "transitions"})  # fmt: skip
PLAIN_VALUES = (type(None), bool, int, float, str, bytes)
MESSAGE_PARAMETERS = ("packet_id", "topic", "qos", "data", "retain")


def _parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")


def check(amqtt: Amqtt) -> None:  # noqa: PLR0912 - one flat list of checks
    """Raise EngineMismatch, naming the first difference, unless amqtt has what we rely on."""
    where = f"amqtt {amqtt.version}"
    Broker, Session, BrokerEvents = amqtt.Broker, amqtt.Session, amqtt.BrokerEvents  # noqa: N806
    OutgoingApplicationMessage = amqtt.Outgoing  # noqa: N806
    IncomingApplicationMessage = amqtt.Incoming  # noqa: N806
    for name, wanted in BROKER_METHODS.items():
        method = getattr(Broker, name, None)
        if not callable(method):
            raise EngineMismatch(f"{where}: Broker.{name} is missing")
        found = _parameters(method)
        if found[: len(wanted)] != wanted:
            raise EngineMismatch(
                f"{where}: Broker.{name} takes ({', '.join(found)}), not ({', '.join(wanted)})"
            )
    try:
        session = Session()
    except Exception as exc:
        raise EngineMismatch(f"{where}: Session() failed: {exc!r}") from exc
    for name, kind in SESSION_ATTRIBUTES.items():
        if not hasattr(session, name):
            raise EngineMismatch(f"{where}: Session.{name} is missing")
        if kind is not None and not isinstance(getattr(session, name), kind):
            raise EngineMismatch(f"{where}: Session.{name} is no longer a {kind.__name__}")
    for name in ("connect", "disconnect", "is_connected"):
        if not callable(getattr(session.transitions, name, None)):
            raise EngineMismatch(f"{where}: Session.transitions.{name} is missing")
    for name in ("_init_states", "_on_enter_connected", "_on_enter_disconnected", "clear_queues"):
        if not callable(getattr(Session, name, None)):
            raise EngineMismatch(f"{where}: Session.{name} is missing")
    if list(getattr(Session, "states", ())) != ["new", "connected", "disconnected"]:
        raise EngineMismatch(f"{where}: Session.states changed: {getattr(Session, 'states', None)}")
    if not isinstance(getattr(Session, "next_packet_id", None), property):
        raise EngineMismatch(f"{where}: Session.next_packet_id is missing")
    for cls in (OutgoingApplicationMessage, IncomingApplicationMessage):
        if _parameters(cls.__init__) != MESSAGE_PARAMETERS:
            raise EngineMismatch(f"{where}: {cls.__name__}{inspect.signature(cls)} changed")
    if not hasattr(OutgoingApplicationMessage(1, "t", 1, b"", False), "pubrec_packet"):
        raise EngineMismatch(f"{where}: OutgoingApplicationMessage.pubrec_packet is missing")
    for event in ("CLIENT_CONNECTED", "CLIENT_DISCONNECTED"):
        if not hasattr(BrokerEvents, event):
            raise EngineMismatch(f"{where}: BrokerEvents.{event} is missing")


def session_defaults(made: dict[str, Any]) -> dict[str, Any]:
    """Return the plain values of a new Session (``vars(Session())``), for LeanSession to copy.

    EngineMismatch if one that is not a plain value is not one LeanSession makes itself.
    """
    missing = SESSION_MADE - made.keys()
    if missing:
        raise EngineMismatch(f"amqtt: Session().{min(missing)} is missing")
    defaults = {name: value for name, value in made.items() if name not in SESSION_MADE}
    for name, value in defaults.items():
        if not isinstance(value, PLAIN_VALUES):
            raise EngineMismatch(f"amqtt: Session().{name} is a {type(value).__name__}, which "
                                 "a LeanSession would share between sessions")  # fmt: skip
    return defaults


def check_broker(broker: object, version: str, *, anonymous: bool, allow: type) -> None:
    """Raise EngineMismatch unless a constructed Broker has the attributes we rely on.

    ``anonymous``: the broker was configured with ``allow`` as its only auth plugin, which
    the engine then answers for without asking (Engine.authenticate_now).
    """
    for name, kind in BROKER_ATTRIBUTES.items():
        if not isinstance(getattr(broker, name, None), kind):
            raise EngineMismatch(f"amqtt {version}: Broker().{name} is missing")
    manager = getattr(broker, "plugins_manager", None)
    if not callable(getattr(manager, "fire_event", None)) or not isinstance(
        getattr(manager, "_event_plugin_callbacks", None), dict
    ):
        raise EngineMismatch(f"amqtt {version}: PluginManager.fire_event is missing")
    plugins = getattr(manager, "_auth_plugins", None)
    if not isinstance(plugins, list):
        raise EngineMismatch(f"amqtt {version}: PluginManager._auth_plugins is missing")
    if anonymous and not (plugins and all(isinstance(p, allow) for p in plugins)):
        raise EngineMismatch(f"amqtt {version}: the auth plugins are {plugins}, not {allow}")
    if getattr(manager, "_topic_plugins", None) != []:
        # The engine adds subscriptions to amqtt's table itself, as add_subscription does
        # when no topic plugin is loaded (which would ask each plugin first, in a task).
        raise EngineMismatch(f"amqtt {version}: PluginManager._topic_plugins is not empty")
