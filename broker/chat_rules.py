"""Which connections are chat sessions, and what a chat session may do (pure, but for ``hand_uplink``).

Shared by both connection paths: amqtt's (broker/server.py) and the lean one (broker/lean.py,
broker/chat_session.py). The rules are PROTOCOL.md's: a device ``{user}.{device}`` publishes
only to its own five uplinks ``u/{user}/{out,ack,seen,hb,req}`` and subscribes only to its
own inbox ``u/{user}/in``.
"""

from __future__ import annotations

import logging

from broker.counters import BrokerCounters
from broker.mqtt.codec import SUBACK_FAILURE
from broker.mqtt.events import Connect
from broker.port import ChatPort
from chatproto import Caller, inbox_topic, split_client_id, uplink_kind

log = logging.getLogger(__name__)


def lean_caller(connect: Connect, generic_topics: bool) -> Caller | None:
    """The chat device a CONNECT logs in, if the lean path can serve it; None: amqtt's path.

    Lean: a user name and a client id ``{that user}.{device}``, no QoS 2 will, and no generic
    topics opened to users (``mqtt.acl``: those need amqtt's subscriptions and retained
    messages). Whether the user exists and the password or token is right is the login's
    business, after routing (a refused login is answered the same on both paths).
    """
    if connect.username is None or generic_topics:
        return None
    parts = split_client_id(connect.client_id)
    if parts is None or parts[0] != connect.username:
        return None
    if connect.will is not None and connect.will.qos > 1:
        return None
    return Caller(parts[0], parts[1])


def may_will(caller: Caller, topic: str) -> bool:
    """A chat session's will may go only to one of its own uplinks."""
    return uplink_kind(caller.user, topic) is not None


def grant(caller: Caller, topic_filter: str, requested: int) -> int:
    """SUBACK code for one filter of a chat session: its own inbox at min(requested, 1), nothing else."""
    if topic_filter == inbox_topic(caller.user):
        return min(requested, 1)
    return SUBACK_FAILURE


def hand_uplink(port: ChatPort, counters: BrokerCounters, caller: Caller, topic: str, payload: bytes) -> None:
    """A chat device's publish: to the bridge if ``topic`` is one of its uplinks, else refused (counted,
    logged, and an ``error`` item for the device through the bridge)."""
    kind = uplink_kind(caller.user, topic)
    if kind is None:
        refuse_publish(port, counters, caller.client_id, caller, topic)
        return
    counters.publish(kind)
    port.on_uplink(caller, kind, payload)


def refuse_publish(port: ChatPort, counters: BrokerCounters, client_id: str, caller: Caller | None,
                   topic: str) -> None:
    """A publish the ACL refuses: counted, logged, and a chat device gets an ``error`` item."""
    counters.publish("forbidden")
    log.info("%s may not publish to %r", client_id, topic)
    if caller is not None:
        port.refuse_topic(caller, topic)
