"""Groups without a network: the ``group.*`` requests as chatproto reads them, the group item, and every
rule of bridge/groups/core.py, then random request sequences that must keep its invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.groups.core import (
    Decision,
    Group,
    GroupChange,
    GroupLimits,
    create,
    decide,
    info,
    joins,
    leaves,
    new_group_id,
)
from bridge.requests import OpError
from chatproto import (
    GROUP_ADMINS_CHANGED,
    GROUP_CREATED,
    GROUP_ID_RE,
    GROUP_MEMBER_ADDED,
    GROUP_MEMBER_LEFT,
    GROUP_MEMBER_REMOVED,
    GROUP_OPS,
    GROUP_RENAMED,
    MAX_GROUP_NAME_CHARS,
    DecodeError,
    ErrorCode,
    GroupAdd,
    GroupAdmins,
    GroupCreate,
    GroupInfo,
    GroupItem,
    GroupLeave,
    GroupList,
    GroupRemove,
    GroupRename,
    parse_downlink,
    parse_group_request,
)

GID = "g:AAAAAAAAAAAAAAAAAAAAAA"
LIMITS = GroupLimits(max_members=5, max_groups_per_user=3)
NOW = 1_732_780_800_000


def made(*members: str, name: str = "trip") -> Group:
    """A group created by ``alice`` with ``members``, as the store would hold it."""
    decision = create(GID, "alice", GroupCreate(name, members), LIMITS, NOW)
    assert decision.after is not None
    return decision.after


def refused(code: str, group: Group | None, actor: str, request: GroupChange) -> None:
    with pytest.raises(OpError) as caught:
        decide(group, actor, request, LIMITS, NOW)
    assert caught.value.code == code


# --- the wire -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    GroupCreate("trip 🏔️", ("bob", "carol")), GroupCreate("solo"), GroupAdd(GID, ("bob",)),
    GroupRemove(GID, ("bob",)), GroupLeave(GID), GroupInfo(GID), GroupList(), GroupRename(GID, "new"),
    GroupAdmins(GID, ("bob",), ("carol",)), GroupAdmins(GID, remove=("carol",)),
])
def test_requests_read_back_as_sent(request_: object) -> None:
    assert parse_group_request(request_.OP, request_.args()) == request_  # type: ignore[attr-defined]


@pytest.mark.parametrize(("op", "args"), [
    ("group.create", {"name": ""}),
    ("group.create", {"name": "   "}),
    ("group.create", {"name": "a\nb"}),
    ("group.create", {"name": "a\u2028b"}),  # a line separator
    ("group.create", {"name": "bell\x07"}),
    ("group.create", {"name": "x" * (MAX_GROUP_NAME_CHARS + 1)}),
    ("group.create", {"name": 7}),
    ("group.create", {"name": "ok", "members": "bob"}),
    ("group.create", {"name": "ok", "members": ["Bob"]}),
    ("group.create", {"name": "ok", "members": ["b"] * 1025}),
    ("group.create", {"name": "ok", "owner": "bob"}),
    ("group.add", {"group": GID, "members": []}),
    ("group.add", {"group": "AAAA", "members": ["bob"]}),
    ("group.add", {"group": "g:", "members": ["bob"]}),
    ("group.add", {"group": "g:a/b", "members": ["bob"]}),
    ("group.leave", {}),
    ("group.list", {"group": GID}),
    ("group.admins", {"group": GID}),
    ("group.admins", {"group": GID, "add": [], "remove": []}),
    ("group.admins", {"group": GID, "add": ["bob"], "remove": ["bob"]}),
    ("group.receipts", {"group": GID}),
    ("group.receipts", {"group": GID, "id": "m 1"}),
    ("group.receipts", {"group": GID, "id": "m1", "user": "bob"}),
    ("group.receipts", {"id": "m1"}),
])
def test_bad_requests_are_refused(op: str, args: dict[str, object]) -> None:
    with pytest.raises(DecodeError) as caught:
        parse_group_request(op, args)
    assert caught.value.code == ErrorCode.BAD_ENVELOPE


def test_names_and_member_lists() -> None:
    assert parse_group_request("group.create", {"name": "x" * MAX_GROUP_NAME_CHARS}).name  # type: ignore[union-attr]
    family = "👨\u200d👩\u200d👧"  # zero-width joiners (format characters) are allowed
    assert parse_group_request("group.rename", {"group": GID, "name": family}) == GroupRename(GID, family)
    assert parse_group_request("group.add", {"group": GID, "members": ["bob", "carol", "bob"]}) == \
        GroupAdd(GID, ("bob", "carol"))
    assert set(GROUP_OPS) == {"group.create", "group.add", "group.remove", "group.leave", "group.info",
                              "group.list", "group.rename", "group.admins", "group.receipts"}


def test_group_items_read_back() -> None:
    for item in (GroupItem(7, GID, 1, GROUP_CREATED, "alice", NOW, ("alice", "bob"), "trip"),
                 GroupItem(8, GID, 2, GROUP_ADMINS_CHANGED, "alice", NOW, promoted=("bob",), demoted=("alice",))):
        assert parse_downlink(item.encode()) == item
    assert b'"promoted"' not in GroupItem(9, GID, 3, GROUP_RENAMED, "alice", NOW, name="x").encode()


def test_group_ids_are_random_and_valid() -> None:
    ids = {new_group_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(GROUP_ID_RE.fullmatch(i) and len(i) == 24 for i in ids)


# --- the rules ------------------------------------------------------------------------------


def test_create_makes_the_creator_first_member_and_admin() -> None:
    decision = create(GID, "alice", GroupCreate("trip", ("bob", "alice", "carol")), LIMITS, NOW)
    assert decision.after == Group(GID, "trip", NOW, 1, ("alice", "bob", "carol"), frozenset({"alice"}))
    assert decision.events == (GroupItem(0, GID, 1, GROUP_CREATED, "alice", NOW, ("alice", "bob", "carol"), "trip"),)
    assert decision.notify == ("alice", "bob", "carol")
    assert decision.result == {"group": GID, "name": "trip", "members": ["alice", "bob", "carol"], "gseq": 1}
    with pytest.raises(OpError) as caught:
        create(GID, "alice", GroupCreate("big", ("b", "c", "d", "e", "f")), LIMITS, NOW)
    assert caught.value.code == ErrorCode.GROUP_FULL


def test_only_members_see_a_group_and_others_cannot_tell_it_exists() -> None:
    group = made("bob")
    assert info(group, "bob") == {"group": GID, "name": "trip", "created_at": NOW, "gseq": 1,
                                  "members": ["alice", "bob"], "admins": ["alice"]}
    assert group.summary("bob") == {"group": GID, "name": "trip", "gseq": 1, "members": 2, "admin": False}
    for unseen in (group, None):
        with pytest.raises(OpError) as caught:
            info(unseen, "mallory")
        assert caught.value.code == ErrorCode.NOT_MEMBER
        refused(ErrorCode.NOT_MEMBER, unseen, "mallory", GroupLeave(GID))
        refused(ErrorCode.NOT_MEMBER, unseen, "mallory", GroupAdd(GID, ("mallory",)))


def test_admins_only() -> None:
    group = made("bob", "carol")
    for request in (GroupAdd(GID, ("dave",)), GroupRemove(GID, ("carol",)), GroupRename(GID, "x"),
                    GroupAdmins(GID, ("bob",))):
        refused(ErrorCode.FORBIDDEN, group, "bob", request)


def test_add_skips_members_and_respects_the_limit() -> None:
    group = made("bob")
    decision = decide(group, "alice", GroupAdd(GID, ("bob", "carol", "dave")), LIMITS, NOW)
    assert decision.after is not None
    assert decision.after.members == ("alice", "bob", "carol", "dave")
    assert decision.events == (GroupItem(0, GID, 2, GROUP_MEMBER_ADDED, "alice", NOW, ("carol", "dave")),)
    assert decision.result == {"added": ["carol", "dave"], "gseq": 2}
    again = decide(decision.after, "alice", GroupAdd(GID, ("bob", "carol")), LIMITS, NOW)
    assert (again.events, again.after, again.result) == ((), decision.after, {"added": [], "gseq": 2})
    refused(ErrorCode.GROUP_FULL, decision.after, "alice", GroupAdd(GID, ("e", "f")))
    assert decide(decision.after, "alice", GroupAdd(GID, ("e",)), LIMITS, NOW).after is not None


def test_remove() -> None:
    group = decide(made("bob", "carol"), "alice", GroupAdmins(GID, ("bob",)), LIMITS, NOW).after
    assert group is not None
    decision = decide(group, "alice", GroupRemove(GID, ("bob", "zed")), LIMITS, NOW)
    assert decision.after == Group(GID, "trip", NOW, 3, ("alice", "carol"), frozenset({"alice"}))
    assert decision.events == (GroupItem(0, GID, 3, GROUP_MEMBER_REMOVED, "alice", NOW, ("bob",)),)
    assert decision.notify == ("alice", "carol", "bob")  # bob learns of his removal, then nothing more
    assert decide(group, "alice", GroupRemove(GID, ("zed",)), LIMITS, NOW).events == ()
    refused(ErrorCode.BAD_ENVELOPE, group, "alice", GroupRemove(GID, ("alice", "bob")))


def test_the_last_admin_leaving_promotes_the_oldest_member() -> None:
    group = decide(made("bob", "carol"), "alice", GroupRemove(GID, ("bob",)), LIMITS, NOW).after
    assert group is not None
    group = decide(group, "alice", GroupAdd(GID, ("bob",)), LIMITS, NOW).after  # bob is now younger than carol
    assert group is not None
    decision = decide(group, "alice", GroupLeave(GID), LIMITS, NOW)
    assert decision.after == Group(GID, "trip", NOW, 5, ("carol", "bob"), frozenset({"carol"}))
    assert [(e.gseq, e.event, e.users, e.promoted) for e in decision.events] == [
        (4, GROUP_MEMBER_LEFT, ("alice",), ()), (5, GROUP_ADMINS_CHANGED, (), ("carol",))]
    assert decision.notify == ("carol", "bob", "alice")
    left = decide(decision.after, "bob", GroupLeave(GID), LIMITS, NOW)  # not an admin: no promotion
    assert [e.event for e in left.events] == [GROUP_MEMBER_LEFT]


def test_the_last_member_leaving_deletes_the_group() -> None:
    decision = decide(made(), "alice", GroupLeave(GID), LIMITS, NOW)
    assert decision.after is None
    assert decision.notify == ("alice",)
    assert [(e.gseq, e.event) for e in decision.events] == [(2, GROUP_MEMBER_LEFT)]


def test_rename() -> None:
    group = made("bob")
    decision = decide(group, "alice", GroupRename(GID, "ski"), LIMITS, NOW)
    assert decision.events == (GroupItem(0, GID, 2, GROUP_RENAMED, "alice", NOW, name="ski"),)
    assert decide(group, "alice", GroupRename(GID, "trip"), LIMITS, NOW).events == ()


def test_admins() -> None:
    group = made("bob", "carol")
    refused(ErrorCode.BAD_ENVELOPE, group, "alice", GroupAdmins(GID, ("zed",)))
    refused(ErrorCode.FORBIDDEN, group, "alice", GroupAdmins(GID, remove=("alice",)))
    decision = decide(group, "alice", GroupAdmins(GID, ("bob", "alice"), ("carol",)), LIMITS, NOW)
    assert decision.events == (GroupItem(0, GID, 2, GROUP_ADMINS_CHANGED, "alice", NOW, promoted=("bob",)),)
    assert decision.result == {"admins": ["alice", "bob"], "gseq": 2}
    assert decision.after is not None
    handed_over = decide(decision.after, "alice", GroupAdmins(GID, remove=("alice",)), LIMITS, NOW)
    assert handed_over.after is not None and handed_over.after.admins == {"bob"}


def test_join_ranks_keep_join_order_across_changes() -> None:
    first = made("bob")
    later = decide(first, "alice", GroupAdd(GID, ("carol", "dave")), LIMITS, NOW).after
    assert later is not None
    assert joins(None, first) == [("alice", 2048), ("bob", 2049)]
    assert joins(first, later) == [("carol", 4096), ("dave", 4097)]
    gone = decide(later, "alice", GroupRemove(GID, ("bob", "dave")), LIMITS, NOW).after
    assert leaves(later, gone) == ["bob", "dave"]
    assert leaves(later, None) == ["alice", "bob", "carol", "dave"]


# --- random sequences -----------------------------------------------------------------------

USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina")
some_users = st.lists(st.sampled_from(USERS), min_size=1, max_size=4).map(lambda u: tuple(dict.fromkeys(u)))
changes = st.one_of(
    st.builds(GroupAdd, st.just(GID), some_users),
    st.builds(GroupRemove, st.just(GID), some_users),
    st.builds(GroupLeave, st.just(GID)),
    st.builds(GroupRename, st.just(GID), st.sampled_from(("a", "b"))),
    st.builds(GroupAdmins, st.just(GID), some_users, st.just(())),
    st.builds(GroupAdmins, st.just(GID), st.just(()), some_users),
)


def check(group: Group, limits: GroupLimits) -> None:
    assert group.members and len(set(group.members)) == len(group.members) <= limits.max_members
    assert group.admins and group.admins <= set(group.members)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(USERS), changes), max_size=60))
def test_random_requests_keep_the_invariants(steps: list[tuple[str, GroupChange]]) -> None:
    group: Group | None = made("bob", "carol")
    gseqs = [1]
    for actor, request in steps:
        if group is None:
            break
        try:
            decision: Decision = decide(group, actor, request, LIMITS, NOW)
        except OpError:
            continue
        gseqs += [e.gseq for e in decision.events]
        assert all(e.seq == 0 and e.group == GID for e in decision.events)
        assert set(decision.notify) >= set(decision.after.members if decision.after else ())
        group = decision.after
        if group is not None:
            check(group, LIMITS)
            assert group.gseq == gseqs[-1]
    assert gseqs == list(range(1, len(gseqs) + 1))  # strictly increasing, no gap, one per event
