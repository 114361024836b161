"""Error codes on the wire and the one exception for a payload that cannot be read."""

from __future__ import annotations

from typing import Final


class ErrorCode:
    """The ``code`` values of ``error`` items and failed ``res`` items (docs/PROTOCOL.md section 5)."""

    BAD_JSON: Final = "bad_json"
    BAD_ENVELOPE: Final = "bad_envelope"
    TOO_LARGE: Final = "too_large"
    FORBIDDEN: Final = "forbidden"
    UNKNOWN_RECIPIENT: Final = "unknown_recipient"
    QUEUE_FULL: Final = "queue_full"
    RATE_LIMITED: Final = "rate_limited"
    INTERNAL: Final = "internal"
    UNKNOWN_OP: Final = "unknown_op"
    UNSUPPORTED: Final = "unsupported"
    DEVICES_MISMATCH: Final = "devices_mismatch"
    NO_KEYS: Final = "no_keys"
    ENCRYPTION_REQUIRED: Final = "encryption_required"
    NOT_MEMBER: Final = "not_member"
    GROUP_FULL: Final = "group_full"
    TOO_MANY_GROUPS: Final = "too_many_groups"
    PUSH_GONE: Final = "push_gone"


class DecodeError(ValueError):
    """A payload could not be read; ``code`` is the error code to answer with, ``ref``
    the id (message ``id``, request ``rid``) to name in that answer once it is known."""

    def __init__(self, code: str, detail: str, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref
