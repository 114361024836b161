"""Group messages end to end: what the engine does with a group (``g:``) message when
encryption is on, over ``groupkeys.GroupCrypto`` (the sender keys), ``e2e.E2E`` (the key
directory, and the Olm channel the session keys travel in) and ``groups.Membership``.

Who calls what (threads of the engine):
- the outbox thread: ``seal(message)``: the group message sealed with this device's Megolm
  session, and the share messages (Olm, type ``sdk.group_key``) for the member devices that
  lack its key, all written in one store transaction (``GroupCrypto``'s crash-safety rule);
  the engine publishes the shares, then the message. A re-send uses the kept ciphertext.
- the dispatcher thread: ``open(seq, item)`` (a group message, at hand-over) and
  ``take_share(seq, message)`` (an opened Olm message of an ``sdk.*`` type), each
  restaging the inbox row as the batch of what it opened in the same transaction as the
  sender-key update (``inbox`` rules 9 and 10).
- paho's and the outbox thread: ``failed(message)`` (a share message was refused for good:
  share again). Share messages have ids starting ``SHARE_ID_PREFIX``: the engine keeps
  their receipts and errors from the app (``is_share``).

Which devices: every device of every member (the key directory, ``keys.list``, as for a
one-to-one peer), this one aside; devices whose keys do not verify are left out (logged)
rather than holding the whole group's message. A member's list is fetched again before a
group message when this process last fetched it ``DEVICE_LIST_TTL_S`` ago or more (or never):
the server checks no device set for a group message (unlike one-to-one, where
``devices_mismatch`` says a list changed), so a member's new device gets the key, and a removed
one makes the session rotate, within that time of the change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from chatproto import MEGOLM_TYPE, ChatMessage, MsgItem
from chatproto import GroupInfo as InfoRequest
from client_sdk.e2e import E2E
from client_sdk.errors import RequestError
from client_sdk.events import Event, Message
from client_sdk.groupkeys import GroupCrypto, Opened, Outcome, Pending
from client_sdk.groupkeys import GroupItem as SealedItem
from client_sdk.groups import Membership, info_from
from client_sdk.inbox import Envelope as RowEnvelope
from client_sdk.inbox import batch_row, stored_events
from client_sdk.localstore import DeviceRecord, LocalStore, OutMessage
from client_sdk.outbox import Outbox
from client_sdk.senderkeys import SHARE_TYPE, Envelope, KeyShare, SenderKeyError, ShareVerdict

log = logging.getLogger(__name__)

Call = Callable[[str, dict[str, Any]], Any]
DROPPED = "its session key did not arrive before newer messages of the same sender device"
BODY_KEY = "group_body"
DEVICE_LIST_TTL_S = 600.0
SHARE_ID_PREFIX = "sdk-"
"""Ids of this device's share messages start so (other message ids are 16 random characters)."""


def is_share(msg_id: str) -> bool:
    return msg_id.startswith(SHARE_ID_PREFIX)
"""The outbox ``bodies`` column of a sealed group message: ``{"group_body": ciphertext}``."""


