"""The SDK's group parts without a network: what a device knows of a group's members
(``groups.after_change``, ``Membership``), the request results, and the steps both faces run."""

from __future__ import annotations

from typing import Any

import pytest

from chatproto import GROUP_CREATED, GROUP_MEMBER_ADDED, GROUP_MEMBER_LEFT, GROUP_MEMBER_REMOVED, GROUP_RENAMED
from client_sdk.errors import RequestError
from client_sdk.events import GroupEvent
from client_sdk.groups import (
    BAD_RESULT,
    GroupInfo,
    GroupReceiptInfo,
    MemberReceipt,
    Membership,
    after_change,
    create_steps,
    info_from,
    leave_steps,
    members_steps,
    receipts_steps,
    summaries_from,
)
from client_sdk.localstore import LocalStore

G = "g:team"


def change(gseq: int, event: str, *users: str, group: str = G) -> GroupEvent:
    return GroupEvent(group, gseq, event, "alice", 1000 + gseq, 100 + gseq, users)


def test_members_follow_the_changes_in_order() -> None:
    known = after_change(None, change(1, GROUP_CREATED, "alice", "bob"), "bob")
    assert known == (("alice", "bob"), 1)
    known = after_change(known, change(3, GROUP_MEMBER_ADDED, "carol", "bob"), "bob")
    assert known == (("alice", "bob", "carol"), 3)
    known = after_change(known, change(4, GROUP_RENAMED), "bob")
    assert known == (("alice", "bob", "carol"), 4)
    known = after_change(known, change(6, GROUP_MEMBER_LEFT, "alice"), "bob")
    assert known == (("bob", "carol"), 6)


def test_a_change_already_included_or_of_an_unknown_group_changes_nothing() -> None:
    known = (("alice", "bob"), 5)  # e.g. from group.info at gseq 5
    assert after_change(known, change(4, GROUP_MEMBER_REMOVED, "bob"), "alice") == known
    assert after_change(None, change(7, GROUP_MEMBER_ADDED, "carol"), "bob") is None


def test_a_removed_member_forgets_the_group() -> None:
    known = (("alice", "bob"), 2)
    assert after_change(known, change(3, GROUP_MEMBER_REMOVED, "bob"), "bob") is None


def test_membership_keeps_what_it_learns_in_the_store() -> None:
    store = LocalStore(None, "bob", "phone")
    store.unlock(None)
    members = Membership(store, "bob")
    members.learn(GroupInfo(G, "team", ("alice", "bob"), ("alice",), 5))
    members.apply(change(4, GROUP_MEMBER_REMOVED, "alice"))  # older than what group.info said
    assert members.members(G) == ("alice", "bob")
    members.apply(change(6, GROUP_MEMBER_ADDED, "carol"))
    assert members.known(G) == (("alice", "bob", "carol"), 6)
    members.learn(GroupInfo(G, "team", ("alice",), ("alice",), 3))  # an older answer: ignored
    assert members.members(G) == ("alice", "bob", "carol")
    members.apply(change(7, GROUP_MEMBER_REMOVED, "bob"))
    assert members.members(G) is None


def test_results_are_read_or_refused_as_bad_result() -> None:
    info = info_from("group.info", {"group": G, "name": "team", "created_at": 5, "gseq": 3,
                                    "members": ["alice", "bob"], "admins": ["alice"]})
    assert info == GroupInfo(G, "team", ("alice", "bob"), ("alice",), 3, 5)
    summaries = summaries_from({"groups": [{"group": G, "name": "team", "gseq": 3, "members": 2, "admin": True}]})
    assert [(s.group, s.members, s.admin) for s in summaries] == [(G, 2, True)]
    for bad in ({"group": "team", "name": "x", "gseq": 1, "members": [], "admins": []},
                {"group": G, "name": "x", "gseq": True, "members": [], "admins": []},
                {"group": G, "name": "x", "gseq": 1, "members": [1], "admins": []}, None):
        with pytest.raises(RequestError) as caught:
            info_from("group.info", bad)
        assert caught.value.code == BAD_RESULT


def run(steps: Any, results: list[Any]) -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    """Drive ``steps`` with canned results; the requests it made and its value."""
    made: list[tuple[str, dict[str, Any]]] = [steps.send(None)]
    try:
        for result in results:
            made.append(steps.send(result))
    except StopIteration as done:
        return made, done.value
    raise AssertionError("the steps wanted more results")


def test_steps_send_the_documented_requests_and_keep_the_members() -> None:
    store = LocalStore(None, "alice", "phone")
    store.unlock(None)
    members = Membership(store, "alice")
    made, info = run(create_steps("team", ["bob", "bob", "carol"], members),
                     [{"group": G, "name": "team", "members": ["alice", "bob", "carol"], "gseq": 1}])
    assert made == [("group.create", {"name": "team", "members": ["bob", "carol"]})]
    assert info.admins == ("alice",) and members.members(G) == ("alice", "bob", "carol")
    made, added = run(members_steps(G, ["dave"], False, members), [{"added": ["dave"], "gseq": 2}])
    assert made == [("group.add", {"group": G, "members": ["dave"]})] and added == ["dave"]
    assert members.members(G) is None  # rule 4: fetched again before the next message
    made, gseq = run(leave_steps(G, members), [{"gseq": 3}])
    assert made == [("group.leave", {"group": G})] and gseq == 3


def test_group_receipts_are_read_or_refused_as_bad_result() -> None:
    made, info = run(receipts_steps(G, "m1"), [{"group": G, "id": "m1", "tracked": True, "seen_tracked": False,
                                                 "members": {"bob": {"delivered": 5, "seen": None}}}])
    assert made == [("group.receipts", {"group": G, "id": "m1"})]
    assert info == GroupReceiptInfo(G, "m1", True, False, {"bob": MemberReceipt(5, None)})
    _, gone = run(receipts_steps(G, "m1"), [{"group": G, "id": "m1", "tracked": False}])
    assert gone == GroupReceiptInfo(G, "m1", False)
    for bad in ({"group": G, "id": "m1"}, {"group": G, "id": "m1", "tracked": True, "members": []},
                {"group": G, "id": "m1", "tracked": True, "members": {"bob": {"delivered": "5"}}}):
        with pytest.raises(RequestError) as caught:
            run(receipts_steps(G, "m1"), [bad])
        assert caught.value.code == BAD_RESULT
