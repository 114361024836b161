"""Identities and names on the wire: user, device, message and request ids, client ids.

Rules (docs/PROTOCOL.md section 1, 3 and 11): user id ``^[a-z0-9_]{1,32}$``, device id
``^[A-Za-z0-9_-]{1,32}$``, MQTT client id ``{user}.{device}``, group id ``g:`` + 1-64 of
``[A-Za-z0-9_-]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

USER_RE: Final = re.compile(r"[a-z0-9_]{1,32}")
DEVICE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
MESSAGE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
OP_RE: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")
TYPE_RE: Final = re.compile(r"[a-z0-9_.-]{1,32}")
"""A message ``type``."""
PUBLIC_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/=_-]{1,256}")
PREVIEW_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
"""An encrypted push preview: unpadded base64url (its length is checked apart: ``too_large``)."""
"""A public key or a signature on the wire: base64 (standard or URL-safe, padded or not)."""
GROUP_PREFIX: Final = "g:"
"""A ``to`` of this form names a group (reserved: answered ``unknown_recipient`` today)."""
GROUP_ID_RE: Final = re.compile(r"g:[A-Za-z0-9_-]{1,64}")
"""A group id, the same string as ``to`` and in ``group.*`` requests; the server makes
``g:`` + 22 URL-safe characters (128 random bits: unguessable)."""


def is_user_id(value: object) -> bool:
    return isinstance(value, str) and USER_RE.fullmatch(value) is not None


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None


def is_group_id(value: object) -> bool:
    return isinstance(value, str) and GROUP_ID_RE.fullmatch(value) is not None


def client_id(user: str, device: str) -> str:
    return f"{user}.{device}"


@dataclass(frozen=True, slots=True)
class Caller:
    """A logged-in chat device: the broker names it, the bridge acts for it."""

    user: str
    device: str

    @property
    def client_id(self) -> str:
        return client_id(self.user, self.device)


def split_client_id(value: str) -> tuple[str, str] | None:
    """``"alice.phone"`` -> ``("alice", "phone")``; None unless both parts are valid."""
    user, dot, device = value.partition(".")
    if not dot or not is_user_id(user) or not is_device_id(device):
        return None
    return user, device
