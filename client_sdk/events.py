"""What the SDK hands to the app: frozen dataclasses.

- ``Message``: a chat message for this user (handed over once, in ``seq`` order); a group
  message has ``group`` (the group id, also its ``to``) and ``gseq``.
- ``GroupEvent``: a change of a group this user is (or was) in: ``created``,
  ``member_added``, ``member_removed``, ``member_left``, ``renamed``, ``admins_changed``;
  handed over like messages (once, in ``seq`` order: the group's ``gseq`` order).
- ``Receipt``: news about messages *this user* sent: ``pending`` (made by the
  SDK: ``peer`` has no device with keys yet, the message waits in the outbox and
  goes out by itself), ``sent`` (the server has it durably), ``delivered`` (a
  device of ``peer`` stored it), ``seen`` (``peer`` displayed it), ``expired``
  (the server gave up after its TTL).
- ``Presence``: ``user`` went online/offline (after ``presence.subscribe``).
- ``ErrorEvent``: the server refused something (``ref`` names the message id
  when there is one), or the SDK stopped reconnecting (``code`` ``auth_failed`` or
  ``connect_failed``, ``ref`` None).
- ``Undecryptable``: a message arrived that this device cannot decrypt (it is
  acked all the same: the server cannot do better by sending it again).
- ``IdentityChanged``: a peer device's identity key changed (a reinstall, or
  someone in the middle): compare fingerprints before trusting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from chatproto import GROUP_PREFIX, ErrorItem, GroupItem, MsgItem, PresenceItem, ReceiptItem

# ErrorEvent codes made by the SDK itself (server codes are protocol.ErrorCode values).
AUTH_FAILED: Final = "auth_failed"
"""A reconnect was refused for bad credentials: the client stopped reconnecting."""
CONNECT_FAILED: Final = "connect_failed"
"""A reconnect was refused for another final reason: the client stopped reconnecting."""
PENDING: Final = "pending"
"""Receipt status made by the SDK: the message waits in the outbox until ``peer``'s first device has keys."""
KEYS_FAILED: Final = "keys_failed"
"""This device's keys could not be published; peers cannot encrypt to it yet (retried at the next connect)."""


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    sender: str
    to: str
    body: str
    type: str
    ts: int
    """Server time (ms) when the server took the message."""
    seq: int
    """This device's downlink sequence number (strictly increasing)."""
    device: str | None = None
    """The sending device. ``sender`` == your own user id: you sent it from that other device."""
    encrypted: bool = False
    """True if it arrived end-to-end encrypted (and decrypted and checked here)."""
    group: str | None = None
    """The group id for a group message (``to`` is the same), None for a one-to-one message."""
    gseq: int | None = None
    """A group message's place in its group's order (messages and ``GroupEvent``s together)."""


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """``event`` of ``group`` at ``gseq``, done by ``by``. ``users``: the members a ``created``,
    ``member_added``, ``member_removed`` or ``member_left`` names; ``name``: with ``created`` and
    ``renamed``; ``promoted``/``demoted``: with ``admins_changed``."""

    group: str
    gseq: int
    event: str
    by: str
    ts: int
    seq: int
    users: tuple[str, ...] = ()
    name: str | None = None
    promoted: tuple[str, ...] = ()
    demoted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """A message that could not be decrypted: shown to the user as such, never silently dropped."""

    id: str
    sender: str
    device: str | None
    to: str
    reason: str
    ts: int
    seq: int


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """``user``'s device ``device`` now has other identity keys than this device trusted before."""

    user: str
    device: str
    old_fingerprint: str
    new_fingerprint: str


@dataclass(frozen=True, slots=True)
class Receipt:
    status: str
    """``pending`` (SDK-made), ``sent``, ``delivered``, ``seen`` or ``expired``."""
    ids: tuple[str, ...]
    """Ids of messages this user sent to ``peer``."""
    peer: str
    ts: int


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    online: bool | None
    """None: the user does not share presence with you."""
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str
    detail: str
    ref: str | None
    """The id of the message (or request) the error is about, if any."""


Event = Message | GroupEvent | Receipt | Presence | ErrorEvent | Undecryptable | IdentityChanged


def message_from(item: MsgItem) -> Message:
    group = item.to if item.to.startswith(GROUP_PREFIX) else None
    return Message(item.id, item.sender, item.to, item.body, item.type, item.ts, item.seq, item.dev,
                   group=group, gseq=item.gseq if group is not None else None)


def group_event_from(item: GroupItem) -> GroupEvent:
    return GroupEvent(item.group, item.gseq, item.event, item.by, item.ts, item.seq, item.users, item.name,
                      item.promoted, item.demoted)


def receipt_from(item: ReceiptItem) -> Receipt:
    return Receipt(item.status, item.ids, item.peer, item.ts)


def presence_from(item: PresenceItem) -> Presence:
    return Presence(item.user, item.online, item.last_seen)


def error_from(item: ErrorItem) -> ErrorEvent:
    return ErrorEvent(item.code, item.detail, item.ref)
