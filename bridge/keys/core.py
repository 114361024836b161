"""The key directory's rules: what a ``keys.*`` request may carry, and which devices have keys.

Pure (no I/O). The server only stores and hands out public keys; it never checks
a signature (the claiming peer's SDK does) and never sees a private key.

Rules (docs/PROTOCOL.md, "End-to-end encryption"):
1. ``device_keys`` name the publishing device itself, else ``forbidden``.
2. A device's first one-time or fallback keys need its ``device_keys`` (in the
   same publish or earlier).
3. At most ``MAX_ONE_TIME_KEYS_PER_PUBLISH`` one-time keys per publish and
   ``MAX_ONE_TIME_KEYS_STORED`` unclaimed per device (checked by the store).
4. New identity keys for a device (a reinstall) replace the old ones and drop
   its one-time and fallback keys.
5. A one-time key is handed out at most once, ever: the store remembers
   claimed ids, and a re-publish of one (a retried request) is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from bridge.requests import OpError
from chatproto import (
    MAX_ONE_TIME_KEYS_PER_PUBLISH,
    MAX_ONE_TIME_KEYS_STORED,
    MAX_USERS_PER_REQUEST,
    PUBLIC_KEY_RE,
    ErrorCode,
    is_device_id,
    is_user_id,
)

KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9+/=_:.-]{1,64}")
DEVICE_KEY_FIELDS: Final = frozenset({"user", "device", "curve25519", "ed25519", "signature"})
ONE_TIME_KEY_FIELDS: Final = frozenset({"key", "signature"})
FALLBACK_KEY_FIELDS: Final = frozenset({"id", "key", "signature"})
MAX_CLAIM_DEVICES: Final = MAX_USERS_PER_REQUEST


class KeyRuleError(OpError):
    """A request breaks a key-directory rule; ``code`` is the ``res`` error code.

    The rules a store checks inside its transaction are named here, so every store says them
    in the same words."""

    @classmethod
    def device_keys_first(cls) -> KeyRuleError:
        return cls(ErrorCode.BAD_ENVELOPE, "publish 'device_keys' before one-time or fallback keys")

    @classmethod
    def one_time_key_conflict(cls, key_id: str) -> KeyRuleError:
        return cls(ErrorCode.BAD_ENVELOPE, f"one-time key {key_id!r} is already stored with another key")

    @classmethod
    def too_many_one_time_keys(cls, would_store: int) -> KeyRuleError:
        return cls(ErrorCode.BAD_ENVELOPE, f"at most {MAX_ONE_TIME_KEYS_STORED} unclaimed one-time keys per device; "
                                           f"this publish would make {would_store}")


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    curve25519: str
    ed25519: str
    signed: dict[str, Any]  # the object as published, signature included (what keys.list returns)


@dataclass(frozen=True, slots=True)
class OneTimeKey:
    id: str
    key: str
    signature: str


@dataclass(frozen=True, slots=True)
class Publish:
    device_keys: DeviceKeys | None
    one_time_keys: list[OneTimeKey]
    fallback_key: OneTimeKey | None


def _bad(detail: str) -> KeyRuleError:
    return KeyRuleError(ErrorCode.BAD_ENVELOPE, detail)


def _exact(obj: object, fields: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != fields:
        raise _bad(f"{what} must be an object with exactly {', '.join(sorted(fields))}")
    return obj


def _key(value: object, what: str) -> str:
    if not isinstance(value, str) or PUBLIC_KEY_RE.fullmatch(value) is None:
        raise _bad(f"{what} must be base64, 1-256 characters")
    return value


def _key_id(value: object) -> str:
    if not isinstance(value, str) or KEY_ID_RE.fullmatch(value) is None:
        raise _bad("a key id must be 1-64 of [A-Za-z0-9+/=_:.-]")
    return value


def parse_publish(user: str, device: str, args: dict[str, Any]) -> Publish:
    """Check ``keys.publish`` args of ``user.device``; raises KeyRuleError naming the fault."""
    unknown = set(args) - {"device_keys", "one_time_keys", "fallback_key"}
    if unknown:
        raise _bad(f"unknown argument(s): {', '.join(sorted(unknown))}")
    device_keys = None
    if "device_keys" in args:
        obj = _exact(args["device_keys"], DEVICE_KEY_FIELDS, "'device_keys'")
        if obj["user"] != user or obj["device"] != device:
            raise KeyRuleError(ErrorCode.FORBIDDEN, f"a device may publish only its own keys ({user}.{device})")
        device_keys = DeviceKeys(_key(obj["curve25519"], "'curve25519'"), _key(obj["ed25519"], "'ed25519'"),
                                 dict(obj))
        _key(obj["signature"], "'signature'")
    one_time: list[OneTimeKey] = []
    if "one_time_keys" in args:
        raw = args["one_time_keys"]
        if not isinstance(raw, dict):
            raise _bad("'one_time_keys' must be an object of key id -> {key, signature}")
        if len(raw) > MAX_ONE_TIME_KEYS_PER_PUBLISH:
            raise _bad(f"at most {MAX_ONE_TIME_KEYS_PER_PUBLISH} one-time keys per publish, not {len(raw)}")
        for key_id, value in raw.items():
            obj = _exact(value, ONE_TIME_KEY_FIELDS, "a one-time key")
            one_time.append(OneTimeKey(_key_id(key_id), _key(obj["key"], "a one-time key"),
                                       _key(obj["signature"], "a signature")))
    fallback = None
    if "fallback_key" in args:
        obj = _exact(args["fallback_key"], FALLBACK_KEY_FIELDS, "'fallback_key'")
        fallback = OneTimeKey(_key_id(obj["id"]), _key(obj["key"], "the fallback key"),
                              _key(obj["signature"], "a signature"))
    return Publish(device_keys, one_time, fallback)


def parse_user(args: dict[str, Any], allowed: set[str]) -> str:
    """The ``user`` argument of ``keys.list`` / ``keys.claim``."""
    unknown = set(args) - allowed
    if unknown:
        raise _bad(f"unknown argument(s): {', '.join(sorted(unknown))}")
    user = args.get("user")
    if not is_user_id(user):
        raise _bad("'user' must be a user id")
    return str(user)


def parse_claim(args: dict[str, Any]) -> tuple[str, list[str] | None]:
    """``{"user", "devices"?}`` -> (user, device ids or None for all)."""
    user = parse_user(args, {"user", "devices"})
    if "devices" not in args:
        return user, None
    devices = args["devices"]
    if (not isinstance(devices, list) or not devices or len(devices) > MAX_CLAIM_DEVICES
            or not all(is_device_id(d) for d in devices)):
        raise _bad(f"'devices' must be a list of 1-{MAX_CLAIM_DEVICES} device ids")
    return user, list(dict.fromkeys(devices))


def parse_device(args: dict[str, Any]) -> str:
    """The ``device`` argument of ``devices.remove``."""
    if set(args) != {"device"} or not is_device_id(args["device"]):
        raise _bad("devices.remove takes exactly {\"device\": <device id>}")
    return str(args["device"])


def claimed_item(key: OneTimeKey, fallback: bool) -> dict[str, Any]:
    """One device's entry in a ``keys.claim`` result."""
    return {"id": key.id, "key": key.key, "signature": key.signature, "fallback": fallback}


