"""Group chat's rules: who may change a group, and what each change emits. Pure: no I/O; the
caller passes the group as the store holds it, the acting user, the decoded request
(chatproto/groups.py), the limits and the time, and gets a ``Decision`` back (the group
after, the events with their gseqs, who gets them, the ``res`` result) or ``GroupRefused``.

Rules (docs/PROTOCOL.md section 11, "Groups"):
1. Only members see a group: a request about a group the caller is not in, or that does
   not exist, is refused ``not_member``, the same answer for both (ids cannot be probed).
2. The creator is the first member and the first admin. Admins add, remove, rename,
   promote and demote; a member who is not an admin gets ``forbidden``. Renaming is
   admin-only (WhatsApp's "only admins can edit group info"; no per-group setting yet).
3. Each event takes the group's next gseq, in the order emitted; messages take theirs from
   the same counter (the store), so every member sees one order of both.
4. What changes nothing emits nothing and takes no gseq: adding a member, removing a
   non-member, promoting an admin, demoting a non-admin, renaming to the same name. The
   result names what changed, so a retried request is harmless.
5. At most ``max_members`` members (``group_full``, nothing added); a user is in at most
   ``max_groups_per_user`` groups (``too_many_groups``, checked by the store in its commit,
   where the count is exact).
6. A removed member is no admin any more. ``group.remove`` cannot name the caller
   (``bad_envelope``: that is ``group.leave``); only members can be promoted (``bad_envelope``).
7. A group always has an admin: a demotion leaving none is ``forbidden``; when the last
   admin leaves, the oldest member (join order) is promoted, an ``admins_changed`` right
   after the ``member_left``.
8. When the last member leaves, the group is deleted.
9. A change's events go to the members after it and to the users it removed (or who
   left): they learn of their own removal, then nothing more of the group.
10. ``group.receipts`` (members only, rule 1) answers the per-member detail of the caller's own message
   with that id while it is tracked (bridge/messaging/group_receipts.py); a tracked message of another
   sender with that id is ``forbidden`` (only its sender may ask); an id tracked for nobody --
   complete, expired, or never sent -- is ``tracked: false``: the server keeps nothing once complete.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Final

from bridge.messaging.group_receipts import Tracking, detail
from bridge.requests import OpError
from chatproto import (
    DEFAULT_MAX_GROUP_MEMBERS,
    DEFAULT_MAX_GROUPS_PER_USER,
    GROUP_ADMINS_CHANGED,
    GROUP_CREATED,
    GROUP_MEMBER_ADDED,
    GROUP_MEMBER_LEFT,
    GROUP_MEMBER_REMOVED,
    GROUP_PREFIX,
    GROUP_RENAMED,
    ErrorCode,
    GroupAdd,
    GroupAdmins,
    GroupCreate,
    GroupItem,
    GroupLeave,
    GroupReceipts,
    GroupRemove,
    GroupRename,
)

GROUP_ID_BYTES: Final = 16  # 128 random bits, 22 URL-safe characters
JOIN_SPAN: Final = 2048
"""Join ranks are ``gseq * JOIN_SPAN + i``: above what one event adds (the creator and a full request,
``1 + MAX_MEMBERS_PER_GROUP_REQUEST``). Exact in a Redis score (a double) up to gseq 2^42."""

GroupChange = GroupAdd | GroupRemove | GroupLeave | GroupRename | GroupAdmins


def new_group_id() -> str:
    """A fresh, unguessable group id (the one random thing: the shell calls it)."""
    return GROUP_PREFIX + secrets.token_urlsafe(GROUP_ID_BYTES)


@dataclass(frozen=True, slots=True)
class GroupLimits:
    max_members: int = DEFAULT_MAX_GROUP_MEMBERS
    max_groups_per_user: int = DEFAULT_MAX_GROUPS_PER_USER


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    created_at: int  # ms
    gseq: int  # the last gseq taken (by an event or a message)
    members: tuple[str, ...]  # in join order, oldest first
    admins: frozenset[str]

    def info(self) -> dict[str, Any]:
        """The ``group.info`` result."""
        return {"group": self.id, "name": self.name, "created_at": self.created_at, "gseq": self.gseq,
                "members": list(self.members), "admins": sorted(self.admins)}

    def summary(self, user: str) -> dict[str, Any]:
        """One entry of ``user``'s ``group.list`` result."""
        return {"group": self.id, "name": self.name, "gseq": self.gseq, "members": len(self.members),
                "admin": user in self.admins}


