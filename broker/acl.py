"""Who may read and write which topics: mosquitto's ``acl_file`` format, checked cheaply.

Pure: text in, decisions out. The format, as mosquitto's::

    # anonymous clients: the lines before any "user"
    topic read $SYS/#
    user alice
    topic readwrite dev/alice/#
    topic deny dev/alice/secret
    pattern readwrite dev/%u/#      # every client: %u its user name, %c its client id

``topic [read|write|readwrite|deny] FILTER`` (no access word: readwrite) applies to the user
named last (or to anonymous clients); ``pattern`` lines apply to every client, wherever they
stand. As in mosquitto: a client may publish to a topic that a write rule of its own matches,
and read one that a read rule matches, unless a deny rule matches it; ``$SYS`` is never
writable. A SUBSCRIBE is granted when some read rule could match a topic of its filter (the
filters overlap) and no deny rule covers the whole filter; each message is then checked on
delivery, so that ``#`` never leaks a topic the client may not read.

Decisions are remembered per client and topic (:class:`Checker`), so that a message to an
allowed topic costs a dictionary lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from broker.topics import topic_matches

READ, WRITE = 1, 2
ACCESS: Final = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
CACHE_LIMIT = 1000
"""Topics remembered per client and kind of access; past that, the cache starts over."""


class AclError(ValueError):
    """A malformed ACL file: the line and why."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``topic`` or ``pattern`` line: a filter and the access it grants (0: deny)."""

    access: int
    topic_filter: str
    line: int


@dataclass(frozen=True, slots=True)
class Acl:
    """The rules of an ACL file."""

    anonymous: tuple[Rule, ...] = ()
    users: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    patterns: tuple[Rule, ...] = ()

    def __str__(self) -> str:
        """How much the ACL says, for the log."""
        count = len(self.anonymous) + len(self.patterns) + sum(map(len, self.users.values()))
        return f"{count} rules, {len(self.users)} users, {len(self.patterns)} patterns"

    def rules_for(self, username: str | None, client_id: str) -> tuple[Rule, ...]:
        """Return the rules that apply to one client, patterns filled in with its names."""
        own = self.anonymous if username is None else self.users.get(username, ())
        filled = []
        for rule in self.patterns:
            if "%u" in rule.topic_filter and username is None:
                continue  # mosquitto: a pattern naming the user does not apply without one
            text = rule.topic_filter.replace("%c", client_id).replace("%u", username or "")
            filled.append(Rule(rule.access, text, rule.line))
        return (*own, *filled)


def parse(text: str, source: str = "ACL") -> Acl:
    """Read an ACL file's text; raise AclError naming the line that is wrong."""
    anonymous: list[Rule] = []
    users: dict[str, list[Rule]] = {}
    patterns: list[Rule] = []
    current = anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "user":
            if not rest:
                raise AclError(f"{source}:{number}: 'user' needs a name")
            current = users.setdefault(rest, [])
            continue
        if word not in ("topic", "pattern"):
            raise AclError(f"{source}:{number}: unknown keyword {word!r} "
                           "(expected topic, pattern or user)")  # fmt: skip
        access_word, _, topic_filter = rest.partition(" ")
        if access_word in ACCESS:
            access, topic_filter = ACCESS[access_word], topic_filter.strip()
        else:  # no access word: readwrite, the whole rest is the filter
            access, topic_filter = READ | WRITE, rest
        problem = _bad_filter(topic_filter)
        if problem:
            raise AclError(f"{source}:{number}: {problem}")
        rule = Rule(access, topic_filter, number)
        (patterns if word == "pattern" else current).append(rule)
    return Acl(tuple(anonymous), {u: tuple(r) for u, r in users.items()}, tuple(patterns))


def load(path: Path) -> Acl:
    """Read an ACL file; raise AclError (an unreadable file too)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AclError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, str(path))


def _bad_filter(topic_filter: str) -> str | None:
    if not topic_filter:
        return "a rule needs a topic filter"
    if " " in topic_filter:
        return f"topic filter {topic_filter!r} has a space"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return f"topic filter {topic_filter!r}: '#' must be a whole last level"
        if "+" in level and level != "+":
            return f"topic filter {topic_filter!r}: '+' must be a whole level"
    return None


def overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters (section 4.7; ``$`` topics as [MQTT-4.7.2-1])."""
    left, right = a.split("/"), b.split("/")
    if (left[0].startswith("$") and right[0] in ("+", "#")) or (
        right[0].startswith("$") and left[0] in ("+", "#")
    ):
        return False
    for x, y in zip(left, right, strict=False):
        if x == "#" or y == "#":
            return True
        if x != y and "+" not in (x, y):
            return False
    return len(left) == len(right) or "#" in (left[len(right):len(right) + 1]
                                              + right[len(left):len(left) + 1])  # fmt: skip


def covers(outer: str, inner: str) -> bool:
    """Whether every topic ``inner`` matches, ``outer`` matches too (a deny that covers all)."""
    left, right = outer.split("/"), inner.split("/")
    for index, level in enumerate(left):
        if level == "#":
            return True
        if index >= len(right):
            return False
        if right[index] == "#" or (level != "+" and (level != right[index] or right[index] == "+")):
            return False
    return len(left) == len(right)


class Checker:
    """One client's decisions under an ACL, remembered per topic."""

    __slots__ = ("_read", "_rules", "_write")

    def __init__(self, acl: Acl, username: str | None, client_id: str) -> None:
        """Decide for ``username`` (None: anonymous) with ``client_id``."""
        self._rules = acl.rules_for(username, client_id)
        self._read: dict[str, bool] = {}
        self._write: dict[str, bool] = {}

    def _decide(self, topic: str, access: int) -> bool:
        allowed = False
        for rule in self._rules:
            if topic_matches(topic, rule.topic_filter):
                if rule.access == 0:
                    return False
                allowed = allowed or bool(rule.access & access)
        return allowed

    def _cached(self, cache: dict[str, bool], topic: str, access: int) -> bool:
        known = cache.get(topic)
        if known is None:
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            known = cache[topic] = self._decide(topic, access)
        return known

    def may_read(self, topic: str) -> bool:
        """Whether the client may receive a message on ``topic``."""
        return self._cached(self._read, topic, READ)

    def may_write(self, topic: str) -> bool:
        """Whether the client may publish to ``topic`` (never to ``$SYS``)."""
        return not topic.startswith("$SYS") and self._cached(self._write, topic, WRITE)

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether a SUBSCRIBE to ``topic_filter`` is granted (its messages are checked after)."""
        real = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        readable = False
        for rule in self._rules:
            if rule.access == 0:
                if covers(rule.topic_filter, real):
                    return False
            elif rule.access & READ and overlap(rule.topic_filter, real):
                readable = True
        return readable
