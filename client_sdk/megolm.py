"""A thin layer over vodozemac's Megolm: the outbound group session of this device and the
inbound sessions of senders. No ratchet or cipher is written here. vodozemac raises
ValueErrors only (``crypto.CryptoError``); pickles are its own, encrypted and
authenticated with the same 32-byte key as the Olm pickles.
"""

from __future__ import annotations

import vodozemac


class Outbound:
    """This device's Megolm session for one group. Not thread-safe: the caller serialises use."""

    def __init__(self, session: vodozemac.GroupSession | None = None) -> None:
        self._session = session if session is not None else vodozemac.GroupSession()

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> Outbound:
        return cls(vodozemac.GroupSession.from_pickle(pickle, key))

    def pickle(self, key: bytes) -> str:
        return self._session.pickle(key)

    @property
    def id(self) -> str:
        return self._session.session_id

    @property
    def index(self) -> int:
        """The index the next message will have."""
        return self._session.message_index

    def session_key(self) -> str:
        """The key at the current index: it decrypts the next message and later ones, none before."""
        return self._session.session_key.to_base64()

    def encrypt(self, plaintext: bytes) -> bytes:
        """One message (the ratchet moves on: pickle the session before the bytes leave)."""
        return self._session.encrypt(plaintext).to_bytes()


class Inbound:
    """A sender's Megolm session as received in a share."""

    def __init__(self, session: vodozemac.InboundGroupSession) -> None:
        self._session = session

    @classmethod
    def from_share(cls, session_key: str) -> Inbound:
        """Raises CryptoError if the key does not parse or its signature does not verify."""
        return cls(vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key)))

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> Inbound:
        return cls(vodozemac.InboundGroupSession.from_pickle(pickle, key))

    def pickle(self, key: bytes) -> str:
        return self._session.pickle(key)

    @property
    def id(self) -> str:
        return self._session.session_id

    @property
    def first_index(self) -> int:
        return self._session.first_known_index

    def decrypt(self, message: bytes) -> tuple[bytes, int]:
        """The plaintext and its message index; raises CryptoError (a bad signature, an index
        before the first known one, not a Megolm message)."""
        decrypted = self._session.decrypt(vodozemac.MegolmMessage.from_bytes(message))
        return decrypted.plaintext, decrypted.message_index

