"""Request operations (``u/{me}/req``) named by both sides, and their shared argument rules
(docs/PROTOCOL.md sections 7, 8 "Requests" and 9 "Key directory requests")."""

from __future__ import annotations

from typing import Any, Final

from chatproto.errors import DecodeError, ErrorCode
from chatproto.ids import is_user_id
from chatproto.limits import MAX_USERS_PER_REQUEST

OP_KEYS_PUBLISH: Final = "keys.publish"
OP_KEYS_COUNT: Final = "keys.count"
OP_KEYS_LIST: Final = "keys.list"
OP_KEYS_CLAIM: Final = "keys.claim"
OP_DEVICES_REMOVE: Final = "devices.remove"

PRIVACY_EVERYONE: Final = "everyone"
PRIVACY_CONTACTS: Final = "contacts"
PRIVACY_NOBODY: Final = "nobody"
PRIVACY_CHOICES: Final = (PRIVACY_EVERYONE, PRIVACY_CONTACTS, PRIVACY_NOBODY)
PRIVACY_DEFAULT: Final = PRIVACY_CONTACTS


def parse_user_list(args: dict[str, Any]) -> list[str]:
    """``{"users": [...]}`` (1-256 user ids, repeats collapsed, order kept); DecodeError otherwise."""
    users = args.get("users")
    if (
        not isinstance(users, list) or not users or len(users) > MAX_USERS_PER_REQUEST
        or not all(is_user_id(u) for u in users)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'users' must be a list of 1-{MAX_USERS_PER_REQUEST} user ids")
    return list(dict.fromkeys(users))
