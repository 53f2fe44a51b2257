"""What the broker plugs into amqtt: its auth plugin, and its session and message classes.

AllowAnonymous is the plugin amqtt loads for anonymous access (FileAuthPlugin, with a password
file). LeanSession, Message and Incoming are amqtt's classes with less in them, or more: the
engine (broker/engine.py) keeps its state in them.

amqtt's default plugin set logs every packet and event and publishes $SYS topics; each costs time
per message. The connection layer logs connects and disconnects itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from broker import reliance
from broker.lean import Mailbox, SessionState

if TYPE_CHECKING:
    from broker.records import Props


class AllowAnonymous(BaseAuthPlugin):
    """Accept every client, with or without a user name.

    Unlike amqtt's AnonymousAuthPlugin it does not mark the session anonymous: amqtt discards
    anonymous sessions on disconnect, which would break clean-session=0 clients.
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:  # noqa: ARG002 - amqtt's signature
        """Accept the client."""
        return True


class LeanSession(Session):
    """amqtt's Session, holding the same state in a fraction of the memory and time."""

    def __init__(self) -> None:
        """Make the session amqtt's Session() makes, with light queues and state.

        amqtt's plain defaults (None, 0, False) are class attributes, read from one real
        Session made once (:func:`learn_defaults`): a session holds only what was set on it.
        Its two asyncio.Queues, made and dropped for every session, were a fifth of what a
        CONNECT cost the broker; copying two dozen defaults into each one cost 1 us more. With
        plain dicts for its messages in flight and its state machine a view, a session is
        about 400 bytes (tracemalloc, 2,000 sessions; 775 with the copied defaults and
        OrderedDicts).
        """
        if not LeanSession._learned:
            learn_defaults()
        self.attributes: dict[str, Any] = {}
        # Plain dicts (amqtt's are OrderedDicts, and no OrderedDict method is used on them by
        # amqtt or us): an empty dict is not tracked by the garbage collector, and most
        # sessions never hold a message.
        self.inflight_out: dict[int, OutgoingApplicationMessage] = {}
        self.inflight_in: dict[int, IncomingApplicationMessage] = {}
        self.retained_messages = Mailbox()
        self.delivered_message_queue = Mailbox()

    _learned: ClassVar[bool] = False
    lean_state = "new"
    """amqtt's state of the session, which ``transitions`` shows (broker.lean.SessionState)."""

    @property
    def transitions(self) -> SessionState:
        """The session's state machine, as amqtt's Session has one: a view made at each use."""
        return SessionState(self)

    def _init_states(self) -> None:
        """Nothing to build: the state is ``lean_state``."""


def learn_defaults() -> None:
    """Make amqtt's per-session defaults LeanSession's class attributes.

    EngineMismatch if one is not a plain value: a session that sets one gets its own, so only
    an immutable value may be shared.
    """
    for name, value in reliance.session_defaults(vars(Session())).items():
        setattr(LeanSession, name, value)
    LeanSession._learned = True


class Message(OutgoingApplicationMessage):
    """amqtt's outgoing message, with what MQTT 5 adds to it."""

    __slots__ = ("props", "subscription_ids")

    def __init__(  # noqa: PLR0917 - amqtt's positional order, extended
        self,
        packet_id: int | None,
        topic: str,
        qos: int,
        data: bytes,
        retain: bool,
        props: Props | None = None,
        subscription_ids: tuple[int, ...] = (),
    ) -> None:
        """Make the message as amqtt does, with MQTT 5 properties (a broker.records.Props)."""
        super().__init__(packet_id, topic, qos, data, retain)
        self.props = props
        self.subscription_ids = subscription_ids


class Incoming(IncomingApplicationMessage):
    """amqtt's incoming QoS 2 message, kept until PUBREL, with its MQTT 5 properties."""

    __slots__ = ("props",)

    def __init__(  # noqa: PLR0917 - amqtt's positional order, extended
        self, packet_id: int, topic: str, qos: int, data: bytes, retain: bool,
        props: Props | None = None,
    ) -> None:  # fmt: skip
        """Make the message as amqtt does, with MQTT 5 properties (a broker.records.Props)."""
        super().__init__(packet_id, topic, qos, data, retain)
        self.props = props
