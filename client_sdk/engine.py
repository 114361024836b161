"""The engine shared by ``Client`` and ``AsyncClient``: store, inbox, outbox,
connection, dispatcher and the outbox thread, wired together.

Threads (all daemon threads, named after the client id):
- ``chat-net-*``: paho's network loop and reconnects (``Connection``); it
  stores arriving items and answers requests, and never waits on the app;
- ``chat-dispatch-*``: hands events to the app through ``deliver`` and acks
  (``Dispatcher``);
- ``chat-outbox-*``: publishes due outbox messages, in order (encrypting them
  first, in ``prepare``, which may claim keys, or holding them while the recipient has no
  device with keys: ``outbox`` rule 8), publishes and tops up this device's keys, sends
  the heartbeats while the app is in the foreground, and prunes the dedup memory.

End-to-end encryption (``e2e.E2E``) is on unless ``encryption=False``; the
local store is sealed with a key from ``store_secret`` (see ``securestore``).

The facades pass ``deliver(event) -> bool``: it returns once the app is done
with the event (True), or False if the client is closing and the event could
not be handed over. Requests are answered through callbacks keyed by ``rid``;
the facades wrap them in futures and always remove them in a ``finally``.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from chatproto import (
    GROUP_PREFIX,
    MAX_IDS_PER_ITEM,
    MEGOLM_TYPE,
    MESSAGE_ID_RE,
    RECEIPT_SENT,
    Ack,
    ChatMessage,
    ErrorItem,
    Heartbeat,
    MsgItem,
    PresenceItem,
    ReceiptItem,
    Request,
    ResItem,
    Seen,
    client_id,
    is_device_id,
    is_group_id,
    is_user_id,
    uplink_topic,
)
from client_sdk.backoff import Backoff
from client_sdk.connection import Connection, State
from client_sdk.dispatch import Dispatcher
from client_sdk.e2e import E2E
from client_sdk.errors import (
    AuthError,
    ChatError,
    ClientClosed,
    ConnectError,
    IdentifierRejected,
    NotConnected,
    RequestError,
    RequestTimeout,
    StoreError,
)
from client_sdk.events import (
    AUTH_FAILED,
    CONNECT_FAILED,
    KEYS_FAILED,
    PENDING,
    ErrorEvent,
    Event,
    GroupEvent,
    Receipt,
    error_from,
    presence_from,
    receipt_from,
)
from client_sdk.groupflow import GroupChannel, is_share
from client_sdk.groupkeys import GroupCrypto
from client_sdk.groups import Membership
from client_sdk.inbox import SDK_TYPE_PREFIX, Arrival, Inbox, read_downlink
from client_sdk.localstore import LocalStore
from client_sdk.login import LoginPlan, Secret
from client_sdk.options import ClientOptions
from client_sdk.outbox import ErrorVerdict, Outbox, wall_ms
from client_sdk.prepare import Preparer, Unsent
from client_sdk.presence import chunks, presences_from
from client_sdk.receipts import ReceiptLedger
from client_sdk.securestore import as_bytes

log = logging.getLogger(__name__)

ConnectDone = Callable[[BaseException | None], None]
"""Called once when a connect attempt ends: None (connected) or the error."""
Answer = Callable[[ResItem | BaseException], None]
"""Called once with a request's ``res`` item, or the exception that ended the wait."""

PRUNE_EVERY_S = 600.0
HANDED_IDS_KEEP = 10_000
HANDED_IDS_MAX_AGE_MS = 7 * 86400 * 1000
"""The dedup memory (``Inbox`` rule 5) keeps at most this many (sender, id) pairs, for at most a week."""
KEYS = "keys"
TOKEN = "token"  # noqa: S105 (the name of a step connect() waits for, not a secret)


def result_of(op: str, answer: ResItem | BaseException) -> Any:
    """The ``result`` of a request, or the exception for its failure (raised)."""
    if isinstance(answer, BaseException):
        raise answer
    if not answer.ok:
        raise RequestError(op, answer.error_code or "unknown", answer.error_detail or "")
    return answer.result


