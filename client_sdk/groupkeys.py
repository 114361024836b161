"""Sender-key encryption for group messages on one device: the steps the client faces call.
The rules are in ``senderkeys`` (pure), the crypto in ``megolm``, the rows in ``groupstore``.

- ``encrypt(group, devices, id, type, body)``: a group message sealed with this device's
  Megolm session for the group (rotated first if rule 1 says so), and the key share the
  devices that lack the current session key must get. The face sends the share over the
  Olm channel as a message of type ``senderkeys.SHARE_TYPE`` with ``body = share.encode()``,
  one per user in ``share_users()`` (the Olm channel encrypts to every device of that user
  and the sender's other devices; those that hold the key already ignore it: rule 4).
- ``on_share(sender, device, body, members)``: an opened Olm message of type
  ``SHARE_TYPE`` (its sender authenticated by Olm); returns the verdict and the pending
  group messages it opened.
- ``decrypt(item)``: a group message: ``Opened``, ``Pending`` (kept until its key
  arrives; ``dropped`` are older ones given up on) or ``Refused``.

Crash safety (no message index ever carries two plaintexts): ``encrypt`` writes the
session advanced past the index it used, in the store transaction that returns the
ciphertext. The face must call it inside its own ``store.transaction()`` that also puts
the ciphertext in the outbox and the share messages in the outbox, and publish only after
that commits: a crash before the commit loses the ciphertext unsent and the index unused
(the next encrypt uses it for the re-encrypted message, never seen by anyone); after it,
the same ciphertext is re-sent as it is. A share is committed with the holders it names,
so a device counted as holding the key always gets it (the outbox is durable).

Inbound sessions are pickled when stored and not again after a decrypt: vodozemac keeps
the first known ratchet, and decrypting only moves a cache.

Thread safety: every step runs under the store's lock (its transaction), and the
vodozemac objects live only inside one step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace

from client_sdk.crypto import CryptoError
from client_sdk.e2e import now_ms
from client_sdk.groupstore import GroupStore, InboundRecord, OutboundRecord
from client_sdk.localstore import DeviceRecord, LocalStore
from client_sdk.megolm import Inbound, Outbound
from client_sdk.senderkeys import (
    Envelope,
    GroupCiphertext,
    KeyShare,
    OutboundState,
    Replay,
    Rotation,
    RotationPolicy,
    SenderKeyError,
    ShareVerdict,
    check_payload,
    devices_to_share,
    holder,
    judge_share,
    payload,
    pending_overflow,
    replay_verdict,
    rotation_reason,
)

PENDING_PER_SENDER = 100


@dataclass(frozen=True, slots=True)
class GroupItem:
    """A group message as the server handed it over (``gseq``: its place in the group's order)."""

    envelope: Envelope
    body: str
    ts: int
    gseq: int

    def to_json(self) -> str:
        e = self.envelope
        return json.dumps({"id": e.id, "group": e.group, "sender": e.sender, "device": e.device, "body": self.body,
                           "ts": self.ts, "gseq": self.gseq})

    @classmethod
    def from_json(cls, text: str) -> GroupItem:
        obj = json.loads(text)
        return cls(Envelope(obj["id"], obj["group"], obj["sender"], obj["device"]), obj["body"], obj["ts"],
                   obj["gseq"])


@dataclass(frozen=True, slots=True)
class Opened:
    item: GroupItem
    type: str
    body: str
    index: int
    """The Megolm message index (per sender session)."""


@dataclass(frozen=True, slots=True)
class Pending:
    item: GroupItem
    dropped: tuple[GroupItem, ...]
    """Older messages of the same sender device given up on to keep this one (rule 7): undecryptable."""


@dataclass(frozen=True, slots=True)
class Refused:
    item: GroupItem
    reason: str


Outcome = Opened | Pending | Refused


@dataclass(frozen=True, slots=True)
class GroupSealed:
    ciphertext: str
    """The group message's ``body`` (``GroupCiphertext`` wire form)."""
    share: KeyShare | None
    share_to: tuple[DeviceRecord, ...]
    """The devices that must get ``share`` (empty when ``share`` is None)."""
    rotated: Rotation | None
    """Why a new session was started for this message, if one was."""

    def share_users(self) -> tuple[str, ...]:
        """The users to send the share to, one Olm message each."""
        return tuple(dict.fromkeys(r.user for r in self.share_to))


@dataclass(frozen=True, slots=True)
class ShareOutcome:
    verdict: ShareVerdict
    reason: str
    opened: tuple[Outcome, ...] = ()
    """The pending group messages this share's session decrypts now (``Opened`` or ``Refused``)."""


class GroupCrypto:
    """The sender-key state of ``user.device``, kept in ``store`` (pickles encrypted with ``pickle_key``,
    the same key as the Olm pickles)."""

    def __init__(self, store: LocalStore, user: str, device: str, pickle_key: bytes,
                 policy: RotationPolicy | None = None, pending_per_sender: int = PENDING_PER_SENDER,
                 clock: Callable[[], int] = now_ms) -> None:
        self._store = store
        self._rows = GroupStore(store)
        self.user, self.device = user, device
        self._key = pickle_key
        self.policy = policy if policy is not None else RotationPolicy()
        self._pending_limit = pending_per_sender
        self._clock = clock

    # --- sending -------------------------------------------------------------------------------

    def encrypt(self, group_id: str, devices: Iterable[DeviceRecord], msg_id: str, type_: str,
                body: str) -> GroupSealed:
        """Seal one message for ``group_id``, whose member devices are now ``devices`` (every device
        of every member, this one may be among them). See the module doc on crash safety."""
        devices = tuple(devices)
        now = self._clock()
        with self._store.transaction():
            saved = self._rows.outbound(group_id)
            rotated = rotation_reason(None if saved is None else saved.state, {holder(r) for r in devices}, now,
                                      self.policy)
            if saved is None or rotated is not None:
                session = Outbound()
                state = OutboundState(session.id, now, 0, frozenset())
            else:
                session, state = Outbound.from_pickle(saved.pickle, self._key), saved.state
            share_to = devices_to_share(devices, state.holders, (self.user, self.device))
            share = KeyShare(group_id, session.id, session.session_key(), session.index) if share_to else None
            message = session.encrypt(payload(Envelope(msg_id, group_id, self.user, self.device), type_, body))
            state = replace(state, sent=state.sent + 1, holders=state.holders | {holder(r) for r in share_to})
            self._rows.put_outbound(OutboundRecord(group_id, session.pickle(self._key), state))
        return GroupSealed(GroupCiphertext(session.id, message).to_wire(), share, share_to, rotated)

    def share_again(self, group_id: str, user: str) -> None:
        """The share message to ``user`` failed for good (its ``ErrorEvent``): count none of its devices
        as holding the current key, so the next ``encrypt`` shares it with them again."""
        with self._store.transaction():
            saved = self._rows.outbound(group_id)
            if saved is not None:
                holders = frozenset(h for h in saved.state.holders if not h.startswith(f"{user}."))
                self._rows.put_outbound(replace(saved, state=replace(saved.state, holders=holders)))

    # --- receiving -----------------------------------------------------------------------------

    def on_share(self, sender: str, device: str, body: str, members: Collection[str]) -> ShareOutcome:
        """A share from ``sender.device`` (as the Olm envelope authenticated it); ``members``: the users
        of the share's group as this device knows them now."""
        try:
            share = KeyShare.decode(body)
        except SenderKeyError as exc:
            return ShareOutcome(ShareVerdict.BAD, str(exc))
        try:
            inbound = Inbound.from_share(share.key)
        except CryptoError as exc:
            return ShareOutcome(ShareVerdict.BAD, f"the session key does not verify ({exc})")
        if (inbound.id, inbound.first_index) != (share.session_id, share.index):
            return ShareOutcome(ShareVerdict.BAD, "the session key is not for the session and index it names")
        with self._store.transaction():
            held = self._rows.inbound(sender, device, share.session_id)
            if held is not None and held.group_id != share.group:
                return ShareOutcome(ShareVerdict.BAD, "the session was shared before for another group")
            verdict = judge_share(sender, self.user, members, None if held is None else held.first_index,
                                  share.index)
            if verdict is not ShareVerdict.STORED:
                return ShareOutcome(verdict, f"{sender} is not a member of {share.group}"
                                    if verdict is ShareVerdict.NOT_MEMBER else "the session is held already")
            record = InboundRecord(sender, device, share.session_id, share.group, share.index,
                                   inbound.pickle(self._key))
            self._rows.put_inbound(record)
            waiting = self._rows.take_pending(sender, device, share.session_id)
            opened = tuple(self._open(GroupItem.from_json(text), inbound, record) for text in waiting)
        return ShareOutcome(ShareVerdict.STORED, "", opened)

    def decrypt(self, item: GroupItem) -> Outcome:
        """Open a group message, or keep it until its session key arrives (rule 7)."""
        try:
            ciphertext = GroupCiphertext.from_wire(item.body)
        except SenderKeyError as exc:
            return Refused(item, str(exc))
        sender, device = item.envelope.sender, item.envelope.device
        with self._store.transaction():
            record = self._rows.inbound(sender, device, ciphertext.session_id)
            if record is None:
                overflow = pending_overflow(self._rows.pending_count(sender, device), self._pending_limit)
                dropped = self._rows.drop_oldest_pending(sender, device, overflow) if overflow else []
                self._rows.add_pending(sender, device, ciphertext.session_id, item.to_json())
                return Pending(item, tuple(GroupItem.from_json(text) for text in dropped))
            return self._open(item, Inbound.from_pickle(record.pickle, self._key), record)

    def _open(self, item: GroupItem, inbound: Inbound, record: InboundRecord) -> Outcome:
        """In the caller's transaction: decrypt with ``inbound``, check replays (rule 6) and the envelope."""
        if item.envelope.group != record.group_id:
            return Refused(item, "the sender's session belongs to another group")
        try:
            ciphertext = GroupCiphertext.from_wire(item.body)
            plaintext, index = inbound.decrypt(ciphertext.message)
        except (CryptoError, SenderKeyError) as exc:
            return Refused(item, f"it does not decrypt ({exc})")
        digest = hashlib.sha256(ciphertext.message).hexdigest()
        seen = self._rows.seen(record.sender, record.device, record.session_id, index)
        replay = replay_verdict(seen, digest)
        if replay is Replay.REPLAY:
            return Refused(item, f"message index {index} of this session was used by another message (a replay)")
        try:
            type_, body = check_payload(item.envelope, plaintext)
        except SenderKeyError as exc:
            return Refused(item, str(exc))
        if replay is Replay.NEW:
            self._rows.put_seen(record.sender, record.device, record.session_id, index, digest)
        return Opened(item, type_, body, index)
