"""The chat session rules shared by both connection paths (broker/chat_rules.py): which CONNECT is a lean
chat session, what it may subscribe to and put in its will, and where its publishes go."""

from __future__ import annotations

from typing import Any

import pytest

from broker.chat_rules import grant, hand_uplink, lean_caller, may_will
from broker.counters import BrokerCounters
from broker.mqtt.events import Connect, Will
from chatproto import Caller

ALICE = Caller("alice", "phone")


@pytest.mark.parametrize(("connect", "generic", "lean"), [
    (Connect("alice.phone", username="alice"), False, True),
    (Connect("alice.phone", username="alice", will=Will("u/alice/hb", b"x", 1)), False, True),
    (Connect("alice.phone", username="alice"), True, False),  # mqtt.acl opens generic topics: amqtt's
    (Connect("alice.phone"), False, False),  # anonymous
    (Connect("bob.phone", username="alice"), False, False),  # someone else's id: refused on amqtt's path
    (Connect("sensor-7", username="alice"), False, False),
    (Connect("alice.phone", username="alice", will=Will("u/alice/hb", b"x", 2)), False, False),  # QoS 2 will
])
def test_lean_caller(connect: Connect, generic: bool, lean: bool) -> None:
    assert (lean_caller(connect, generic) == ALICE) is lean


def test_grant_only_the_own_inbox_at_most_qos1() -> None:
    assert [grant(ALICE, "u/alice/in", q) for q in (0, 1, 2)] == [0, 1, 1]
    for topic_filter in ("u/bob/in", "u/alice/#", "#", "u/+/in", "u/alice/out", "news/x"):
        assert grant(ALICE, topic_filter, 1) == 0x80


def test_may_will_only_on_own_uplinks() -> None:
    assert may_will(ALICE, "u/alice/hb") and may_will(ALICE, "u/alice/out")
    assert not may_will(ALICE, "u/bob/hb") and not may_will(ALICE, "u/alice/in") and not may_will(ALICE, "x/y")


class Port:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_uplink(self, caller: Caller, kind: str, payload: bytes) -> None:
        self.calls.append(("uplink", caller, kind, payload))

    def refuse_topic(self, caller: Caller, topic: str) -> None:
        self.calls.append(("refused", caller, topic))


def test_hand_uplink_routes_or_refuses() -> None:
    port, counters = Port(), BrokerCounters()
    hand_uplink(port, counters, ALICE, "u/alice/out", b"m")  # type: ignore[arg-type]  # the two calls used
    hand_uplink(port, counters, ALICE, "u/bob/out", b"m")  # type: ignore[arg-type]
    assert port.calls == [("uplink", ALICE, "out", b"m"), ("refused", ALICE, "u/bob/out")]
    assert counters.uplink == {"out": 1, "forbidden": 1}