class GroupRefused(OpError):
    """A group request breaks a rule; ``code`` is the ``res`` error code. The stores raise
    ``too_many_groups`` from their commit, so it is named here once."""

    @classmethod
    def not_member(cls) -> GroupRefused:
        return cls(ErrorCode.NOT_MEMBER, "you are not a member of this group (or it does not exist)")

    @classmethod
    def admins_only(cls) -> GroupRefused:
        return cls(ErrorCode.FORBIDDEN, "only an admin of the group can do this")

    @classmethod
    def group_full(cls, limit: int, would: int) -> GroupRefused:
        return cls(ErrorCode.GROUP_FULL, f"a group has at most {limit} members; this would make {would}")

    @classmethod
    def too_many_groups(cls, users: list[str], limit: int) -> GroupRefused:
        return cls(ErrorCode.TOO_MANY_GROUPS, f"in {limit} groups already (limits.max_groups_per_user): "
                                              f"{', '.join(sorted(users))}")

    @classmethod
    def not_members(cls, users: list[str]) -> GroupRefused:
        return cls(ErrorCode.BAD_ENVELOPE, f"not members of the group: {', '.join(users)}")


@dataclass(frozen=True, slots=True)
class Decision:
    after: Group | None  # None: the group is deleted
    events: tuple[GroupItem, ...]  # seq 0: each device's seq is given when the item is staged for it
    notify: tuple[str, ...]  # the users who get the events (rule 9)
    result: dict[str, Any]  # the ``res`` result


@dataclass(slots=True)
class _Change:
    group: Group
    actor: str
    now_ms: int
    events: list[GroupItem] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # removed or left in this change

    def emit(self, event: str, **fields: Any) -> None:
        self.group = replace(self.group, gseq=self.group.gseq + 1)
        self.events.append(GroupItem(0, self.group.id, self.group.gseq, event, self.actor, self.now_ms, **fields))

    def drop(self, users: list[str]) -> None:
        self.gone += users
        self.group = replace(self.group, members=tuple(u for u in self.group.members if u not in users),
                             admins=self.group.admins.difference(users))

    def decision(self, result: dict[str, Any]) -> Decision:
        after = self.group if self.group.members else None
        return Decision(after, tuple(self.events), (*self.group.members, *self.gone),
                        {**result, "gseq": self.group.gseq})


def create(group_id: str, actor: str, request: GroupCreate, limits: GroupLimits, now_ms: int) -> Decision:
    """A new group of ``actor`` and ``request.members`` (the actor named there counts once)."""
    members = (actor, *(u for u in request.members if u != actor))
    if len(members) > limits.max_members:
        raise GroupRefused.group_full(limits.max_members, len(members))
    change = _Change(Group(group_id, request.name, now_ms, 0, members, frozenset({actor})), actor, now_ms)
    change.emit(GROUP_CREATED, users=members, name=request.name)
    return change.decision({"group": group_id, "name": request.name, "members": list(members)})


def info(group: Group | None, actor: str) -> dict[str, Any]:
    """The ``group.info`` result, for members only (rule 1)."""
    if group is None or actor not in group.members:
        raise GroupRefused.not_member()
    return group.info()


def receipts(group: Group | None, actor: str, request: GroupReceipts, tracked: list[Tracking]) -> dict[str, Any]:
    """The ``group.receipts`` result (rule 10); ``tracked``: the group's tracked messages with that id."""
    if group is None or actor not in group.members:
        raise GroupRefused.not_member()
    own = [t for t in tracked if t.sender == actor]
    if own:
        return detail(own[-1])  # an id used again after the dedup window: the newest
    if tracked:
        raise GroupRefused(ErrorCode.FORBIDDEN, "only the sender of a message can ask for its receipts")
    return {"group": request.group, "id": request.id, "tracked": False}


