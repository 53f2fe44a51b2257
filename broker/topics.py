"""Which subscribers a topic has: topic matching and the options MQTT 5 keeps per subscription.

Pure and amqtt-free; :class:`broker.engine.Engine` runs it over amqtt's subscription table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple


@dataclass(frozen=True, slots=True)
class SubOptions:
    """MQTT 5 subscription options that outlive the SUBSCRIBE (section 3.8.3.1)."""

    no_local: bool = False
    retain_as_published: bool = False
    subscription_id: int | None = None


PLAIN: Final = SubOptions()


class Match(NamedTuple):
    """One subscriber of a topic: its session, QoS and options (a tuple: made per match)."""

    session: Any
    """amqtt's Session (this module does not import amqtt)."""
    qos: int
    no_local: bool
    retain_as_published: bool
    subscription_ids: tuple[int, ...]


def subscribers(
    topic: str,
    subscriptions: Mapping[str, Iterable[tuple[Any, int]]],
    options: Mapping[tuple[str, str], SubOptions],
) -> tuple[list[Match], list[tuple[str, list[Match]]]]:
    """Return the subscribers of ``topic``: each session once, each shared group's members.

    ``subscriptions`` maps a filter to its (session, granted QoS) pairs, as amqtt keeps them;
    ``options`` holds the MQTT 5 options that differ from the defaults, per (client id, filter).
    A session whose filters overlap gets one delivery, at its highest granted QoS, with the
    identifiers of every matching subscription [MQTT-3.3.5-1].
    """
    best: dict[str, Match] = {}
    groups: dict[str, list[Match]] = {}
    for topic_filter, subscribed in subscriptions.items():
        shared = topic_filter.startswith("$share/")
        real = topic_filter.split("/", 2)[2] if shared else topic_filter
        if not topic_matches(topic, real):
            continue
        for session, granted in subscribed:
            opts = options.get((session.client_id, topic_filter), PLAIN) if options else PLAIN
            ids = (opts.subscription_id,) if opts.subscription_id else ()
            match = Match(session, granted, opts.no_local, opts.retain_as_published, ids)
            if shared:
                groups.setdefault(topic_filter, []).append(match)
                continue
            seen = best.get(session.client_id)
            if seen is not None:
                match = Match(session, max(granted, seen.qos), seen.no_local and opts.no_local,
                              seen.retain_as_published or opts.retain_as_published,
                              seen.subscription_ids + ids)  # fmt: skip
            best[session.client_id] = match
    return list(best.values()), list(groups.items())


def topic_matches(topic: str, topic_filter: str, *, dollar: bool = False) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (section 4.7; [MQTT-4.7.2-1] for $ topics).

    ``dollar`` lets a leading wildcard match a ``$`` topic too (a deny list's ``#`` covers
    ``$SYS/#``); the specification's rule is without it.
    """
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic == topic_filter
    if not dollar and topic.startswith("$") and topic_filter[0] in "+#":
        return False
    levels = topic.split("/")
    wanted = topic_filter.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(levels) == len(wanted)
