"""Topic names and who may use them (docs/PROTOCOL.md section 3).

A device subscribes to ``u/{me}/in`` only and publishes to the five uplink
topics ``u/{me}/{out,ack,seen,hb,req}`` only.
"""

from __future__ import annotations

from typing import Final

TOPIC_PREFIX: Final = "u/"
DOWNLINK: Final = "in"
UPLINKS: Final = frozenset({"out", "ack", "seen", "hb", "req"})


def inbox_topic(user: str) -> str:
    return f"{TOPIC_PREFIX}{user}/{DOWNLINK}"


def uplink_topic(user: str, kind: str) -> str:
    return f"{TOPIC_PREFIX}{user}/{kind}"


def is_chat_topic(topic: str) -> bool:
    """Topics under ``u/`` belong to the chat protocol, whatever follows."""
    return topic.startswith(TOPIC_PREFIX)


def uplink_kind(user: str, topic: str) -> str | None:
    """The uplink kind (``out``, ``ack``, ...) if ``user`` may publish to ``topic``."""
    prefix = f"{TOPIC_PREFIX}{user}/"
    if not topic.startswith(prefix):
        return None
    kind = topic[len(prefix):]
    return kind if kind in UPLINKS else None


def may_subscribe(user: str, topic_filter: str) -> bool:
    """A device may subscribe to its own inbox and to nothing else under ``u/``."""
    return topic_filter == inbox_topic(user)