class GroupChannel:
    def __init__(self, store: LocalStore, e2e: E2E, crypto: GroupCrypto, membership: Membership, outbox: Outbox,
                 call: Call, clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self._e2e, self._crypto = store, e2e, crypto
        self._membership, self._outbox, self._call = membership, outbox, call
        self._clock = clock
        self._fetched: dict[str, float] = {}  # user -> when this process last fetched its device list (outbox thread)

    def members(self, group: str, refresh: bool = False) -> tuple[str, ...]:
        """The group's members as known here, fetched with ``group.info`` when not known (or ``refresh``).
        Raises RequestError (``not_member``: this user is not in it) or RequestTimeout."""
        members = None if refresh else self._membership.members(group)
        if members is None:
            info = info_from(InfoRequest.OP, self._call(InfoRequest.OP, InfoRequest(group).args()))
            self._membership.learn(info)
            members = info.members
        return members

    # --- sending (outbox thread) ---------------------------------------------------------

    def seal(self, message: OutMessage) -> tuple[ChatMessage, list[OutMessage]]:
        """The group message to publish, and the share messages to publish before it (new ones
        only; already in the outbox, due after the resend interval). Raises RequestError or
        RequestTimeout (from ``group.info`` / ``keys.list``)."""
        kept = self._store.outbox_bodies(message.id)
        if kept is not None:
            return self._chat(message, json.loads(kept)[BODY_KEY]), []
        devices: list[DeviceRecord] = []
        now = self._clock()
        for user in self.members(message.to):
            stale = now - self._fetched.get(user, -DEVICE_LIST_TTL_S) >= DEVICE_LIST_TTL_S
            found = self._e2e.devices(user, refresh=stale)
            if stale:
                self._fetched[user] = now
            for device in found.refused:
                log.warning("%s: leaving %s.%s out of %s: its keys do not verify", self._e2e.user, user, device,
                            message.to)
            devices.extend(found.devices.values())
        shares: list[OutMessage] = []
        with self._store.transaction():
            sealed = self._crypto.encrypt(message.to, devices, message.id, message.type, message.body)
            self._store.set_outbox_bodies(message.id, json.dumps({BODY_KEY: sealed.ciphertext}))
            if sealed.share is not None:
                for user in sealed.share_users():
                    share = self._outbox.new(user, sealed.share.encode(), SHARE_TYPE, SHARE_ID_PREFIX)
                    self._store.outbox_add(share)
                    shares.append(share)
        if sealed.rotated is not None:
            log.info("%s: new sender key for %s (%s)", self._e2e.user, message.to, sealed.rotated)
        self._outbox.track(shares, sending=True)
        return self._chat(message, sealed.ciphertext), shares

    @staticmethod
    def _chat(message: OutMessage, ciphertext: str) -> ChatMessage:
        return ChatMessage(message.id, message.to, ciphertext, MEGOLM_TYPE, message.ts)

    def failed(self, message: OutMessage | None) -> bool:
        """``message`` was refused for good: if it was a share, its user gets the key with the next
        message (``GroupCrypto.share_again``) and the app is not told. True if it was one."""
        if message is None or not is_share(message.id):
            return False
        try:
            self._crypto.share_again(KeyShare.decode(message.body).group, message.to)
        except SenderKeyError:
            log.warning("%s: share message %s does not parse", self._e2e.user, message.id)
        return True

    # --- receiving (dispatcher thread) ---------------------------------------------------------

    def open(self, seq: int, item: MsgItem) -> list[Event]:
        """Decrypt group message ``seq`` (``inbox`` rule 9)."""
        envelope = RowEnvelope.of(item)
        with self._store.transaction():
            if item.dev is None:
                forms = [envelope.undecryptable("the server did not say which device sent it")]
            else:
                sealed = SealedItem(Envelope(item.id, item.to, item.sender, item.dev), item.body, item.ts,
                                    item.gseq if item.gseq is not None else 0)
                forms = _forms(seq, [self._crypto.decrypt(sealed)])
            row = batch_row(seq, forms)
            self._store.restage(row)
        return list(stored_events(row) or ())

    def take_share(self, seq: int, message: Message) -> list[Event]:
        """An opened Olm message of an ``sdk.*`` type in row ``seq`` (``inbox`` rule 10): a share is
        stored and opens the group messages waiting for it; anything else is dropped."""
        try:
            group = KeyShare.decode(message.body).group if message.type == SHARE_TYPE else None
        except SenderKeyError:
            group = None
        members = self._membership.members(group) if group is not None else ()
        fetched = members is None and group is not None
        if fetched and group is not None:
            members = self._refresh(group)
        events = self._share(seq, message, members or (), last=fetched or group is None)
        if events is None and group is not None:  # the members may have changed since: ask the server
            events = self._share(seq, message, self._refresh(group), last=True)
        return events or []

    def _share(self, seq: int, message: Message, members: tuple[str, ...], last: bool) -> list[Event] | None:
        """Offer the share and restage its row; None (nothing done) if its sender is not a member
        as far as ``members`` go and this is not the ``last`` try."""
        with self._store.transaction():
            opened: tuple[Outcome, ...] = ()
            if message.type == SHARE_TYPE and message.device is not None:
                outcome = self._crypto.on_share(message.sender, message.device, message.body, members)
                if outcome.verdict is ShareVerdict.NOT_MEMBER and not last:
                    return None
                if outcome.verdict is not ShareVerdict.STORED:
                    log.info("%s: key share from %s.%s: %s %s", self._e2e.user, message.sender, message.device,
                             outcome.verdict, outcome.reason)
                opened = outcome.opened
            row = batch_row(seq, _forms(seq, opened))
            self._store.restage(row)
        return list(stored_events(row) or ())

    def _refresh(self, group: str) -> tuple[str, ...]:
        try:
            return self.members(group, refresh=True)
        except RequestError as exc:
            log.info("%s: cannot fetch the members of %s: %s", self._e2e.user, group, exc)
            return ()


def _forms(seq: int, outcomes: Iterable[Outcome]) -> list[dict[str, Any]]:
    """The row forms of decrypt/share outcomes, handed over as row ``seq``."""
    forms: list[dict[str, Any]] = []
    for outcome in outcomes:
        if isinstance(outcome, Pending):  # nothing to hand over yet, but the older ones given up on
            forms += [_envelope(seq, item).undecryptable(DROPPED) for item in outcome.dropped]
        elif isinstance(outcome, Opened):
            forms.append(_envelope(seq, outcome.item).opened(outcome.type, outcome.body))
        else:
            forms.append(_envelope(seq, outcome.item).undecryptable(outcome.reason))
    return forms


def _envelope(seq: int, item: SealedItem) -> RowEnvelope:
    e = item.envelope
    return RowEnvelope(seq, e.id, e.sender, e.group, e.device, item.ts, item.gseq)
