"""Group requests on ``u/{me}/req`` (docs/PROTOCOL.md section 11, "Groups"): one frozen
dataclass per ``group.*`` op, with ``args()`` (what the SDK sends) and ``from_args`` (what
the server reads; ``DecodeError`` ``bad_envelope`` naming the fault).

Rules:
- ``group`` is a group id (``g:`` + 1-64 of ``[A-Za-z0-9_-]``, chatproto/ids.py).
- A name is 1-100 characters (``MAX_GROUP_NAME_CHARS``), not only white space, with no
  control character (Unicode Cc) and no line or paragraph separator: it is shown in one line
  of every member's chat list. Other format characters (Cf) stay allowed: emoji sequences need
  the zero-width joiner.
- ``members`` (and ``add``/``remove`` of ``group.admins``): user ids, at most
  ``MAX_MEMBERS_PER_GROUP_REQUEST`` (1,024), repeats counted once, order kept; at least one,
  except in ``group.create`` (a group of one is allowed).
- ``group.admins``: ``add`` and ``remove`` both optional, together at least one user, no user
  in both.
- ``group.receipts``: ``group`` and ``id``, a message id (1-64 of ``[A-Za-z0-9_-]``).
- Unknown arguments are refused.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

from chatproto.errors import DecodeError, ErrorCode
from chatproto.ids import MESSAGE_ID_RE, is_group_id, is_user_id
from chatproto.limits import MAX_GROUP_NAME_CHARS, MAX_MEMBERS_PER_GROUP_REQUEST

_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Zl", "Zp"})


def check_group_name(value: object) -> str:
    """``value`` if it is a valid group name, else DecodeError (bad_envelope)."""
    if (
        not isinstance(value, str) or not 1 <= len(value) <= MAX_GROUP_NAME_CHARS or not value.strip()
        or any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'name' must be 1-{MAX_GROUP_NAME_CHARS} characters, not only "
                                                  "spaces, without control characters or line breaks")
    return value


def _only(args: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = set(args) - allowed
    if unknown:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"unknown argument(s): {', '.join(sorted(unknown))}")
    return args


def _group(args: dict[str, Any]) -> str:
    group = args.get("group")
    if not is_group_id(group):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'group' must be a group id 'g:...'")
    return str(group)


def _users(args: dict[str, Any], key: str, least: int = 1) -> tuple[str, ...]:
    users = args.get(key, [])
    if (
        not isinstance(users, list) or not least <= len(users) <= MAX_MEMBERS_PER_GROUP_REQUEST
        or not all(is_user_id(u) for u in users)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE,
                          f"'{key}' must be a list of {least}-{MAX_MEMBERS_PER_GROUP_REQUEST} user ids")
    return tuple(dict.fromkeys(users))


@dataclass(frozen=True, slots=True)
class GroupCreate:
    """Create a group named ``name``; the creator is its first member and admin, ``members`` the others."""

    OP: ClassVar[str] = "group.create"
    name: str
    members: tuple[str, ...] = ()

    def args(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members)}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, {"name", "members"})
        return cls(check_group_name(args.get("name")), _users(args, "members", least=0))


@dataclass(frozen=True, slots=True)
class _OneGroup:
    """A request naming a group and nothing else."""

    OP: ClassVar[str]
    group: str

    def args(self) -> dict[str, Any]:
        return {"group": self.group}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        return cls(_group(_only(args, {"group"})))


@dataclass(frozen=True, slots=True)
class _GroupMembers:
    """A request naming a group and 1-1,024 users of it."""

    OP: ClassVar[str]
    group: str
    members: tuple[str, ...]

    def args(self) -> dict[str, Any]:
        return {"group": self.group, "members": list(self.members)}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, {"group", "members"})
        return cls(_group(args), _users(args, "members"))


@dataclass(frozen=True, slots=True)
class GroupAdd(_GroupMembers):
    OP: ClassVar[str] = "group.add"


@dataclass(frozen=True, slots=True)
class GroupRemove(_GroupMembers):
    OP: ClassVar[str] = "group.remove"


@dataclass(frozen=True, slots=True)
class GroupLeave(_OneGroup):
    OP: ClassVar[str] = "group.leave"


@dataclass(frozen=True, slots=True)
class GroupInfo(_OneGroup):
    OP: ClassVar[str] = "group.info"


@dataclass(frozen=True, slots=True)
class GroupList:
    OP: ClassVar[str] = "group.list"

    def args(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, set())
        return cls()


@dataclass(frozen=True, slots=True)
class GroupRename:
    OP: ClassVar[str] = "group.rename"
    group: str
    name: str

    def args(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, {"group", "name"})
        return cls(_group(args), check_group_name(args.get("name")))


@dataclass(frozen=True, slots=True)
class GroupAdmins:
    """Promote the members ``add`` to admin, demote the admins ``remove``."""

    OP: ClassVar[str] = "group.admins"
    group: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def args(self) -> dict[str, Any]:
        return {"group": self.group, "add": list(self.add), "remove": list(self.remove)}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, {"group", "add", "remove"})
        add, remove = _users(args, "add", least=0), _users(args, "remove", least=0)
        if (not add and not remove) or len(add) + len(remove) > MAX_MEMBERS_PER_GROUP_REQUEST:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'add' and 'remove' name 1-{MAX_MEMBERS_PER_GROUP_REQUEST} "
                                                      "users together")
        if set(add) & set(remove):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "a user cannot be in both 'add' and 'remove'")
        return cls(_group(args), add, remove)


@dataclass(frozen=True, slots=True)
class GroupReceipts:
    """Who of ``group`` has, and who saw, the caller's own message ``id`` (while the server tracks it)."""

    OP: ClassVar[str] = "group.receipts"
    group: str
    id: str

    def args(self) -> dict[str, Any]:
        return {"group": self.group, "id": self.id}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Self:
        _only(args, {"group", "id"})
        msg_id = args.get("id")
        if not isinstance(msg_id, str) or not MESSAGE_ID_RE.fullmatch(msg_id):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'id' must be a message id (1-64 of [A-Za-z0-9_-])")
        return cls(_group(args), msg_id)


GroupRequest = (GroupCreate | GroupAdd | GroupRemove | GroupLeave | GroupInfo | GroupList | GroupRename | GroupAdmins
                | GroupReceipts)

GROUP_OPS: Final[dict[str, type[GroupRequest]]] = {
    cls.OP: cls for cls in (GroupCreate, GroupAdd, GroupRemove, GroupLeave, GroupInfo, GroupList, GroupRename,
                            GroupAdmins, GroupReceipts)
}


def parse_group_request(op: str, args: dict[str, Any]) -> GroupRequest:
    """The ``group.*`` request ``op`` with ``args``; DecodeError (bad_envelope) if the args are
    not valid, KeyError if ``op`` is not a group op."""
    return GROUP_OPS[op].from_args(args)
