"""Fuzzing groups through the real broker (Hypothesis): ``group.*`` requests with arbitrary arguments and
group messages with arbitrary ``to``, ``type`` and body, from a member and from strangers, never crash the
broker and never get ``internal``: each request gets exactly one ``res``, ok or refused with a code of
docs/PROTOCOL.md section 11, and each message ``sent`` or a refusal naming it. After every test a fresh
client still pings, and the group still works for its members."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatproto import GROUP_OPS
from tests.deployment import ClusterDeployment
from tests.helpers import BrokerThread, Peer, online_peer

GROUP_CODES = {"bad_envelope", "not_member", "forbidden", "unknown_recipient", "group_full", "too_many_groups"}
MESSAGE_CODES = {"bad_envelope", "forbidden", "too_large", "bad_json", "unknown_recipient"}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


@dataclass
class Groups:
    broker: Any  # BrokerThread or ClusterDeployment
    alice: Peer  # a member and admin
    mallory: Peer  # a stranger to the group
    group: str


@pytest.fixture(scope="module", params=["single", "cluster"])
def groups(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Groups]:
    overrides = {"limits.send_rate_per_s": 1e6, "limits.send_burst": 1_000_000, "limits.max_group_members": 4,
                 "limits.max_groups_per_user": 8}
    root = Path(tmp_path_factory.mktemp("fuzzgroups"))
    running: Any = (ClusterDeployment(root / "cluster", request.getfixturevalue("redis_cluster"), overrides).start()
                    if request.param == "cluster" else BrokerThread(root / "data", overrides).start())
    made: list[Any] = []
    try:
        running.add_users({name: f"{name}-pw" for name in ("alice", "bob", "carol", "mallory")})
        alice, mallory = online_peer(running.port, made, "alice"), online_peer(running.port, made, "mallory")
        res = alice.request("group.create", {"name": "fuzzed", "members": ["bob"]})
        yield Groups(running, alice, mallory, res["result"]["group"])
    finally:
        for peer in made:
            peer.close()
        running.stop()


@pytest.fixture(autouse=True)
def still_works(groups: Groups) -> Iterator[None]:
    yield
    fresh = Peer(groups.broker.port, "carol", "carol-pw", device=f"d{uuid.uuid4().hex[:8]}")
    try:
        assert fresh.connect() == 0 and fresh.subscribe() == [1]
        assert fresh.request("ping")["ok"] is True
    finally:
        fresh.close()
    if not groups.alice.request("group.info", {"group": groups.group})["ok"]:  # the fuzz drew alice's group.leave
        groups.group = groups.alice.request("group.create", {"name": "fuzzed", "members": []})["result"]["group"]
    rid = uuid.uuid4().hex[:12]
    groups.alice.publish("u/alice/out", {"id": rid, "to": groups.group, "body": "still here"})
    answer = groups.alice.expect(lambda i: i.get("kind") in ("receipt", "error") and rid in (i.get("ids") or [i.get(
        "ref")]))
    assert answer["kind"] == "receipt", answer


USERS = st.sampled_from(["alice", "bob", "carol", "mallory", "nobody", "", "A", "x" * 40, "g:x"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=30) | USERS,
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def group_ids(groups: Groups) -> st.SearchStrategy[Any]:
    return st.sampled_from([groups.group, "g:nosuchgroup", "g:", "g:a/b", "x", 7, None])


@given(data=st.data())
@FUZZ
def test_group_requests_get_one_clear_answer(groups: Groups, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(sorted(GROUP_OPS)))
    args: dict[str, Any] = data.draw(st.fixed_dictionaries({}, optional={
        "group": group_ids(groups), "name": st.text(max_size=120) | JSON,
        "members": st.lists(USERS, max_size=6) | JSON, "add": st.lists(USERS, max_size=3) | JSON,
        "remove": st.lists(USERS, max_size=3) | JSON, "junk": JSON}))
    peer = data.draw(st.sampled_from([groups.alice, groups.mallory]))
    res = peer.request(op, args)
    assert res["kind"] == "res"
    if not res["ok"]:
        assert res["error"]["code"] in GROUP_CODES, res
    json.dumps(res)


@given(data=st.data())
@FUZZ
def test_group_messages_get_sent_or_a_refusal(groups: Groups, data: st.DataObject) -> None:
    peer = data.draw(st.sampled_from([groups.alice, groups.mallory]))
    msg_id = uuid.uuid4().hex
    payload: dict[str, Any] = {"id": msg_id, "to": data.draw(group_ids(groups))}
    payload.update(data.draw(st.fixed_dictionaries({}, optional={
        "body": st.text(max_size=50) | JSON, "type": st.sampled_from(["text", "megolm", "olm", "BAD", ""]),
        "bodies": JSON})))
    peer.publish(f"u/{peer.user}/out", json.dumps(payload).encode())
    item = peer.expect(lambda i: i.get("kind") in ("receipt", "error") and (
        i.get("ref") == msg_id or msg_id in i.get("ids", [])))
    if item["kind"] == "error":
        assert item["code"] in MESSAGE_CODES, item
    else:
        assert item["status"] == "sent" and peer is groups.alice, item
