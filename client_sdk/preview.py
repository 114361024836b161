"""Push previews (docs/PROTOCOL.md section 12 "Previews", docs/SDK.md "Push previews"): a short
text a sender's SDK encrypts for each recipient device, carried by the server (which cannot read
it) into that device's wake-up, and opened by the app's push handler before it connects.

Rules:
1. A device that registers for push makes one X25519 key pair for previews, kept in its local store
   (the private half sealed), and registers the public half with an Ed25519 signature by its
   identity key over ``chatproto.preview_key_object`` -- so a server cannot slip in a key of its own.
2. A sender uses a recipient device's preview key only if that signature verifies with the Ed25519
   key it trusts for the device (``keys.read_preview_keys``); only devices of the recipient get one
   (never the sender's own: no notification for what one wrote).
3. A preview is ``base64url(0x01 || epk || AES-256-GCM(key, nonce 0, padded inner, ad))``: ``epk`` a
   fresh X25519 key, ``key`` = HKDF-SHA256(X25519(epk, device key), salt epk || device key,
   info ``chat push preview v1``) -- used once, so the zero nonce is never reused -- and ``ad`` =
   0x01 || epk || the recipient's client id (a preview moved to another device does not open).
4. The inner object is ``{"usage":"push_preview","id","from","dev","to","epk","text"}``, signed by the
   sender device's Ed25519 key (canonical JSON, as keys are) and padded to ``BLOCK`` bytes: every
   preview has the same size (tells the push service nothing of the text's length); a longer text
   is cut to fit. The signature sits inside the encryption: only the recipient can check it.
5. Opening: the inner ``to`` and ``epk`` must be this device's and this ciphertext's. A sender
   device this device knows must have signed it (else it is dropped as forged); from one it does
   not know yet, it is returned unverified (``PushPreview.verified`` False).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chatproto import canonical_json
from client_sdk.localstore import LocalStore

VERSION: Final = 1
BLOCK: Final = 384  # the padded inner object: a preview is 578 base64url characters
USAGE: Final = "push_preview"
_INFO: Final = b"chat push preview v1"
_NONCE: Final = bytes(12)
_PAD: Final = b"\x80"  # ISO/IEC 7816-4: 0x80, then zeros
META: Final = "preview_key"  # this device's private preview key, sealed, in the store's meta


@dataclass(frozen=True, slots=True)
class PushPreview:
    """A preview opened from a wake-up. ``verified``: signed by the sending device as this device
    knows it; False when that device is not known here yet (show it as unverified, or generically)."""

    text: str
    message_id: str
    sender: str
    sender_device: str
    verified: bool


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Raises ValueError for anything that is not base64url."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def own_key(store: LocalStore) -> X25519PrivateKey:
    """This device's preview key, made on first use (rule 1)."""
    with store.transaction():
        kept = store.get_meta(META)
        if kept is not None:
            return X25519PrivateKey.from_private_bytes(b64url_decode(store.unseal(kept, f"meta:{META}")))
        key = X25519PrivateKey.generate()
        store.set_meta(META, store.seal(b64url(key.private_bytes_raw()), f"meta:{META}"))
        return key


def public_key(key: X25519PrivateKey) -> str:
    return b64url(key.public_key().public_bytes_raw())


def _content_key(shared: bytes, epk: bytes, device_key: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, epk + device_key, _INFO).derive(shared)


def _fit(fields: dict[str, str], text: str, sign: Callable[[dict[str, Any]], dict[str, Any]]) -> bytes:
    """The signed inner object with as much of ``text`` as fits ``BLOCK`` with its padding (rule 4)."""
    while True:
        inner = canonical_json(sign({**fields, "text": text}))
        over = len(inner) + len(_PAD) - BLOCK
        if over <= 0:
            return inner + _PAD + bytes(-over)
        text = text[:max(0, len(text) - max(1, over // 4))]  # a character is at most 4 bytes of UTF-8


def seal(device_key: str, recipient: str, message_id: str, sender: str, sender_device: str, text: str,
         sign: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """``text`` as a preview for ``recipient`` (a client id) whose preview key is ``device_key``;
    ``sign`` adds the sending device's Ed25519 signature (rules 3, 4). Raises ValueError for a key
    that is not one."""
    their = b64url_decode(device_key)
    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes_raw()
    key = _content_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(their)), epk, their)
    fields = {"usage": USAGE, "id": message_id, "from": sender, "dev": sender_device, "to": recipient,
              "epk": b64url(epk)}
    head = bytes([VERSION]) + epk
    return b64url(head + AESGCM(key).encrypt(_NONCE, _fit(fields, text, sign), head + recipient.encode()))


def open_inner(key: X25519PrivateKey, recipient: str, preview: str) -> dict[str, Any] | None:
    """The signed inner object of a preview for ``recipient`` (this device), or None if it does not
    open here (rules 3, 5). The signature is the caller's to check."""
    try:
        raw = b64url_decode(preview)
        if len(raw) < 1 + 32 + 16 or raw[0] != VERSION:
            return None
        head, epk = raw[:33], raw[1:33]
        mine = key.public_key().public_bytes_raw()
        content_key = _content_key(key.exchange(X25519PublicKey.from_public_bytes(epk)), epk, mine)
        padded = AESGCM(content_key).decrypt(_NONCE, raw[33:], head + recipient.encode())
        inner = json.loads(padded.rstrip(b"\x00").removesuffix(_PAD))
    except (ValueError, InvalidTag):  # junk, a wrong key, or bytes changed on the way
        return None
    if (not isinstance(inner, dict) or inner.get("usage") != USAGE or inner.get("to") != recipient
            or inner.get("epk") != b64url(epk)
            or not all(isinstance(inner.get(k), str) for k in ("id", "from", "dev", "text"))):
        return None
    return inner


def payload_preview(payload: Mapping[str, Any] | bytes | str) -> str | None:
    """The ``preview`` of a wake-up as the app's push handler gets it: FCM's data map, APNs's
    payload (``{"aps": ..., "preview": ...}``), or the body of a Web Push (decrypted by the browser)
    or UnifiedPush message (JSON). None when it carries none."""
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return None
    preview = payload.get("preview") if isinstance(payload, Mapping) else None
    return preview if isinstance(preview, str) else None


def peer_keys(store: LocalStore, user: str) -> dict[str, str]:
    """Device -> preview key of ``user``'s devices, as the last device list gave them (rule 2)."""
    return {str(r[0]): str(r[1]) for r in store.execute("SELECT device, key FROM preview_keys WHERE user = ?", (user,))}


def set_peer_keys(store: LocalStore, user: str, keys: dict[str, str]) -> None:
    """Replace ``user``'s preview keys with those of a fresh device list (none: the server has previews off)."""
    with store.transaction():
        store.execute("DELETE FROM preview_keys WHERE user = ?", (user,))
        for device, key in keys.items():
            store.execute("INSERT INTO preview_keys (user, device, key) VALUES (?, ?, ?)", (user, device, key))
