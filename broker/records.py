"""The records both codecs decode into, and the properties a message carries.

Pure data: :mod:`broker.protocol` (MQTT 3.1.1) and :mod:`broker.v5` (MQTT 5.0) decode a
client's packets into these, so that one handler per packet kind serves both versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple


class Props(NamedTuple):
    """The MQTT 5 properties a message carries from its publisher to its subscribers."""

    payload_format_indicator: int = 0
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    expires_at: float | None = None
    """When the message expires (time.monotonic()), from its message expiry interval."""

    def remaining(self, now: float) -> int | None:
        """Seconds of expiry left (rounded up), None when it never expires."""
        if self.expires_at is None:
            return None
        return max(0, math.ceil(self.expires_at - now))

    def expired(self, now: float) -> bool:
        """Whether the message has expired (it is then dropped from every queue)."""
        return self.expires_at is not None and now >= self.expires_at


EMPTY: Final = Props()


# Publish is made for every message, and Connect, Wanted and Subscribe for every connect: plain
# slotted dataclasses, treated as immutable. A frozen one sets each field through
# object.__setattr__: 330 ns more for a Publish (10 % of a message), and 2.4 us of the 35 a
# CONNECT and SUBSCRIBE cost the broker (with connect.Request).
@dataclass(slots=True)
class Publish:
    """A checked PUBLISH of either version."""

    topic: str
    """Empty for an MQTT 5 PUBLISH that names its topic by an alias it set before."""
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None
    raw: bytes | None = None
    """The packet as received, when it is also what a QoS 0 subscriber of the same version
    gets (QoS 0, RETAIN 0, and for MQTT 5 no topic alias)."""
    props: Props | None = None
    """MQTT 5: the properties forwarded to subscribers."""
    alias: int | None = None
    """MQTT 5: the topic alias (section 3.3.2.3.4)."""


@dataclass(slots=True)
class Wanted:
    """One filter of a SUBSCRIBE, as either version asks for it (3.1.1: the QoS alone)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    """MQTT 5: 0 send retained messages, 1 only for a new subscription, 2 never."""


@dataclass(slots=True)
class Subscribe:
    """A checked SUBSCRIBE of either version."""

    packet_id: int
    filters: tuple[Wanted, ...]
    subscription_id: int | None = None
    """MQTT 5: the subscription identifier, sent back with every match."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """A checked UNSUBSCRIBE of either version: its packet id and topic filters."""

    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Will:
    """The will message a CONNECT carries."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class Connect:
    """A checked CONNECT of either version."""

    client_id: str
    clean_session: bool
    """3.1.1: start afresh, and end with the connection. MQTT 5 splits it in two (below)."""
    keep_alive: int
    will: Will | None = None
    username: str | None = None
    password: str | None = None
    session_expiry: int | None = None
    """MQTT 5's session expiry interval; None for 3.1.1 (0 if clean, else for ever)."""

    @property
    def ends_with_connection(self) -> bool:
        """Whether the session ends with this connection (3.1.1 clean session; MQTT 5: 0 s)."""
        return self.clean_session if self.session_expiry is None else self.session_expiry == 0
