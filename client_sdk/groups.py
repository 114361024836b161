"""Groups in the SDK (docs/PROTOCOL.md section 11): the ``group.*`` requests as ``Steps``
(written once for both faces), their results, and the members of each group as this
device knows them, which the sender keys are shared by.

Rules (``Membership``; ``after_change`` is the pure part):
1. A group's members (join order) are known from its ``created`` change, from a
   ``group.info`` result, and are kept up to date by the group's changes as they are handed
   over (in the order the server gave them), each with the group's ``gseq`` after it.
2. A change at a ``gseq`` the known members already include (a ``group.info`` taken after
   it) changes nothing; a change to a group whose members are not known changes nothing
   either (they are fetched with ``group.info`` when needed).
3. When this user is no longer a member (removed, left), the group is forgotten.
4. After a change this device asked for (add, remove, leave), the members are forgotten and
   fetched again before the next message: the result's ``gseq`` may be ahead of changes
   still on their way to this device, so it cannot be applied on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from chatproto import (
    GROUP_CREATED,
    GROUP_MEMBER_ADDED,
    GROUP_MEMBER_LEFT,
    GROUP_MEMBER_REMOVED,
    GroupAdd,
    GroupAdmins,
    GroupCreate,
    GroupLeave,
    GroupList,
    GroupReceipts,
    GroupRemove,
    GroupRename,
    is_group_id,
)
from chatproto import (
    GroupInfo as InfoRequest,
)
from client_sdk.errors import RequestError
from client_sdk.events import GroupEvent
from client_sdk.localstore import LocalStore
from client_sdk.presence import Steps

BAD_RESULT: Final = "bad_result"
"""``RequestError`` code made by the SDK: the server's result does not have the documented form."""


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group as ``group.info`` (or ``group.create``) describes it."""

    group: str
    name: str
    members: tuple[str, ...]
    """Join order; this user among them."""
    admins: tuple[str, ...]
    gseq: int
    """The group's ``gseq`` when the answer was made."""
    created_at: int | None = None


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One group of ``group.list``."""

    group: str
    name: str
    gseq: int
    members: int
    admin: bool
    """Whether this user is an admin of it."""


@dataclass(frozen=True, slots=True)
class MemberReceipt:
    delivered: int | None
    """When a device of the member acked the message (server ms); None: not yet."""
    seen: int | None
    """When the member reported it seen; None: not yet, or seen is not tracked for this group."""


@dataclass(frozen=True, slots=True)
class GroupReceiptInfo:
    """``group.receipts``: who of the group has, and who saw, one of this user's messages."""

    group: str
    id: str
    tracked: bool
    """False: the server keeps nothing of it -- complete (the ``delivered``/``seen`` receipts told
    you), expired, or no message of this user with that id."""
    seen_tracked: bool = False
    """Whether ``seen`` is tracked: not in groups above the server's ``groups.seen_receipts``."""
    members: dict[str, MemberReceipt] | None = None
    """Per member waited for (by name); None when not ``tracked``."""


