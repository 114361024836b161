"""``Client``: the thread-and-callback face of the SDK.

Set the callbacks, then ``connect()``; events are handed to the callbacks in
the dispatcher thread (one at a time, in arrival order), never in paho's
network thread. A callback may call ``send``, ``mark_seen`` and ``request``.
A message is acked to the server only after ``on_message`` returns; if the
callback raises, the exception is logged and the message counts as handed
over (one bad message must not block the rest).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

from chatproto import OP_DEVICES_REMOVE, OP_PUSH_PENDING, OP_PUSH_REGISTER, OP_PUSH_UNREGISTER
from client_sdk.engine import Engine, EngineFront
from client_sdk.errors import ConnectTimeout
from client_sdk.events import (
    ErrorEvent,
    Event,
    GroupEvent,
    IdentityChanged,
    Message,
    Presence,
    Receipt,
    Undecryptable,
)
from client_sdk.groups import (
    GroupInfo,
    GroupReceiptInfo,
    GroupSummary,
    admins_steps,
    create_steps,
    info_steps,
    leave_steps,
    list_steps,
    members_steps,
    receipts_steps,
    rename_steps,
)
from client_sdk.media import Progress
from client_sdk.mediabody import MediaBody
from client_sdk.mediaclient import MediaFile, download_media, send_media
from client_sdk.options import ClientOptions, ClientSettings
from client_sdk.presence import (
    Privacy,
    Steps,
    check_privacy,
    contacts_steps,
    get_steps,
    privacy_from,
    unwatch_steps,
    watch_steps,
)
from client_sdk.preview import PushPreview
from client_sdk.push import FETCH_POLL_S, items_left, register_args

log = logging.getLogger(__name__)

__all__ = ["Client"]

SecurityWarning = Undecryptable | IdentityChanged
T = TypeVar("T")


class Client(EngineFront):
    """A chat client for one device of one user.

    ``password`` may be None once the store holds a device token. The settings
    (``device``, ``host``, ``port``, ``store``, ...) are the fields of
    ``ClientOptions``: pass them as keywords, as ``options=``, or both (the
    keywords win); see ``client_sdk.options`` for each.

    Raises ``IdentifierRejected`` for malformed ids and ``StoreError`` if the
    store belongs to another user or device or the secret is wrong. Call
    ``close()`` when done (or use ``with Client(...) as c:``, which connects and closes).
    """

    def __init__(
        self, user: str, password: str | None, options: ClientOptions | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        self.on_message: Callable[[Message], None] | None = None
        self.on_group: Callable[[GroupEvent], None] | None = None
        """Changes of groups this user is in (``GroupEvent``), in the group's order with its messages."""
        self.on_receipt: Callable[[Receipt], None] | None = None
        self.on_presence: Callable[[Presence], None] | None = None
        self.on_error: Callable[[ErrorEvent], None] | None = None
        self.on_warning: Callable[[SecurityWarning], None] | None = None
        """``Undecryptable`` messages and ``IdentityChanged`` warnings (logged if None)."""
        self._engine = Engine(user, password, ClientOptions.of(options, settings), self._deliver)

    # --- lifecycle -----------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        """Connect and return once subscribed; later drops are retried with backoff.

        Set the callbacks first: stored events from an earlier run are handed
        over as soon as this is called. Raises ``AuthError`` (bad password or
        token), ``IdentifierRejected``, ``ConnectError``, or ``ConnectTimeout``
        if the server could not be reached within ``timeout`` seconds
        (``__cause__`` is the last network error); it does not retry those.
        """
        done = threading.Event()
        box: list[BaseException | None] = []

        def outcome(error: BaseException | None) -> None:
            box.append(error)
            done.set()

        self._engine.connect_async(outcome)
        if not done.wait(timeout):
            last = self._engine.cancel_connect(outcome)
            if not done.is_set():
                raise ConnectTimeout(f"not connected within {timeout:.1f}s (last error: {last})") from last
        if box[0] is not None:
            raise box[0]

    def close(self) -> None:
        """Disconnect and stop the threads; idempotent. The outbox and unhanded items stay stored.

        Do not call it from inside a callback if you can avoid it: the event
        being handed over is then handed over again by the next run.
        """
        self._engine.close()

    def __enter__(self) -> Client:
        try:
            self.connect()
        except BaseException:
            self.close()  # nobody can call close() on a client the with-statement never handed out
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- messaging -----------------------------------------------------------------

    def send(self, to: str, body: str, type: str = "text", preview: str | None = None) -> str:
        """Store a message in the outbox and return its id; it is published when connected.

        ``to`` is a user id, or a group id (``g:...``: the message goes to every member, end-to-end
        encrypted with this device's sender key when encryption is on). Works offline. The message
        is re-published (same id) until the server confirms ``sent``; a permanent refusal arrives
        as an ``ErrorEvent`` with ``ref`` = the id. Raises ValueError for a malformed ``to``/``type``.
        ``preview``: the text a recipient's push notification may show, encrypted for each of its
        devices that registered a preview key, where the server carries previews (docs/SDK.md "Push
        previews"); None: the body of a ``text`` message; "": none. Not for groups.
        """
        return self._engine.send(to, body, type, preview)

    def mark_seen(self, peer: str, ids: list[str]) -> None:
        """Tell ``peer`` that these messages from them were displayed."""
        self._engine.mark_seen(peer, list(ids))

    # --- media (docs/SDK.md, "Media") ------------------------------------------------

    def send_media(self, to: str, file: MediaFile, mime: str | None = None, name: str | None = None,
                   thumbnail: bytes | None = None, progress: Progress | None = None) -> str:
        """Encrypt ``file`` (a path or a seekable binary file) with a new key, upload the ciphertext
        to ``media_url`` (streamed; resumed after cuts) and send the key and link to ``to`` in an
        end-to-end encrypted ``type="media"`` message, whose id is returned. Blocks until uploaded.

        ``progress(done, total)`` gets ciphertext bytes sent; an exception from it aborts. Raises
        ``MediaError`` (``.code``: ``encryption_required``, ``not_configured``, ``too_large``,
        ``quota_exceeded``, ``not_member``, ``network`` after the retries, ...), ``ValueError``.
        """
        return send_media(self._engine, to, file, mime, name, thumbnail, progress)

    def download_media(self, message_or_body: Message | MediaBody | str, dest: str | os.PathLike[str],
                       progress: Progress | None = None) -> MediaBody:
        """Download the file of a media ``Message`` (or its body) into ``dest``: resumed after
        cuts (a ``.part`` file beside ``dest``), SHA-256 checked, decrypted into a temporary file
        renamed to ``dest``; then the server is told this device has it. Returns the parsed body
        (``mime``, ``name``, ``size``, ``thumbnail``). Raises ``MediaBodyError`` for a malformed
        body, ``MediaError`` (``not_found``, ``gone``, ``digest_mismatch``, ...), ``MediaCryptoError``.
        """
        return download_media(self._engine, message_or_body, dest, progress)

    def heartbeat(self, away: bool = False) -> None:
        """Say the app is in the foreground (call at least every 30 s) or went ``away``; dropped while offline."""
        self._engine.heartbeat(away)

    # --- presence ------------------------------------------------------------------

    def set_foreground(self, foreground: bool = True) -> None:
        """The app came to the foreground (True: heartbeats now and every ``heartbeat_interval``
        while connected, so this user shows online) or went to the background (False: one
        ``{"state":"away"}``, then none). Starts in the background."""
        self._engine.set_foreground(foreground)

    def presence(self, users: Iterable[str], timeout: float = 10.0) -> dict[str, Presence]:
        """The current presence of ``users`` as this user may see it (``online``/``last_seen`` None: hidden)."""
        return self._run(get_steps(users), timeout)

    def watch_presence(self, users: Iterable[str], timeout: float = 10.0) -> dict[str, Presence]:
        """Watch ``users``: returns their current presence; each later change arrives at ``on_presence``.

        The watch list is kept by this client and sent again after every reconnect (the
        server forgets it with the connection); the states found then arrive at ``on_presence``.
        Raises ``RequestError`` (``too_large``) past the server's limit of watched users.
        """
        return self._run(watch_steps(users, self._engine.watch, self._engine.unwatch), timeout)

    def unwatch_presence(self, users: Iterable[str], timeout: float = 10.0) -> None:
        self._run(unwatch_steps(users, self._engine.unwatch), timeout)

    def set_privacy(self, last_seen: str, timeout: float = 10.0) -> None:
        """Who sees this user's online and last seen: ``"everyone"``, ``"contacts"`` (the default:
        users in this user's contact list) or ``"nobody"``. Hiding it from someone also hides
        their last seen from you (reciprocity)."""
        check_privacy(last_seen)
        self.request("privacy.set", {"last_seen": last_seen}, timeout)

    def privacy(self, timeout: float = 10.0) -> Privacy:
        """This user's privacy setting and contact list, as the server keeps them."""
        return privacy_from(self.request("privacy.get", None, timeout))

    def add_contacts(self, users: Iterable[str], timeout: float = 10.0) -> int:
        """Add to this user's contact list (who ``"contacts"`` shows presence to); returns its size."""
        return self._run(contacts_steps("contacts.add", users), timeout)

    def remove_contacts(self, users: Iterable[str], timeout: float = 10.0) -> int:
        return self._run(contacts_steps("contacts.remove", users), timeout)

    # --- groups (docs/SDK.md, "Groups") --------------------------------------------------
    # Each raises RequestError (``not_member``, ``forbidden``, ``group_full``, ``too_many_groups``,
    # ``unknown_recipient``, ``bad_envelope``: see ``.code``), RequestTimeout, ClientClosed.

    def create_group(self, name: str, members: Iterable[str] = (), timeout: float = 10.0) -> GroupInfo:
        """Create a group with this user as its first member and admin, and ``members``."""
        return self._run(create_steps(name, members, self._engine.membership), timeout)

    def add_members(self, group: str, users: Iterable[str], timeout: float = 10.0) -> list[str]:
        """Add ``users`` (admins only); returns those who were not members yet."""
        return self._run(members_steps(group, users, False, self._engine.membership), timeout)

    def remove_members(self, group: str, users: Iterable[str], timeout: float = 10.0) -> list[str]:
        """Remove ``users`` (admins only; not yourself: ``leave_group``); returns those who were members.
        With encryption on, the next message to the group is sealed with a new sender key they do not get."""
        return self._run(members_steps(group, users, True, self._engine.membership), timeout)

    def leave_group(self, group: str, timeout: float = 10.0) -> int:
        """Leave ``group``; returns its ``gseq`` after it."""
        return self._run(leave_steps(group, self._engine.membership), timeout)

    def rename_group(self, group: str, name: str, timeout: float = 10.0) -> int:
        """Rename ``group`` (admins only); returns its ``gseq`` after it."""
        return self._run(rename_steps(group, name), timeout)

    def set_admins(self, group: str, add: Iterable[str] = (), remove: Iterable[str] = (),
                   timeout: float = 10.0) -> list[str]:
        """Promote the members ``add``, demote the admins ``remove`` (admins only); returns the admins."""
        return self._run(admins_steps(group, add, remove), timeout)

    def group_info(self, group: str, timeout: float = 10.0) -> GroupInfo:
        """``group``'s name, members (join order), admins and ``gseq`` (members only)."""
        return self._run(info_steps(group, self._engine.membership), timeout)

    def list_groups(self, timeout: float = 10.0) -> list[GroupSummary]:
        """The groups this user is in."""
        return self._run(list_steps(), timeout)

    def group_receipts(self, group_id: str, message_id: str, timeout: float = 10.0) -> GroupReceiptInfo:
        """Who of ``group_id`` has, and who saw, this user's message ``message_id`` (members only;
        another member's message: ``forbidden``). The receipts themselves come as ``Receipt`` events,
        ``peer`` = the group: ``delivered`` once every member has it, ``seen`` once every one saw it."""
        return self._run(receipts_steps(group_id, message_id), timeout)

    # --- requests ------------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run a request (``u/{me}/req``) and return its ``result``.

        Waits for the connection if it is down. Raises ``RequestError`` (the
        server said ``ok: false``; see ``.code``), ``RequestTimeout``,
        ``NotConnected`` (connect() never called) or ``ClientClosed``.
        """
        return self._engine.call(op, args, timeout)

    def _run(self, steps: Steps[T], timeout: float) -> T:
        """Make the requests of ``steps`` one after another (see ``presence.Steps``)."""
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                op, args = steps.send(result) if error is None else steps.throw(error)
            except StopIteration as done:
                return cast(T, done.value)
            try:
                result, error = self.request(op, args, timeout), None
            except Exception as exc:  # thrown into the steps: they may clean up, then it propagates
                result, error = None, exc

    # --- end-to-end encryption -------------------------------------------------------

    def fingerprint(self, user: str | None = None, device: str | None = None) -> str:
        """The fingerprint (Ed25519 key, in groups of four) of this device, or of ``user``'s ``device``
        as this device trusts it (fetched if not known yet). Compare it with what that device shows.

        Raises ``UnknownDevice`` if that device has no published keys, ``ChatError`` if encryption is off.
        """
        return self._e2e().fingerprint(user, device)

    def safety_number(self, user: str) -> str:
        """60 digits over both users' device keys, the same on both sides: compare them to verify
        ``user``; it changes when either adds a device or reinstalls. Fetches both device lists."""
        return self._e2e().safety_number(user)

    def remove_device(self, device: str, timeout: float = 10.0) -> None:
        """Forget one of this user's devices on the server (a lost or replaced phone): its keys,
        its queued items and tokens; it no longer receives (or can decrypt) new messages."""
        self.request(OP_DEVICES_REMOVE, {"device": device}, timeout)

    def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of a ``ping`` request, in seconds."""
        start = time.monotonic()
        self.request("ping", None, timeout)
        return time.monotonic() - start

    # --- push --------------------------------------------------------------------------

    def register_push(self, platform: str, timeout: float = 10.0, previews: bool = True, **registration: Any) -> None:
        """Have the server wake this device through ``platform`` when it is away (docs/PUSH.md):
        ``register_push("fcm", token=...)``, ``("apns", token=<hex>)``, ``("webpush", subscription=
        <PushSubscription.toJSON()>)``, ``("unifiedpush", endpoint=<url>)``. Replaces an earlier
        registration. ``previews``: also register this device's preview key (encryption on), so
        senders can put an encrypted preview in its wake-ups where the server allows it
        (``decrypt_preview``). Raises ``ValueError`` for a bad argument (before sending),
        ``RequestError`` ``unsupported`` if the server does not send that platform's pushes."""
        self.request(OP_PUSH_REGISTER, register_args(platform, registration, self._preview_key(previews)), timeout)

    def decrypt_preview(self, payload: Mapping[str, Any] | bytes | str) -> PushPreview | None:
        """The push preview in a wake-up, for the app's push handler (no connection needed):
        ``payload`` is FCM's data map, the APNs payload, or the Web Push / UnifiedPush body. None if
        it carries none, or one this device cannot open or that is forged (docs/SDK.md). Raises
        ``ChatError`` if encryption is off."""
        return self._e2e().decrypt_preview(payload)

    def unregister_push(self, timeout: float = 10.0) -> bool:
        """No more wake-ups for this device; False if it had no registration."""
        return bool(self.request(OP_PUSH_UNREGISTER, None, timeout)["removed"])

    def fetch_pending(self, timeout: float = 20.0) -> int:
        """After a wake-up: connect, take everything waiting for this device (handed to the callbacks
        and acked), then close -- what a background task has seconds for. Set the callbacks first.
        Returns the items still waiting when it stopped: 0, unless ``timeout`` ran out first (they
        come with the next connection). Raises what ``connect`` raises."""
        deadline = time.monotonic() + timeout
        try:
            self.connect(timeout)
            while True:
                left = items_left(self.request(OP_PUSH_PENDING, None, max(0.1, deadline - time.monotonic())))
                if not left or time.monotonic() >= deadline:
                    return left
                time.sleep(FETCH_POLL_S)
        finally:
            self.close()

    # --- hand-over (dispatcher thread) -------------------------------------------------

    def _deliver(self, event: Event) -> bool:
        callbacks: dict[type, Callable[[Any], None] | None] = {
            Message: self.on_message, GroupEvent: self.on_group, Receipt: self.on_receipt,
            Presence: self.on_presence, ErrorEvent: self.on_error,
        }
        callback = callbacks.get(type(event), self.on_warning)
        try:
            if callback is not None:
                callback(event)
            elif type(event) not in callbacks:
                log.warning("%s: %s", self._engine.cid, event)
        except Exception:
            log.exception("%s: the %s callback raised; the event counts as handed over",
                          self._engine.cid, type(event).__name__)
        return True
