"""The pure parts of cluster mode's group store (bridge/cluster/group_store.py): which event ends a user's
membership (the fanout keeps the user's high-water mark of the group only the grace after it)."""

from __future__ import annotations

from bridge.cluster.group_store import ends_membership
from chatproto import GroupItem


def event(name: str, *users: str) -> GroupItem:
    return GroupItem(0, "g:abc", 3, name, "alice", 1, users)


def test_only_the_removal_or_the_leaving_of_the_user_ends_its_membership() -> None:
    assert ends_membership(event("member_removed", "bob", "carol"), "bob")
    assert ends_membership(event("member_left", "bob"), "bob")  # the last to leave deletes the group: the same
    assert not ends_membership(event("member_removed", "carol"), "bob")  # bob stays, he is told
    assert not ends_membership(event("member_left", "carol"), "bob")
    assert not ends_membership(event("member_added", "bob"), "bob")
    assert not ends_membership(event("created", "alice", "bob"), "bob")
    assert not ends_membership(GroupItem(0, "g:abc", 4, "admins_changed", "bob", 1, (), demoted=("bob",)), "bob")
