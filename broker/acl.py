"""Topic names, topic filters and the generic-topic ACL (MQTT 3.1.1 section 4.7).

Pure functions and one small class; no I/O. ``broker.server`` uses them for the
topics outside the chat protocol (anything not under ``u/``): the chat topics
follow PROTOCOL.md in ``chatproto`` and no rule here can change that.

Rules (docs/MQTT.md, "Generic topics"):
- a rule is an MQTT topic filter with ``%u`` (user name) and ``%c`` (client id)
  patterns and an access ``read``, ``write`` or ``readwrite``, as in mosquitto's
  ACL file; grants add up, there is no deny;
- a rule with ``%u`` never applies to an anonymous client, and a rule with ``%c``
  never applies to a client id containing ``/``, ``+`` or ``#`` (the id would
  turn into extra levels or wildcards);
- PUBLISH to a topic needs a write rule matching it; SUBSCRIBE to a filter needs
  a read rule whose filter contains every topic the subscription filter can
  match; each delivered message needs a read rule matching its topic;
- topics starting with ``$`` are never matched by a rule starting with a wildcard
  [MQTT-4.7.2-1], and no client may publish to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

READ = "read"
WRITE = "write"

Levels = tuple[str, ...]


class RuleLike(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def access(self) -> str: ...


def is_valid_filter(topic_filter: str) -> bool:
    """Section 4.7.1: ``#`` only as the whole last level, ``+`` only as a whole level."""
    if not topic_filter:
        return False  # [MQTT-4.7.3-1]
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False  # [MQTT-4.7.1-2]
        if "+" in level and level != "+":
            return False  # [MQTT-4.7.1-3]
    return True


def is_valid_topic_name(topic: str) -> bool:
    """Section 4.7.3 and 3.3.2.1: a PUBLISH topic is non-empty and has no wildcard."""
    return bool(topic) and "+" not in topic and "#" not in topic  # [MQTT-4.7.3-1], [MQTT-3.3.2-2]


def matches(levels: Levels, topic: Levels) -> bool:
    """Does the filter ``levels`` match the topic name ``topic`` (both split on ``/``)?"""
    if topic and topic[0].startswith("$") and levels and levels[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    for index, level in enumerate(levels):
        if level == "#":
            return True  # matches the parent level too: "a/#" matches "a" (section 4.7.1.2)
        if index >= len(topic) or (level != "+" and level != topic[index]):
            return False
    return len(levels) == len(topic)


def covers(outer: Levels, inner: Levels) -> bool:
    """Is every topic that filter ``inner`` matches also matched by filter ``outer``?

    This is what a read grant needs: ``dev/+/#`` covers ``dev/x/y``, ``dev/+/y`` and
    ``dev/x``, but not ``dev/#``, which also matches ``dev``.
    """
    if inner and inner[0].startswith("$") and outer and outer[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]: such an outer filter matches no $ topic
    for index, level in enumerate(outer):
        if level == "#":
            return True
        if index >= len(inner):
            return False  # inner ends here; outer needs more levels (a trailing "#" returned above)
        sub = inner[index]
        if sub == "#":
            return False  # inner matches any depth here; only "#" in outer covers that
        if level == "+":
            continue  # "+" covers a literal or a "+" level
        if sub != level:
            return False  # a literal covers only the same literal (not "+")
    return len(inner) == len(outer)


def split(topic: str) -> Levels:
    return tuple(topic.split("/"))


_UNSAFE_IN_LEVEL = ("/", "+", "#")


@dataclass(frozen=True, slots=True)
class TopicAcl:
    """The generic-topic grants of one client, with ``%u``/``%c`` already filled in."""

    read: tuple[Levels, ...]
    write: tuple[Levels, ...]

    @classmethod
    def build(cls, rules: Sequence[RuleLike], username: str | None, client_id: str) -> TopicAcl:
        read: list[Levels] = []
        write: list[Levels] = []
        for rule in rules:
            topic = rule.topic
            if "%u" in topic:
                if username is None or any(c in username for c in _UNSAFE_IN_LEVEL):
                    continue
                topic = topic.replace("%u", username)
            if "%c" in topic:
                if not client_id or any(c in client_id for c in _UNSAFE_IN_LEVEL):
                    continue
                topic = topic.replace("%c", client_id)
            levels = split(topic)
            if rule.access in (READ, "readwrite"):
                read.append(levels)
            if rule.access in (WRITE, "readwrite"):
                write.append(levels)
        return cls(tuple(read), tuple(write))

    def may_publish(self, topic: str) -> bool:
        if topic.startswith("$"):
            return False  # section 4.7.2: $ topics are the server's
        levels = split(topic)
        return any(matches(rule, levels) for rule in self.write)

    def may_subscribe(self, topic_filter: str) -> bool:
        inner = split(topic_filter)
        return any(covers(rule, inner) for rule in self.read)

    def may_receive(self, topic: str) -> bool:
        levels = split(topic)
        return any(matches(rule, levels) for rule in self.read)


NO_ACCESS = TopicAcl((), ())
