"""Key management decisions, pure: which published keys to trust, when to top up
one-time keys, what changed in a device list, fingerprints and safety numbers.

Rules:
1. A ``device_keys`` object is trusted only if it names the user and device it
   was listed under, both keys parse, and its signature verifies with its own
   Ed25519 key (a self-signature: it binds the Curve25519 identity key to the
   Ed25519 key users compare). Anything else is refused and never used.
2. A claimed one-time (or fallback) key is used only if its signature over
   ``{"id", "key"}`` verifies with the Ed25519 key of the device it is for.
3. Trust on first use: the first keys seen for a device are kept. A later list
   with other keys for the same device id (a reinstall, or a server lying) is an
   identity change: the new keys replace the old, the old sessions are dropped,
   and the app gets an ``IdentityChanged`` warning with both fingerprints.
4. One-time keys: top up when the server holds fewer than half the account's
   maximum; generate only what brings (server + unpublished) back to the
   maximum, so no key the server still hands out is ever discarded locally.
5. A push preview key (``previews`` of a ``keys.list`` answer, servers with
   previews on) is used only for a device trusted by rule 1 and only if its
   ``sig`` verifies with that device's Ed25519 key over
   ``chatproto.preview_key_object``; any other is ignored (no preview for it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final

from chatproto import MAX_ONE_TIME_KEYS_PER_PUBLISH, is_device_id, preview_key_object
from client_sdk.crypto import valid_curve_key, verify
from client_sdk.localstore import DeviceRecord

SAFETY_ITERATIONS: Final = 5200  # as Signal's numeric fingerprints: slow enough to resist grinding a match
SAFETY_DIGITS_PER_SIDE: Final = 30


def check_device_keys(user: str, device: str, obj: object) -> DeviceRecord | None:
    """Rule 1: the record for a listed ``device_keys`` object, or None if it must be refused."""
    if not isinstance(obj, dict) or not is_device_id(device):
        return None
    if obj.get("user") != user or obj.get("device") != device:
        return None
    curve, ed = obj.get("curve25519"), obj.get("ed25519")
    if not isinstance(ed, str) or not valid_curve_key(curve) or not verify(obj, ed):
        return None
    assert isinstance(curve, str)
    return DeviceRecord(user, device, curve, ed)


@dataclass(frozen=True, slots=True)
class ListedDevices:
    """A ``keys.list`` result after rule 1: the trusted devices and the ids refused."""

    devices: dict[str, DeviceRecord]
    refused: tuple[str, ...]


def read_device_list(user: str, result: object) -> ListedDevices:
    devices: dict[str, DeviceRecord] = {}
    refused: list[str] = []
    listed = result.get("devices") if isinstance(result, dict) else None
    for device, obj in (listed.items() if isinstance(listed, dict) else ()):
        record = check_device_keys(user, str(device), obj)
        if record is None:
            refused.append(str(device))
        else:
            devices[record.device] = record
    return ListedDevices(devices, tuple(sorted(refused)))


def read_preview_keys(user: str, result: object, trusted: dict[str, DeviceRecord]) -> dict[str, str]:
    """Rule 5: device -> preview key, for the devices whose key is signed by their trusted Ed25519 key."""
    listed = result.get("previews") if isinstance(result, dict) else None
    keys: dict[str, str] = {}
    for device, entry in (listed.items() if isinstance(listed, dict) else ()):
        record = trusted.get(str(device))
        if record is None or not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        if verify({**preview_key_object(user, record.device, entry["key"]), "signature": entry.get("sig")},
                  record.ed25519):
            keys[record.device] = entry["key"]
    return keys


def check_claimed_key(record: DeviceRecord, claimed: object) -> str | None:
    """Rule 2: the one-time key to build a session with, or None if its signature does not verify."""
    if not isinstance(claimed, dict):
        return None
    key_id, key = claimed.get("id"), claimed.get("key")
    if not isinstance(key_id, str) or not valid_curve_key(key):
        return None
    if not verify({"id": key_id, "key": key, "signature": claimed.get("signature")}, record.ed25519):
        return None
    assert isinstance(key, str)
    return key


@dataclass(frozen=True, slots=True)
class DeviceDiff:
    """What a fresh device list changes against the cached one (rule 3)."""

    added: tuple[DeviceRecord, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[DeviceRecord, DeviceRecord], ...] = field(default=())
    """(old, new) pairs: the same device id with other identity keys."""


def diff_devices(cached: dict[str, DeviceRecord], fresh: dict[str, DeviceRecord]) -> DeviceDiff:
    added = tuple(r for d, r in sorted(fresh.items()) if d not in cached)
    removed = tuple(sorted(d for d in cached if d not in fresh))
    changed = tuple(
        (cached[d], r) for d, r in sorted(fresh.items())
        if d in cached and (cached[d].curve25519, cached[d].ed25519) != (r.curve25519, r.ed25519))
    return DeviceDiff(added, removed, changed)


def keys_to_generate(on_server: int, unpublished: int, maximum: int) -> int:
    """Rule 4: how many new one-time keys to generate now (0: enough)."""
    if on_server >= maximum // 2:
        return 0
    return max(0, min(maximum - on_server - unpublished, MAX_ONE_TIME_KEYS_PER_PUBLISH))


def publish_args(device_keys: dict[str, Any], one_time_keys: dict[str, dict[str, Any]],
                 fallback: dict[str, Any] | None) -> dict[str, Any]:
    """The ``keys.publish`` arguments (device keys always: publishing the same ones again changes nothing)."""
    args: dict[str, Any] = {"device_keys": device_keys}
    if one_time_keys:
        args["one_time_keys"] = dict(list(one_time_keys.items())[:MAX_ONE_TIME_KEYS_PER_PUBLISH])
    if fallback is not None:
        args["fallback_key"] = fallback
    return args


def fingerprint(ed25519: str) -> str:
    """A device's fingerprint as people compare it: its Ed25519 key in groups of four characters."""
    return " ".join(ed25519[i:i + 4] for i in range(0, len(ed25519), 4))


def _side_digits(user: str, ed25519_keys: list[str]) -> str:
    keys = "".join(sorted(ed25519_keys)).encode()
    digest = hashlib.sha512(b"\x00\x00" + keys + user.encode()).digest()
    for _ in range(SAFETY_ITERATIONS - 1):
        digest = hashlib.sha512(digest + keys).digest()
    chunks = [int.from_bytes(digest[i:i + 5], "big") % 100_000 for i in range(0, SAFETY_DIGITS_PER_SIDE // 5 * 5, 5)]
    return "".join(f"{c:05d}" for c in chunks)


def safety_number(me: str, my_keys: list[str], peer: str, peer_keys: list[str]) -> str:
    """60 digits in groups of five, the same on both sides: compare them in person or on a call.

    ``my_keys``/``peer_keys``: the Ed25519 keys of every device of each user, as
    each side trusts them; any change (a new device, a reinstall) changes it.
    """
    sides = sorted([_side_digits(me, my_keys), _side_digits(peer, peer_keys)])
    digits = sides[0] + sides[1]
    return " ".join(digits[i:i + 5] for i in range(0, len(digits), 5))
