"""The ``keys.*`` and ``devices.remove`` requests: the thin shell around the key rules and store.

Each op checks its arguments with ``bridge.keys.core``, runs one store transaction,
and keeps the in-memory ``KeyedDevices`` (each keyed device's current identity
key, used by the olm mismatch check of the staging core) in step with the store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.clock import Clock
from bridge.keys.core import KeyedDevices, parse_claim, parse_device, parse_publish, parse_user
from bridge.keys.store import Accounts, KeyStore
from bridge.limits import RateLimiter
from bridge.requests import Op, OpError, check_args
from chatproto import (
    OP_DEVICES_REMOVE,
    OP_KEYS_CLAIM,
    OP_KEYS_COUNT,
    OP_KEYS_LIST,
    OP_KEYS_PUBLISH,
    Caller,
    ErrorCode,
)

log = logging.getLogger(__name__)


class StagedDevices(Protocol):
    def remove_device(self, user: str, device: str) -> None:
        """Drop the device's staged items and take it out of the recipient set."""


class ClaimLimit(Protocol):
    async def allow(self, claimer: str, peer: str) -> bool:
        """Take a token of ``claimer``'s bucket for claims of ``peer``'s keys; False if it is empty."""


class LocalClaimLimit:
    """``ClaimLimit`` in this process's memory (one broker on SQLite)."""

    def __init__(self, limiter: RateLimiter, clock: Clock) -> None:
        self._limiter = limiter
        self._now = clock.monotonic

    async def allow(self, claimer: str, peer: str) -> bool:
        return self._limiter.allow(f"{claimer}\0{peer}", self._now())


class PreviewKeys(Protocol):
    async def preview_keys(self, client_ids: list[str]) -> dict[str, dict[str, str]]:
        """Client id -> ``{"key", "sig"}`` of the push preview key of each of those devices that
        registered one (docs/PROTOCOL.md section 12)."""


class KeyService:
    def __init__(self, store: KeyStore, keyed: KeyedDevices, accounts: Accounts, staged: StagedDevices,
                 close_session: Callable[[str], Awaitable[None]], claims: ClaimLimit | None = None,
                 previews: PreviewKeys | None = None) -> None:
        self._claims = claims
        self._store = store
        self._keyed = keyed
        self._accounts = accounts
        self._staged = staged
        self._close_session = close_session
        self._previews = previews  # push preview keys, when push previews are on

    def ops(self) -> dict[str, Op]:
        return {
            OP_KEYS_PUBLISH: self._publish,
            OP_KEYS_COUNT: self._count,
            OP_KEYS_LIST: self._list,
            OP_KEYS_CLAIM: self._claim,
            OP_DEVICES_REMOVE: self._remove_device,
        }

    async def _publish(self, caller: Caller, args: dict[str, Any]) -> Any:
        publish = parse_publish(caller.user, caller.device, args)
        remaining, _ = await self._store.publish(caller.user, caller.device, publish)
        if publish.device_keys is not None:  # stored: new (a reinstall) or the same again
            self._keyed.add(caller.user, caller.device, publish.device_keys.curve25519)
        return {"one_time_keys": remaining}

    async def _count(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        remaining, fallback = await self._store.count(caller.user, caller.device)
        return {"one_time_keys": remaining, "fallback_key": fallback}

    async def _list(self, caller: Caller, args: dict[str, Any]) -> Any:
        user = await self._known(parse_user(args, {"user"}))
        devices = await self._store.device_keys(user)
        if self._previews is None:
            return {"user": user, "devices": devices}
        keys = await self._previews.preview_keys([f"{user}.{device}" for device in devices])
        previews = {device: keys[f"{user}.{device}"] for device in devices if f"{user}.{device}" in keys}
        return {"user": user, "devices": devices, "previews": previews}

    async def _claim(self, caller: Caller, args: dict[str, Any]) -> Any:
        user, devices = parse_claim(args)
        # The target is checked first: a claim for a user that does not exist uses no bucket
        # (104,000 such claims once pushed a limiting bucket out of the table).
        await self._known(user)
        # Each claim deletes one of the peer's one-time keys: without a bound, anyone could drain
        # them and leave every new session to the fallback key (docs/SECURITY.md).
        if self._claims is not None and not await self._claims.allow(caller.user, user):
            raise OpError(ErrorCode.RATE_LIMITED, f"too many key claims for {user}; retry later")
        return {"user": user, "devices": await self._store.claim(user, devices)}

    async def _known(self, user: str) -> str:
        if await self._accounts.user_devices(user) is None:
            raise OpError(ErrorCode.UNKNOWN_RECIPIENT, f"no user {user!r}")
        return user

    async def _remove_device(self, caller: Caller, args: dict[str, Any]) -> Any:
        device = parse_device(args)
        if device == caller.device:
            raise OpError(ErrorCode.FORBIDDEN, "a device cannot remove itself; remove it from another device")
        # Keys first: once they are gone no new olm message can name the device.
        await self._store.remove_device(caller.user, device)
        self._keyed.remove(caller.user, device)
        existed = await self._accounts.delete_device(caller.user, device)
        self._staged.remove_device(caller.user, device)
        await self._close_session(f"{caller.user}.{device}")
        log.info("device %s.%s removed by %s.%s (%s)", caller.user, device, caller.user, caller.device,
                 "it was known" if existed else "it was not known")
        return {}