class KeyedDevices:
    """Which devices have published keys, and each one's current Curve25519 identity key,
    in memory (the olm mismatch check runs per message and must not query the database).
    Loaded at boot from the key store, updated on publish (a reinstall replaces the key)
    and on device removal."""

    def __init__(self, devices: Iterable[tuple[str, str, str]] = ()) -> None:
        self._by_user: dict[str, frozenset[str]] = {}
        self._keys: dict[str, str] = {}  # client id -> Curve25519 identity key
        for user, device, curve25519 in devices:
            self.add(user, device, curve25519)

    def add(self, user: str, device: str, curve25519: str) -> None:
        """``user.device`` published (possibly new) identity keys."""
        cid = f"{user}.{device}"
        self._keys[cid] = curve25519
        self._by_user[user] = self.of_user(user) | {cid}

    def remove(self, user: str, device: str) -> None:
        cid = f"{user}.{device}"
        self._keys.pop(cid, None)
        remaining = self.of_user(user) - {cid}
        if remaining:
            self._by_user[user] = remaining
        else:
            self._by_user.pop(user, None)

    def of_user(self, user: str) -> frozenset[str]:
        """Client ids (``user.device``) of ``user``'s devices with published keys."""
        return self._by_user.get(user, frozenset())

    def key_of(self, cid: str) -> str | None:
        """The current Curve25519 identity key of client id ``cid``; None if it has no keys."""
        return self._keys.get(cid)

    def stale(self, stated: Mapping[str, str], among: Iterable[str]) -> list[str]:
        """Client ids of ``among`` whose ``stated`` identity key is not their current one
        (the sender encrypted to an install that has been replaced), sorted."""
        return sorted(cid for cid in among if cid in stated and stated[cid] != self._keys.get(cid))
