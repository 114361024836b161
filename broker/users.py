"""The users store, as the broker's login gate needs it: the Protocol ``Authenticator`` is typed against.

``storage/sqlite/users.py`` implements it (and more: the ``user`` commands use
the concrete store). A password hash and a token digest have the formats of
``broker.credentials``; the store never sees a password or a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TooManyDevicesError(Exception):
    """A new device would take the user past ``limits.max_devices_per_user``: the login is refused."""


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    created_ms: int
    devices: int


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    user: str
    device: str
    token_digest: str | None
    created_ms: int
    last_login_ms: int


class UserStore(Protocol):
    async def password_hash(self, name: str) -> str | None:
        """The user's password hash; None if there is no such user."""

    async def device(self, user: str, device: str) -> DeviceInfo | None: ...

    async def record_login(self, user: str, device: str, max_devices: int | None = None) -> bool:
        """Note a successful login; True when the device is new (its first login). A new device
        is added only while the user has fewer than ``max_devices``, else TooManyDevicesError."""

    async def touch_login(self, user: str, device: str) -> None:
        """A known device logged in again (its token checked): note its last-login time. A store may write
        it a moment later, with others (a record for the operator; no decision reads it). A device removed
        meanwhile stays removed."""

    async def set_token_digest(self, user: str, device: str, digest: str) -> None: ...

    async def revoke_tokens(self, user: str, device: str | None = None) -> int:
        """Clear the token of one device (or all of the user's); returns how many were set."""
