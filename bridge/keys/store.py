"""The key directory: each device's public identity keys, one-time keys and fallback key.

``KeyService`` is typed against these Protocols; ``storage/`` implements the
key store (``storage/sqlite/keys.py``) and the users store implements ``Accounts``.
A claim takes its keys for good in one transaction, so concurrent claims never
hand out the same one-time key. A failing backend raises ``bridge.store.StoreError``.
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.keys.core import Publish


class KeyStore(Protocol):
    async def publish(self, user: str, device: str, publish: Publish) -> tuple[int, bool]:
        """Store what a device published; returns (its unclaimed one-time keys, whether
        it has device keys now). Raises KeyRuleError (nothing stored) if a rule forbids it."""

    async def count(self, user: str, device: str) -> tuple[int, bool]:
        """(unclaimed one-time keys, has a fallback key) of one device."""

    async def device_keys(self, user: str) -> dict[str, dict[str, Any]]:
        """Device id -> device_keys object as published, for every device of ``user`` with keys."""

    async def claim(self, user: str, devices: list[str] | None) -> dict[str, dict[str, Any]]:
        """One key per device (of ``devices``, or all of the user's): a one-time key, taken
        for good, else the fallback key; a device with neither is left out."""

    async def remove_device(self, user: str, device: str) -> None: ...

    async def keyed_devices(self) -> list[tuple[str, str, str]]:
        """(user, device, Curve25519 identity key) of every device with published device keys."""

    async def close(self) -> None: ...


class Accounts(Protocol):
    """The user directory, as the key service needs it (the users store implements it)."""

    async def user_devices(self, name: str) -> list[str] | None:
        """Device ids of ``name`` (possibly none); None if there is no such user."""

    async def delete_device(self, user: str, device: str) -> bool:
        """Forget the device and its token; True if it existed."""
