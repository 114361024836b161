"""The topic rules of broker/acl.py, without a network: MQTT 3.1.1 section 4.7 matching
(``+`` one level, ``#`` the rest including the parent level, no wildcard match of a
``$`` topic [MQTT-4.7.2-1]) and the filter containment a read grant needs: a
subscription filter is granted only if every topic it can match is matched by the rule.
Checked against a brute force over generated topics; ``%u``/``%c`` substitution never
lets a user name or client id add levels or wildcards. (Pure functions: there is no
stock-amqtt counterpart to run.)"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.acl import TopicAcl, covers, is_valid_filter, matches, split
from chatserver.config import AclRule

LEVELS = ["a", "b", "$x", ""]
topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join)
filters = st.lists(st.sampled_from([*LEVELS, "+", "#"]), min_size=1, max_size=4).map("/".join).filter(is_valid_filter)
ALL_TOPICS = ["/".join(parts) for n in range(1, 6) for parts in itertools.product(LEVELS, repeat=n)]


def test_matching_examples() -> None:
    assert matches(split("a/#"), split("a"))  # section 4.7.1.2: "#" includes the parent level
    assert matches(split("a/+"), split("a/"))  # an empty level is a level
    assert not matches(split("+"), split("a/b"))
    assert not matches(split("#"), split("$SYS/x"))  # [MQTT-4.7.2-1]
    assert matches(split("$SYS/#"), split("$SYS/x"))
    assert covers(split("dev/+/#"), split("dev/x"))
    assert not covers(split("dev/+/#"), split("dev/#"))
    assert not covers(split("#"), split("$SYS/#"))


@settings(max_examples=300, deadline=None)
@given(outer=filters, inner=filters)
def test_covers_means_every_matching_topic_is_granted(outer: str, inner: str) -> None:
    inner_topics = [t for t in ALL_TOPICS if matches(split(inner), split(t))]
    brute = all(matches(split(outer), split(t)) for t in inner_topics)
    if covers(split(outer), split(inner)):
        assert brute, f"{outer!r} said to cover {inner!r}"
    elif "#" not in inner:
        # Without "#", inner matches finitely many shapes: the sample decides exactly.
        assert not brute or not inner_topics, f"{outer!r} covers {inner!r} but was refused"


def test_patterns_never_inject_levels_or_wildcards() -> None:
    rules = [AclRule(topic="dev/%u/#"), AclRule(topic="cid/%c", access="write")]
    acl = TopicAcl.build(rules, "alice", "alice.phone")
    assert acl.may_subscribe("dev/alice/x") and not acl.may_subscribe("dev/bob/x")
    assert acl.may_publish("cid/alice.phone") and not acl.may_receive("cid/alice.phone")
    for client_id in ("a/b", "+", "#", "x/#"):
        hostile = TopicAcl.build(rules, None, client_id)
        assert hostile.write == () and hostile.read == (), client_id  # no %u for anonymous, %c refused
    assert not TopicAcl.build([AclRule(topic="#")], "alice", "alice.phone").may_publish("$SYS/x")