def _field(op: str, result: Any, key: str, kind: type) -> Any:
    value = result.get(key) if isinstance(result, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(op, BAD_RESULT, f"the result has no valid {key!r}")
    return value


def _users(op: str, result: Any, key: str) -> tuple[str, ...]:
    value = _field(op, result, key, list)
    if not all(isinstance(u, str) for u in value):
        raise RequestError(op, BAD_RESULT, f"{key!r} is not a list of user ids")
    return tuple(value)


def info_from(op: str, result: Any, admins: tuple[str, ...] | None = None) -> GroupInfo:
    """A ``group.info`` result, or a ``group.create`` one (its ``admins``: the creator)."""
    group = _field(op, result, "group", str)
    if not is_group_id(group):
        raise RequestError(op, BAD_RESULT, f"{group!r} is not a group id")
    created = result.get("created_at")
    return GroupInfo(group, _field(op, result, "name", str), _users(op, result, "members"),
                     _users(op, result, "admins") if admins is None else admins, _field(op, result, "gseq", int),
                     created if isinstance(created, int) and not isinstance(created, bool) else None)


def summaries_from(result: Any) -> list[GroupSummary]:
    op = GroupList.OP
    return [GroupSummary(_field(op, g, "group", str), _field(op, g, "name", str), _field(op, g, "gseq", int),
                         _field(op, g, "members", int), bool(g.get("admin")))
            for g in _field(op, result, "groups", list)]


def receipts_from(result: Any) -> GroupReceiptInfo:
    op = GroupReceipts.OP
    group, msg_id = _field(op, result, "group", str), _field(op, result, "id", str)
    if not _field(op, result, "tracked", bool):
        return GroupReceiptInfo(group, msg_id, False)
    members = {}
    for user, times in _field(op, result, "members", dict).items():
        if not isinstance(times, dict) or not all(_ms_or_none(times.get(key)) for key in ("delivered", "seen")):
            raise RequestError(op, BAD_RESULT, f"the times of {user!r} are not valid")
        members[user] = MemberReceipt(times.get("delivered"), times.get("seen"))
    return GroupReceiptInfo(group, msg_id, True, bool(result.get("seen_tracked")), members)


def _ms_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


Known = tuple[tuple[str, ...], int]
"""A group's members and the ``gseq`` they are known at."""


def after_change(known: Known | None, event: GroupEvent, me: str) -> Known | None:
    """Rules 1-3: what this device knows of a group after ``event`` (None: not known / not a member)."""
    if event.event == GROUP_CREATED:
        members = tuple(dict.fromkeys(event.users))
    elif known is None or event.gseq <= known[1]:
        return known
    elif event.event == GROUP_MEMBER_ADDED:
        members = tuple(dict.fromkeys(known[0] + event.users))
    elif event.event in (GROUP_MEMBER_REMOVED, GROUP_MEMBER_LEFT):
        members = tuple(u for u in known[0] if u not in event.users)
    else:
        members = known[0]
    return (members, event.gseq) if me in members else None


class Membership:
    """The ``group_members`` table of ``store``, for this user ``me``; thread-safe (the store's lock)."""

    def __init__(self, store: LocalStore, me: str) -> None:
        self._store = store
        self.me = me

    def known(self, group: str) -> Known | None:
        rows = self._store.execute("SELECT members, gseq FROM group_members WHERE group_id = ?", (group,))
        return (tuple(json.loads(rows[0][0])), int(rows[0][1])) if rows else None

    def members(self, group: str) -> tuple[str, ...] | None:
        known = self.known(group)
        return None if known is None else known[0]

    def _put(self, group: str, known: Known | None) -> None:
        if known is None:
            self.forget(group)
        else:
            self._store.execute("INSERT OR REPLACE INTO group_members (group_id, members, gseq) VALUES (?, ?, ?)",
                                (group, json.dumps(known[0]), known[1]))

    def apply(self, event: GroupEvent) -> None:
        with self._store.transaction():
            self._put(event.group, after_change(self.known(event.group), event, self.me))

    def learn(self, info: GroupInfo) -> None:
        """A ``group.info``/``group.create`` answer; kept unless what is known is newer."""
        with self._store.transaction():
            known = self.known(info.group)
            if known is None or known[1] <= info.gseq:
                self._put(info.group, (info.members, info.gseq) if self.me in info.members else None)

    def forget(self, group: str) -> None:
        self._store.execute("DELETE FROM group_members WHERE group_id = ?", (group,))


# --- the requests, written once for both faces (see ``presence.Steps``) ------------------------

def create_steps(name: str, members: Iterable[str], membership: Membership) -> Steps[GroupInfo]:
    request = GroupCreate(name, tuple(dict.fromkeys(members)))
    info = info_from(request.OP, (yield request.OP, request.args()), admins=(membership.me,))
    membership.learn(info)
    return info


def info_steps(group: str, membership: Membership) -> Steps[GroupInfo]:
    request = InfoRequest(group)
    info = info_from(request.OP, (yield request.OP, request.args()))
    membership.learn(info)
    return info


def list_steps() -> Steps[list[GroupSummary]]:
    return summaries_from((yield GroupList.OP, {}))


def members_steps(group: str, users: Iterable[str], remove: bool, membership: Membership) -> Steps[list[str]]:
    """``group.add`` (returns who was added) or ``group.remove`` (who was removed); rule 4."""
    request = (GroupRemove if remove else GroupAdd)(group, tuple(dict.fromkeys(users)))
    result = yield request.OP, request.args()
    membership.forget(group)
    return list(_users(request.OP, result, "removed" if remove else "added"))


def leave_steps(group: str, membership: Membership) -> Steps[int]:
    """``group.leave``; the group's ``gseq`` after it."""
    request = GroupLeave(group)
    result = yield request.OP, request.args()
    membership.forget(group)
    return int(_field(request.OP, result, "gseq", int))


def rename_steps(group: str, name: str) -> Steps[int]:
    request = GroupRename(group, name)
    return int(_field(request.OP, (yield request.OP, request.args()), "gseq", int))


def admins_steps(group: str, add: Iterable[str], remove: Iterable[str]) -> Steps[list[str]]:
    """``group.admins``; the admins after it."""
    request = GroupAdmins(group, tuple(dict.fromkeys(add)), tuple(dict.fromkeys(remove)))
    return list(_users(request.OP, (yield request.OP, request.args()), "admins"))


def receipts_steps(group: str, message_id: str) -> Steps[GroupReceiptInfo]:
    """``group.receipts`` for this user's message ``message_id``."""
    request = GroupReceipts(group, message_id)
    return receipts_from((yield request.OP, request.args()))
