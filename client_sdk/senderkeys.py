"""Sender keys for group messages, pure: when to rotate, who gets the session key, the
forms on the wire, and what a receiving device does with a share or a message. No
crypto and no I/O here (``megolm`` wraps vodozemac, ``groupkeys`` runs the steps).

Sending (one Megolm outbound session per (this device, group)):
1. Rotate (start a new session) when there is none yet; when a device that was given
   the current session's key is no longer among the group's member devices (a member
   left or was removed, a device was removed, or reinstalled with new keys): it must
   not read later messages; after ``max_messages`` messages (100); after
   ``max_age_ms`` (7 days).
2. A device is known by ``user.device/curve25519``: a device reinstalled under the
   same id is another holder. Every member device (this one aside) that does not
   hold the current session's key gets it, exported at the *current* index: a new
   member reads from now on, never older messages.

Receiving a share (``judge_share``), decisions:
3. From a user who is not a member of the group as this device knows it, or for a
   group this device's user is not in: ignored (``NOT_MEMBER``). The caller may
   refresh the membership and offer it again.
4. For a session already held from that sender device at the same or a lower index:
   a duplicate, nothing changes (``DUPLICATE``); at a higher index (an older share,
   arriving late, can read more): the held one is replaced (``STORED``). Only the
   sender device itself can make a share of its session (the key is signed by the
   session, the share comes over the Olm channel from that device), so a lower
   index is never an attacker's.
5. A session is keyed by (sender user, sender device, session id) and bound to one
   group: a message of another group, or claiming another sender, is refused.

Receiving a message (``replay_verdict``, ``pending_overflow``):
6. Each (sender device, session, index) decrypted is remembered with a digest of its
   ciphertext: the same ciphertext again is a repeat (opened again; the message id
   dedups it), another ciphertext at a seen index is refused as a replay.
7. A message whose session key has not arrived is kept, at most
   ``pending_per_sender`` per sender device (the oldest is dropped beyond that and
   reported undecryptable), and opened when the share arrives.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from chatproto import GROUP_PREFIX
from client_sdk.localstore import DeviceRecord

SHARE_TYPE: Final = "sdk.group_key"
"""The inner ``type`` of an Olm message carrying a share; the faces refuse app types starting ``sdk.``."""
SHARE_TAG: Final = "group_key"
GROUP_WIRE_VERSION: Final = "g1"
PAYLOAD_VERSION: Final = 1
DAY_MS: Final = 24 * 3600 * 1000
GROUP_ID_RE: Final = re.compile(r"g:[A-Za-z0-9_.:-]{1,64}")
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9+/]{43}")
"""A Megolm session id: the session's Ed25519 key, unpadded base64."""
MAX_SESSION_KEY_CHARS: Final = 1024
MAX_INDEX: Final = 2 ** 32 - 1


class SenderKeyError(ValueError):
    """A share, group ciphertext or decrypted payload that does not parse or validate; the text says why."""


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    max_messages: int = 100
    max_age_ms: int = 7 * DAY_MS

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_age_ms < 1:
            raise ValueError("max_messages and max_age_ms must be positive")


@dataclass(frozen=True, slots=True)
class OutboundState:
    """What rule 1 needs of the current outbound session of a group."""

    session_id: str
    created_ms: int
    sent: int
    """Messages encrypted with it (its next message index, for a session made here)."""
    holders: frozenset[str]
    """``holder(record)`` of every device given its key."""


class Rotation(enum.StrEnum):
    NEW = "new"
    MEMBER_LEFT = "member_left"
    MESSAGE_LIMIT = "message_limit"
    AGE = "age"


def holder(record: DeviceRecord) -> str:
    """Rule 2: how a device that holds a session key is known."""
    return f"{record.user}.{record.device}/{record.curve25519}"


def rotation_reason(state: OutboundState | None, devices_now: Collection[str], now_ms: int,
                    policy: RotationPolicy) -> Rotation | None:
    """Rule 1: why a new session must be started before the next message, or None to keep it."""
    if state is None:
        return Rotation.NEW
    if not state.holders <= set(devices_now):
        return Rotation.MEMBER_LEFT
    if state.sent >= policy.max_messages:
        return Rotation.MESSAGE_LIMIT
    if now_ms - state.created_ms >= policy.max_age_ms:
        return Rotation.AGE
    return None


def devices_to_share(devices_now: Iterable[DeviceRecord], holders: Collection[str], me: tuple[str, str]
                     ) -> tuple[DeviceRecord, ...]:
    """Rule 2: the member devices (``me`` = this device aside) that need the current session key."""
    return tuple(sorted((r for r in devices_now if (r.user, r.device) != me and holder(r) not in holders),
                        key=holder))


# --- the share (inside an Olm message of type SHARE_TYPE) ----------------------------------------