def decide(group: Group | None, actor: str, request: GroupChange, limits: GroupLimits, now_ms: int) -> Decision:
    """What ``request`` by ``actor`` does to ``group`` (as the store holds it; None: no such group)."""
    if group is None or actor not in group.members:
        raise GroupRefused.not_member()
    if not isinstance(request, GroupLeave) and actor not in group.admins:
        raise GroupRefused.admins_only()
    change = _Change(group, actor, now_ms)
    match request:
        case GroupAdd():
            return _add(change, request.members, limits)
        case GroupRemove():
            return _remove(change, request.members)
        case GroupLeave():
            return _leave(change)
        case GroupRename():
            if request.name != group.name:
                change.group = replace(group, name=request.name)
                change.emit(GROUP_RENAMED, name=request.name)
            return change.decision({"name": request.name})
        case GroupAdmins():
            return _admins(change, request.add, request.remove)


def _add(change: _Change, named: tuple[str, ...], limits: GroupLimits) -> Decision:
    group = change.group
    added = [u for u in named if u not in group.members]
    if len(group.members) + len(added) > limits.max_members:
        raise GroupRefused.group_full(limits.max_members, len(group.members) + len(added))
    if added:
        change.group = replace(group, members=(*group.members, *added))
        change.emit(GROUP_MEMBER_ADDED, users=tuple(added))
    return change.decision({"added": added})


def _remove(change: _Change, named: tuple[str, ...]) -> Decision:
    if change.actor in named:
        raise OpError(ErrorCode.BAD_ENVELOPE, "to remove yourself, use group.leave")
    removed = [u for u in named if u in change.group.members]
    if removed:
        change.drop(removed)
        change.emit(GROUP_MEMBER_REMOVED, users=tuple(removed))
    return change.decision({"removed": removed})


def _leave(change: _Change) -> Decision:
    change.drop([change.actor])
    change.emit(GROUP_MEMBER_LEFT, users=(change.actor,))
    if change.group.members and not change.group.admins:  # rule 7
        oldest = change.group.members[0]
        change.group = replace(change.group, admins=frozenset({oldest}))
        change.emit(GROUP_ADMINS_CHANGED, promoted=(oldest,))
    return change.decision({})


def _admins(change: _Change, add: tuple[str, ...], remove: tuple[str, ...]) -> Decision:
    group = change.group
    strangers = [u for u in add if u not in group.members]
    if strangers:
        raise GroupRefused.not_members(strangers)
    promoted = tuple(u for u in add if u not in group.admins)
    demoted = tuple(u for u in remove if u in group.admins)
    admins = group.admins.union(promoted).difference(demoted)
    if not admins:
        raise OpError(ErrorCode.FORBIDDEN, "a group needs an admin: promote another member first")
    if promoted or demoted:
        change.group = replace(group, admins=admins)
        change.emit(GROUP_ADMINS_CHANGED, promoted=promoted, demoted=demoted)
    return change.decision({"admins": sorted(admins)})


def joins(before: Group | None, after: Group) -> list[tuple[str, int]]:
    """The members ``after`` adds to ``before``, each with its join rank (rule 7's "oldest" is the
    lowest): ranks of a later change are higher than every rank before it, so a store that
    orders members by rank keeps the order of ``Group.members``."""
    old = set(before.members) if before is not None else set()
    return [(u, after.gseq * JOIN_SPAN + i) for i, u in enumerate(u for u in after.members if u not in old)]


def leaves(before: Group | None, after: Group | None) -> list[str]:
    """The members of ``before`` that ``after`` no longer has."""
    if before is None:
        return []
    kept = set(after.members) if after is not None else set()
    return [u for u in before.members if u not in kept]