def validate_identity(user: str, device: str) -> None:
    """Raise IdentifierRejected for ids the server would refuse (PROTOCOL.md, Identity)."""
    if not is_user_id(user):
        raise IdentifierRejected(f"user id {user!r} is not 1-32 of [a-z0-9_]")
    if not is_device_id(device):
        raise IdentifierRejected(f"device id {device!r} is not 1-32 of [A-Za-z0-9_-]")


class Engine:
    """Everything a client does; ``options`` are described in ``client_sdk.options``."""

    def __init__(
        self, user: str, password: str | None, options: ClientOptions, deliver: Callable[[Event], bool],
    ) -> None:
        device, store = options.device, options.store
        validate_identity(user, device)
        self.user, self.device = user, device
        self.options = options
        self.cid = client_id(user, device)
        self.store = LocalStore(store, user, device)
        try:
            secret = options.store_secret
            sealer = self.store.unlock(None if secret is None else as_bytes(secret))
            pickle_key = sealer.subkey("olm-pickle")
            self.e2e = E2E(self.store, user, device, pickle_key, self.call,
                           lambda event: self._dispatcher.event(event),  # noqa: PLW0108 (made below)
                           ) if options.encryption else None
        except BaseException:
            self.store.close()
            raise
        self.outbox = Outbox(self.store, resend_interval=options.resend_interval,
                             hold_initial=options.hold_retry[0], hold_max=options.hold_retry[1])
        self.membership = Membership(self.store, user)
        self.groups = GroupChannel(self.store, self.e2e, GroupCrypto(self.store, user, device, pickle_key),
                                   self.membership, self.outbox, self.call) if self.e2e is not None else None
        self._prepare = Preparer(self.e2e, self.groups, self.outbox,
                                 lambda event: self._dispatcher.event(event),  # noqa: PLW0108 (made below)
                                 self.cid) if self.e2e is not None and self.groups is not None else None
        self.inbox = Inbox(self.store, decrypt=self._open if self.e2e is not None else None,
                           consume=self.groups.take_share if self.groups is not None else None)
        self._plan = LoginPlan(password, self.store.token())
        self._conn = Connection(
            user, device, self._plan, self, options.host, options.port, options.keepalive, options.tls,
            options.transport, Backoff(*options.reconnect_delay),
        )
        self._deliver = deliver
        self._receipts = ReceiptLedger()  # touched by the dispatcher thread only
        self._dispatcher = Dispatcher(self.inbox, self._hand_over, self._publish_acks,
                                      name=f"chat-dispatch-{self.cid}")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._woken = False
        self._answers: dict[str, Answer] = {}
        self._deferred: list[tuple[str, bytes]] = []
        self._waiters: list[ConnectDone] = []
        self._ever_ready = False
        self._token_pending = False
        self._pending_parts: set[str] = set()  # what on_ready still waits for before connect() returns
        self._started = False
        self._session_lock = threading.Lock()
        self._session = 0
        self._outbox_live = False
        self._hb_interval = options.heartbeat_interval
        self._foreground = False
        self._next_hb: float | None = None  # monotonic time of the next heartbeat while in the foreground
        self._watched: dict[str, None] = {}  # users this device watches (ordered set), re-watched on every reconnect
        self.closing = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name=f"chat-outbox-{self.cid}", daemon=True)

    # --- state -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn.ready

    def check_open(self) -> None:
        """Raise ClientClosed once close() has begun."""
        if self.closing.is_set():
            raise ClientClosed(f"{self.cid}: the client is closed")

    # --- connecting ----------------------------------------------------------------

    def connect_async(self, outcome: ConnectDone) -> None:
        """Start connecting (if not already) and call ``outcome`` once it succeeds or fails for good.

        Success means: subscribed to the inbox and, after a password login, the
        new device token stored (or its request failed). Network errors are
        retried; the caller bounds the wait and then calls ``cancel_connect``.
        """
        with self._lock:
            self.check_open()
            if not self._started:
                self._started = True
                self._dispatcher.start()
                self._sender.start()
            if self._conn.ready and not self._token_pending and not self._pending_parts:
                done = True
            else:
                done = False
                self._waiters.append(outcome)
        if done:
            outcome(None)
        else:
            self._conn.start()

    def cancel_connect(self, outcome: ConnectDone) -> BaseException | None:
        """Give up waiting; stops connecting if never connected. Returns the last network error."""
        with self._lock:
            if outcome in self._waiters:
                self._waiters.remove(outcome)
            never = not self._ever_ready and not self._waiters
        if never:
            self._conn.stop()
        return self._conn.last_error

    def _resolve(self, error: BaseException | None) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for outcome in waiters:
            try:
                outcome(error)
            except Exception:
                log.exception("%s: a connect waiter failed", self.cid)

    # --- ConnectionListener (network thread) -------------------------------------------

    def on_ready(self, secret: Secret) -> None:
        need_token = self._plan.accepted(secret)  # a password login: get a device token for next time
        with self._lock:
            self._ever_ready = True
            self._token_pending = need_token
            self._pending_parts = ({TOKEN} if need_token else set()) | ({KEYS} if self.e2e is not None else set())
            if self.e2e is not None:
                self.e2e.keys_wanted.set()  # publish and top up this device's keys (the outbox thread)
            if self._foreground:
                self._next_hb = time.monotonic()  # tell the server at once that this device is in the foreground
            watched = list(self._watched)
            deferred, self._deferred = self._deferred, []
            for rid, payload in deferred:
                if rid in self._answers:
                    self._conn.publish(uplink_topic(self.user, "req"), payload, hold=False)
        log.info("%s: connected (%s)", self.cid, secret.kind)
        with self._session_lock:  # the whole outbox is due, in order, before anything else goes out
            self.outbox.connected()
            self._session += 1
            self._outbox_live = True
        self._kick()
        # Watch lists end with the connection on the server: watch again, and hand the current states over.
        for args in chunks(watched):
            self.request_async("presence.subscribe", args, self._rewatched)
        if need_token:
            self.request_async("auth.token", {}, self._token_answer)
        elif not self._pending_parts:
            self._resolve(None)

    def _part_done(self, part: str) -> None:
        """One thing connect() waits for is done; resolve the waiters when nothing is left."""
        with self._lock:
            if part not in self._pending_parts:
                return
            self._pending_parts.discard(part)
            left = bool(self._pending_parts)
        if not left:
            self._resolve(None)

    def _rewatched(self, answer: ResItem | BaseException) -> None:
        if isinstance(answer, ResItem) and answer.ok:
            for presence in presences_from(answer.result).values():
                self._dispatcher.event(presence)
        elif isinstance(answer, ResItem):
            log.warning("%s: watching presence again failed: %s %s", self.cid, answer.error_code, answer.error_detail)

    def _token_answer(self, answer: ResItem | BaseException) -> None:
        self._token_pending = False
        if self.closing.is_set():
            return  # close() answers the waiters
        token = answer.result.get("token") if isinstance(answer, ResItem) and isinstance(answer.result, dict) else None
        if isinstance(token, str) and token:
            self.store.set_token(token)
            self._plan.token_issued(token)
            log.info("%s: device token stored", self.cid)
        else:
            log.warning("%s: no device token (%r); the password will be used again", self.cid, answer)
            if isinstance(answer, BaseException) and not self._conn.ready:
                return  # the connection dropped: waiters wait for the next session
        self._part_done(TOKEN)

    def on_down(self) -> None:
        with self._session_lock:  # a publish loop of the old session stops here
            self._session += 1
            self._outbox_live = False
        with self._lock:
            deferred = {rid for rid, _ in self._deferred}
            answers = {rid: a for rid, a in self._answers.items() if rid not in deferred}
            for rid in answers:
                del self._answers[rid]
        for answer in answers.values():
            _call(answer, RequestTimeout("the connection dropped before the answer arrived"))

    def on_failed(self, error: ConnectError) -> None:
        self._resolve(error)
        if self._ever_ready and not self.closing.is_set():
            code = AUTH_FAILED if isinstance(error, AuthError) else CONNECT_FAILED
            self._dispatcher.event(ErrorEvent(code, f"{error}; not reconnecting", None))

    def on_token_refused(self) -> None:
        self.store.set_token(None)

    def on_payload(self, payload: bytes) -> None:
        found = read_downlink(payload)
        item = found.item
        # Word from a peer means it has a device now: messages held for its keys are tried at once.
        heard = item.sender if isinstance(item, MsgItem) else item.user if isinstance(item, PresenceItem) else None
        if heard is not None and heard != self.user and self.outbox.wake(heard):
            self._kick()
        if isinstance(item, ReceiptItem):
            confirmed = self.outbox.confirmed(item.ids)  # any receipt means the server has (had) it
            if confirmed and item.status != RECEIPT_SENT:
                # The ephemeral 'sent' for these was lost (with a cut connection, say) and 'delivered' or
                # 'seen' came first: the app still sees 'sent' before them, as for every other message.
                self._dispatcher.event(Receipt(RECEIPT_SENT, tuple(confirmed), item.peer, item.ts))
        if found.seq is not None:
            verdict = self.inbox.stage(found.seq, payload)
            if verdict is Arrival.STORE:
                self._dispatcher.stored(found.seq)
            elif verdict is Arrival.DUPLICATE:
                self._dispatcher.duplicate(found.seq)
            return
        if item is None:
            log.warning("%s: dropping an unreadable downlink item: %s", self.cid, found.problem)
        elif isinstance(item, ResItem):
            self._answer(item.rid, item)
        elif isinstance(item, ReceiptItem):
            self._dispatcher.event(receipt_from(item))
        elif isinstance(item, PresenceItem):
            self._dispatcher.event(presence_from(item))
        elif isinstance(item, ErrorItem):
            self._on_error(item)

    def _hand_over(self, event: Event) -> bool:
        """The dispatcher's hand-over: receipts pass the ledger (each status once, in order); a group
        change updates the members known here first (``groups`` rule 1)."""
        if isinstance(event, GroupEvent):
            self.membership.apply(event)
        if not isinstance(event, Receipt):
            return self._deliver(event)
        ids = tuple(i for i in event.ids if not is_share(i))  # the SDK's own key shares: not the app's
        if not ids:
            return True
        return all(self._deliver(receipt) for receipt in self._receipts.admit(replace(event, ids=ids)))

    def _on_error(self, item: ErrorItem) -> None:
        if item.ref is not None and item.ref in self._answers:  # a request the server could not read
            self._answer(item.ref, ResItem(item.ref, False, None, item.code, item.detail))
            return
        message = self.outbox.message(item.ref) if item.ref is not None else None
        verdict = self.outbox.on_error(item.ref, item.code)
        if verdict is ErrorVerdict.RETRY:
            log.info("%s: message %s: %s (%s); retrying later", self.cid, item.ref, item.code, item.detail)
        elif verdict is ErrorVerdict.HOLD and item.ref is not None:
            log.info("%s: message %s: %s (%s); held until the recipient has keys", self.cid, item.ref, item.code,
                     item.detail)
            if self.e2e is not None:
                self.e2e.on_no_keys(item.ref, self.outbox.recipient(item.ref))
            self._report_pending()
        elif verdict is ErrorVerdict.REBUILD and self.e2e is not None and item.ref is not None:
            log.info("%s: message %s: devices changed (missing %s, extra %s, stale %s); encrypting again",
                     self.cid, item.ref, item.missing, item.extra, item.stale)
            self.e2e.on_mismatch(item.ref, item.missing, item.extra, item.stale)
        elif self._prepare is None or not self._prepare.share_failed(message):
            self._dispatcher.event(error_from(item))
        if verdict is not ErrorVerdict.NOT_OURS:
            self._kick()

    # --- requests --------------------------------------------------------------------

    def request_async(self, op: str, args: dict[str, Any] | None, answer: Answer) -> str:
        """Publish a request (now, or once connected); ``answer`` gets the ``res``. Returns the rid.

        The caller must call ``forget(rid)`` when it stops waiting.
        """
        rid = secrets.token_hex(8)
        payload = Request(rid, op, args or {}).encode()
        with self._lock:
            self.check_open()
            if not self._started:
                raise NotConnected(f"{self.cid}: call connect() before request()")
            self._answers[rid] = answer
            if self._conn.ready:
                self._conn.publish(uplink_topic(self.user, "req"), payload, hold=False)
            else:
                self._deferred.append((rid, payload))
        return rid

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run a request and return its ``result``, blocking (never from paho's thread).

        Raises ``RequestError``, ``RequestTimeout``, ``NotConnected`` or ``ClientClosed``.
        """
        future: Future[ResItem | BaseException] = Future()

        def answer(value: ResItem | BaseException) -> None:
            if not future.done():
                future.set_result(value)

        rid = self.request_async(op, args, answer)
        try:
            value = future.result(timeout)
        except FutureTimeout:
            raise RequestTimeout(f"{op}: no answer within {timeout:.1f}s") from None
        finally:
            self.forget(rid)
        return result_of(op, value)

    def forget(self, rid: str) -> None:
        with self._lock:
            self._answers.pop(rid, None)
            self._deferred = [(r, p) for r, p in self._deferred if r != rid]

    def _answer(self, rid: str, item: ResItem | BaseException) -> None:
        with self._lock:
            answer = self._answers.pop(rid, None)
        if answer is not None:
            _call(answer, item)

    # --- uplink ----------------------------------------------------------------------

    def send(self, to: str, body: str, kind: str = "text", preview: str | None = None) -> str:
        """Store the message in the outbox (works offline) and return its id."""
        self.check_open()
        if to.startswith(GROUP_PREFIX) and not is_group_id(to):
            raise ValueError(f"{to!r} is not a group id")
        if isinstance(kind, str) and kind.startswith(SDK_TYPE_PREFIX):
            raise ValueError(f"message types starting {SDK_TYPE_PREFIX!r} are the SDK's own")
        try:
            message = self.outbox.add(to, body, kind, preview)
        except sqlite3.Error as exc:
            self.check_open()
            raise StoreError(f"{self.cid}: cannot store the message: {exc}") from exc
        self._kick()
        return message.id

    def mark_seen(self, peer: str, ids: list[str]) -> None:
        """Tell ``peer`` these of their messages were displayed (``peer`` a group id: these
        messages of that group, whoever sent them).

        Published by the dispatcher after the acks of everything handed over
        so far (so ``seen`` cannot overtake ``delivered``); held in memory while offline.
        """
        self.check_open()
        if not is_user_id(peer) and not is_group_id(peer):
            raise ValueError(f"peer must be a user id or a group id, not {peer!r}")
        bad = [i for i in ids if not isinstance(i, str) or MESSAGE_ID_RE.fullmatch(i) is None]
        if bad:
            raise ValueError(f"not message ids: {bad[:3]!r}")
        topic = uplink_topic(self.user, "seen")
        payloads = [Seen(peer, tuple(ids[i:i + MAX_IDS_PER_ITEM])).encode()
                    for i in range(0, len(ids), MAX_IDS_PER_ITEM)]

        def publish() -> None:
            for payload in payloads:
                self._conn.publish(topic, payload, hold=True)

        self._dispatcher.after_acks(publish)

    def heartbeat(self, away: bool = False) -> None:
        """Publish ``u/{me}/hb``: ``{}`` (app in the foreground) or ``{"state":"away"}``; dropped while offline."""
        self.check_open()
        self._conn.publish(uplink_topic(self.user, "hb"), Heartbeat(away).encode(), hold=False)

    # --- presence -----------------------------------------------------------------------

    def set_foreground(self, foreground: bool) -> None:
        """In the foreground: a heartbeat now and every ``heartbeat_interval`` while connected
        (and at once after each reconnect). Back to the background: ``{"state":"away"}`` once."""
        self.check_open()
        with self._lock:
            leaving = self._foreground and not foreground
            self._foreground = foreground
            self._next_hb = time.monotonic() + self._hb_interval if foreground else None
            now = foreground and self._conn.ready
        # Published in the caller's thread, so it goes out before anything the caller does next.
        if now:
            self.heartbeat(False)
        elif leaving:
            self.heartbeat(away=True)
        self._kick()

    def watch(self, users: list[str]) -> None:
        with self._lock:
            self._watched.update(dict.fromkeys(users))

    def unwatch(self, users: list[str]) -> None:
        with self._lock:
            for user in users:
                self._watched.pop(user, None)

    def watched(self) -> list[str]:
        with self._lock:
            return list(self._watched)

    def _beat(self) -> float | None:
        """Send the heartbeat if it is due; when the next one is due (monotonic), or None."""
        with self._lock:
            due = self._next_hb
            if due is None or not self._conn.ready:
                return None  # on_ready makes it due again
            now = time.monotonic()
            if now < due:
                return due
            self._next_hb = now + self._hb_interval
        self.heartbeat(False)
        return now + self._hb_interval

    def _publish_acks(self, seqs: list[int]) -> None:
        # QoS 0: a lost ack leaves the item staged, sent again and acked again (connection.py, "QoS")
        self._conn.publish(uplink_topic(self.user, "ack"), Ack(tuple(seqs)).encode(), hold=True, qos=0)

    # --- the outbox thread -------------------------------------------------------------

    def _kick(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify()

    def _publish_due(self) -> None:
        """Publish due outbox messages, in order, within one session.

        Only after ``on_ready`` made the whole outbox due for the session (so a
        message sent meanwhile cannot overtake older unconfirmed ones), and
        never a message of an earlier session's round into a new session.
        """
        with self._session_lock:
            if not self._outbox_live:
                return
            session = self._session
            due = self.outbox.take_due()
        topic = uplink_topic(self.user, "out")
        waiting: set[str] = set()  # recipients without keys: their later messages wait too (order)
        try:
            for index, message in enumerate(due):
                if message.to in waiting:
                    self.outbox.hold(message.id)
                    continue
                chat = self._prepare.encrypted(message) if self._prepare is not None else [ChatMessage(
                    message.id, message.to, message.body, message.type, message.ts)]
                if chat is Unsent.REFUSED:
                    continue
                if chat is Unsent.HELD:
                    waiting.add(message.to)
                    self.outbox.hold(message.id)
                    continue
                if chat is Unsent.LATER:
                    self.outbox.retry_later([m.id for m in due[index:]])
                    return
                with self._session_lock:
                    if self._session != session:
                        return
                    for each in chat:  # a group message's new key shares go out before it
                        self._conn.publish(topic, each.encode(), hold=False)
        finally:
            self._report_pending()

    def _report_pending(self) -> None:
        """Hand the app a ``pending`` receipt for messages newly held for their recipient's keys."""
        for peer, ids in self.outbox.take_pending().items():
            log.info("%s: %d message(s) to %s held until it has a device with keys", self.cid, len(ids), peer)
            self._dispatcher.event(Receipt(PENDING, tuple(ids), peer, wall_ms()))

    def _open(self, seq: int, item: MsgItem) -> list[Event]:
        """Dispatcher thread: decrypt a staged message (``Inbox`` rules 8 and 9)."""
        assert self.e2e is not None and self.groups is not None
        if item.type == MEGOLM_TYPE:
            return self.groups.open(seq, item)
        event = self.e2e.open_message(seq, item)
        if self.e2e.keys_wanted.is_set():
            self._kick()  # a one-time key was used: top up from the outbox thread
        return [event]

    def _sync_keys(self) -> None:
        """Outbox thread: publish/top up this device's keys when asked to, while connected."""
        e2e = self.e2e
        if e2e is None or not e2e.keys_wanted.is_set() or not self._conn.ready:
            return
        e2e.keys_wanted.clear()
        try:
            e2e.sync_keys()
        except (RequestTimeout, NotConnected) as exc:
            if not self._conn.ready:
                return  # on_ready asks again
            self._dispatcher.event(ErrorEvent(KEYS_FAILED, f"publishing this device's keys: {exc}", None))
        except RequestError as exc:
            self._dispatcher.event(ErrorEvent(KEYS_FAILED, f"publishing this device's keys: {exc}", None))
        self._part_done(KEYS)

    def _send_loop(self) -> None:
        next_prune = 0.0
        while not self.closing.is_set():
            beat: float | None = None
            try:
                self._sync_keys()
                self._publish_due()
                beat = self._beat()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.store.prune_handed_ids(int(time.time() * 1000) - HANDED_IDS_MAX_AGE_MS, HANDED_IDS_KEEP)
            except Exception:
                if self.closing.is_set():
                    return
                log.exception("%s: the outbox thread failed a round", self.cid)
            due = self.outbox.next_due() if self._outbox_live else None
            wait = PRUNE_EVERY_S if due is None else max(0.0, due - time.monotonic())
            if beat is not None:
                wait = min(wait, max(0.0, beat - time.monotonic()))
            with self._wake:
                if not self._woken:
                    self._wake.wait(min(wait, PRUNE_EVERY_S))
                self._woken = False

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything; idempotent. Unhanded staged items and the outbox stay in the store."""
        with self._lock:
            if self.closing.is_set():
                return
            self.closing.set()
        self._dispatcher.stop()
        self._kick()
        if self._sender.is_alive() and self._sender is not threading.current_thread():
            self._sender.join(10)
        with self._lock:
            answers, self._answers = self._answers, {}
        for answer in answers.values():
            _call(answer, ClientClosed(f"{self.cid}: closed while waiting for an answer"))
        self._resolve(ClientClosed(f"{self.cid}: closed while connecting"))
        if self._conn.state is not State.IDLE:
            self._conn.stop()
        dispatcher = self._dispatcher.thread
        if dispatcher is None or dispatcher is not threading.current_thread():
            self.store.close()


def _call(answer: Answer, value: ResItem | BaseException) -> None:
    try:
        answer(value)
    except Exception:
        log.exception("a request callback failed")


class EngineFront:
    """What ``Client`` and ``AsyncClient`` share over their ``Engine``: who they are, and state."""

    _engine: Engine

    @property
    def user(self) -> str:
        return self._engine.user

    @property
    def device(self) -> str:
        return self._engine.device

    @property
    def connected(self) -> bool:
        """True while a session is up (subscribed); False while reconnecting or closed."""
        return self._engine.connected

    def outbox(self) -> list[str]:
        """Ids of messages not yet confirmed ``sent``, oldest first."""
        return self._engine.outbox.ids()

    def _preview_key(self, wanted: bool) -> dict[str, str]:
        """``push.register``'s preview key arguments: none without encryption or when not ``wanted``."""
        return self._engine.e2e.preview_registration() if wanted and self._engine.e2e is not None else {}

    def _e2e(self) -> E2E:
        """The engine's E2E state; raises ChatError when encryption is off."""
        if self._engine.e2e is None:
            raise ChatError(f"{self._engine.cid}: end-to-end encryption is off on this client")
        return self._engine.e2e