@dataclass(frozen=True, slots=True)
class KeyShare:
    """A Megolm session key exported at ``index``, for ``group``.

    Wire form (the Olm message's ``body``): ``{"t":"group_key","v":1,"group":"g:...",
    "session_id":"<43 chars>","key":"<SessionKey base64>","index":n}``. The sender user and
    device are not in it: the Olm envelope names and authenticates them."""

    group: str
    session_id: str
    key: str
    index: int

    def encode(self) -> str:
        return json.dumps({"t": SHARE_TAG, "v": PAYLOAD_VERSION, "group": self.group, "session_id": self.session_id,
                           "key": self.key, "index": self.index}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: object) -> KeyShare:
        """Parse and check the form (not the key's signature: ``megolm`` does); raises SenderKeyError."""
        if not isinstance(text, str):
            raise SenderKeyError("a share is a JSON string")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise SenderKeyError("a share is not JSON") from exc
        if not isinstance(obj, dict) or obj.get("t") != SHARE_TAG:
            raise SenderKeyError("not a group key share")
        if obj.get("v") != PAYLOAD_VERSION:
            raise SenderKeyError(f"unknown share version {obj.get('v')!r}")
        group, session_id, key, index = obj.get("group"), obj.get("session_id"), obj.get("key"), obj.get("index")
        if not is_group_id(group):
            raise SenderKeyError("the share names no valid group")
        if not isinstance(session_id, str) or SESSION_ID_RE.fullmatch(session_id) is None:
            raise SenderKeyError("the share has no valid session id")
        if not isinstance(key, str) or not 0 < len(key) <= MAX_SESSION_KEY_CHARS:
            raise SenderKeyError("the share has no valid session key")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_INDEX:
            raise SenderKeyError("the share has no valid index")
        assert isinstance(group, str)
        return cls(group, session_id, key, index)


class ShareVerdict(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NOT_MEMBER = "not_member"
    BAD = "bad"
    """Does not parse, or the key does not verify or match the share's session id and index."""


def judge_share(sender: str, me: str, members: Collection[str], held_index: int | None,
                index: int) -> ShareVerdict:
    """Rules 3 and 4: what to do with a well-formed share from ``sender`` (``held_index``: the
    first index of the same session held from the same device, None if not held)."""
    if sender not in members or me not in members:
        return ShareVerdict.NOT_MEMBER
    if held_index is not None and held_index <= index:
        return ShareVerdict.DUPLICATE
    return ShareVerdict.STORED


# --- the group message -------------------------------------------------------------------------

def is_group_id(value: object) -> bool:
    return isinstance(value, str) and value.startswith(GROUP_PREFIX) and GROUP_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class GroupCiphertext:
    """A group message's ``body`` on the wire: ``"g1.<session id>.<base64 Megolm message>"``."""

    session_id: str
    message: bytes

    def to_wire(self) -> str:
        return ".".join((GROUP_WIRE_VERSION, self.session_id, base64.b64encode(self.message).decode("ascii")))

    @classmethod
    def from_wire(cls, text: object) -> GroupCiphertext:
        parts = text.split(".") if isinstance(text, str) else []
        if len(parts) != 3 or parts[0] != GROUP_WIRE_VERSION or SESSION_ID_RE.fullmatch(parts[1]) is None:
            raise SenderKeyError("not a group ciphertext of this SDK")
        try:
            message = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SenderKeyError("the group ciphertext is not base64") from exc
        return cls(parts[1], message)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the server says of a group message: checked against what is inside the ciphertext."""

    id: str
    group: str
    sender: str
    device: str


def payload(envelope: Envelope, type_: str, body: str) -> bytes:
    """The Megolm plaintext: the message and its envelope (rule 5: bound to group and sender)."""
    return json.dumps({"v": PAYLOAD_VERSION, "id": envelope.id, "group": envelope.group, "type": type_,
                       "body": body, "sender": envelope.sender, "sender_device": envelope.device},
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def check_payload(envelope: Envelope, plaintext: bytes) -> tuple[str, str]:
    """``(type, body)`` of a decrypted payload; raises SenderKeyError if it does not match ``envelope``."""
    try:
        obj: Any = json.loads(plaintext.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as exc:
        raise SenderKeyError("the decrypted payload is not JSON") from exc
    if not isinstance(obj, dict):
        raise SenderKeyError("the decrypted payload is not an object")
    expected = {"v": PAYLOAD_VERSION, "id": envelope.id, "group": envelope.group, "sender": envelope.sender,
                "sender_device": envelope.device}
    wrong = sorted(k for k, v in expected.items() if obj.get(k) != v)
    if wrong:
        raise SenderKeyError(f"the encrypted payload does not match the envelope ({', '.join(wrong)})")
    type_, body = obj.get("type"), obj.get("body")
    if not isinstance(type_, str) or not isinstance(body, str):
        raise SenderKeyError("the decrypted payload has no body or type")
    return type_, body


class Replay(enum.StrEnum):
    NEW = "new"
    REPEAT = "repeat"
    REPLAY = "replay"


def replay_verdict(seen_digest: str | None, digest: str) -> Replay:
    """Rule 6."""
    if seen_digest is None:
        return Replay.NEW
    return Replay.REPEAT if seen_digest == digest else Replay.REPLAY


def pending_overflow(held: int, limit: int) -> int:
    """Rule 7: how many of a sender device's oldest pending messages to drop to keep one more."""
    return max(0, held + 1 - limit)
