"""A thin layer over vodozemac (Olm): the device account, sessions, signatures, and
the wire form of one ciphertext. No ratchet or cipher is written here.

- ``Account``: this device's Curve25519 identity key, Ed25519 signing key,
  one-time keys and fallback key; signs what it publishes.
- ``verify(obj, ed25519)``: checks an object's ``signature`` field (base64
  Ed25519 over ``canonical_json`` of the object without that field).
- ``encrypt`` / ``decrypt``: one Olm message for one device as an opaque
  string ``"1.<type>.<sender curve25519 or empty>.<base64 ciphertext>"``. A
  pre-key message (type 0) carries the sender's identity key, which the
  receiver needs to create the inbound session.

Pickles are vodozemac's own (encrypted and authenticated with a 32-byte key).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Final

import vodozemac

from chatproto import canonical_json

WIRE_VERSION: Final = "1"
PRE_KEY: Final = 0
NORMAL: Final = 1

CryptoError = ValueError
"""What vodozemac raises (all its exceptions are ValueErrors) and what this module raises."""


def without_signature(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "signature"}


def verify(obj: dict[str, Any], ed25519: str) -> bool:
    """True if ``obj["signature"]`` is a valid signature of the rest of ``obj`` by ``ed25519``."""
    signature = obj.get("signature")
    if not isinstance(signature, str) or not isinstance(ed25519, str):
        return False
    try:
        key = vodozemac.Ed25519PublicKey.from_base64(ed25519)
        key.verify_signature(canonical_json(without_signature(obj)), vodozemac.Ed25519Signature.from_base64(signature))
    except ValueError:
        return False
    return True


def valid_curve_key(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        vodozemac.Curve25519PublicKey.from_base64(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Ciphertext:
    """One Olm message as carried in a ``bodies`` entry (see the module doc)."""

    type: int
    sender_key: str
    body: bytes

    def to_wire(self) -> str:
        return ".".join((WIRE_VERSION, str(self.type), self.sender_key, base64.b64encode(self.body).decode("ascii")))

    @classmethod
    def from_wire(cls, text: str) -> Ciphertext:
        parts = text.split(".")
        if len(parts) != 4 or parts[0] != WIRE_VERSION or parts[1] not in (str(PRE_KEY), str(NORMAL)):
            raise CryptoError("not an Olm ciphertext of this SDK")
        try:
            body = base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError("the ciphertext is not base64") from exc
        return cls(int(parts[1]), parts[2], body)

    def olm(self) -> vodozemac.AnyOlmMessage:
        return vodozemac.AnyOlmMessage.from_parts(self.type, self.body)


class Session:
    """One Olm session with one peer device."""

    def __init__(self, session: vodozemac.Session) -> None:
        self._session = session

    @property
    def id(self) -> str:
        return self._session.session_id

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> Session:
        return cls(vodozemac.Session.from_pickle(pickle, key))

    def pickle(self, key: bytes) -> str:
        return self._session.pickle(key)

    def encrypt(self, plaintext: bytes, my_curve25519: str) -> Ciphertext:
        kind, body = self._session.encrypt(plaintext).to_parts()
        return Ciphertext(kind, my_curve25519 if kind == PRE_KEY else "", body)

    def matches(self, message: Ciphertext) -> bool:
        """True if this pre-key message belongs to this session."""
        pre_key = message.olm().to_pre_key()
        return pre_key is not None and self._session.session_matches(pre_key)

    def decrypt(self, message: Ciphertext) -> bytes:
        """The plaintext; raises CryptoError (and changes nothing) if it does not decrypt."""
        return self._session.decrypt(message.olm())


class Account:
    """This device's Olm account. Not thread-safe: the caller serialises use."""

    def __init__(self, account: vodozemac.Account | None = None) -> None:
        self._account = account if account is not None else vodozemac.Account()

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> Account:
        return cls(vodozemac.Account.from_pickle(pickle, key))

    def pickle(self, key: bytes) -> str:
        return self._account.pickle(key)

    @property
    def curve25519(self) -> str:
        return self._account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        return self._account.ed25519_key.to_base64()

    @property
    def max_one_time_keys(self) -> int:
        return self._account.max_number_of_one_time_keys

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` with a ``signature`` field over its canonical JSON."""
        signature = self._account.sign(canonical_json(without_signature(obj))).to_base64()
        return {**without_signature(obj), "signature": signature}

    def device_keys(self, user: str, device: str) -> dict[str, Any]:
        return self.sign({"user": user, "device": device, "curve25519": self.curve25519, "ed25519": self.ed25519})

    def unpublished_one_time_keys(self) -> dict[str, dict[str, Any]]:
        """Generated and not yet marked published: key id -> {"key", "signature"} (signed over {id, key})."""
        keys: dict[str, dict[str, Any]] = {}
        for key_id, key in self._account.one_time_keys.items():
            signed = self.sign({"id": key_id, "key": key.to_base64()})
            keys[key_id] = {"key": signed["key"], "signature": signed["signature"]}
        return keys

    def generate_one_time_keys(self, count: int) -> None:
        if count > 0:
            self._account.generate_one_time_keys(count)

    def unpublished_fallback_key(self) -> dict[str, Any] | None:
        """The fallback key not yet published, as {"id", "key", "signature"}; None if there is none."""
        fallback: dict[str, vodozemac.Curve25519PublicKey] = self._account.fallback_key  # type: ignore[attr-defined]  # missing from the 0.10 stubs
        for key_id, key in fallback.items():
            return self.sign({"id": key_id, "key": key.to_base64()})
        return None

    def generate_fallback_key(self) -> None:
        self._account.generate_fallback_key()  # type: ignore[attr-defined]  # missing from the 0.10 stubs

    def mark_published(self) -> None:
        self._account.mark_keys_as_published()

    def outbound(self, their_curve25519: str, their_one_time_key: str) -> Session:
        return Session(self._account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(their_curve25519),
            vodozemac.Curve25519PublicKey.from_base64(their_one_time_key)))

    def inbound(self, message: Ciphertext) -> tuple[Session, bytes]:
        """A new session from a pre-key message, and its plaintext; the one-time key it used is consumed."""
        pre_key = message.olm().to_pre_key()
        if pre_key is None or not message.sender_key:
            raise CryptoError("not a pre-key message: no session to decrypt it with")
        session, plaintext = self._account.create_inbound_session(
            vodozemac.Curve25519PublicKey.from_base64(message.sender_key), pre_key)
        return Session(session), plaintext
