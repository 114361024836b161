"""End-to-end encryption for one device: its Olm account, its sessions with peer
devices, the device-list cache, and the steps the engine calls.

Who calls what (threads of the engine):
- the outbox thread: ``sync_keys`` (publish/top up keys; after each connect and
  after a peer used up a one-time key) and ``bodies_for`` (encrypt a message for
  every required device, claiming keys and making sessions as needed);
- paho's thread: ``on_mismatch`` (a ``devices_mismatch`` refusal, which also
  names devices reinstalled since the message was encrypted: ``stale``);
- the dispatcher thread: ``open_message`` (decrypt a staged message and replace
  its inbox row with the opened form, in one transaction with the session
  update, so a crash never loses a message whose keys were already used);
- app threads: ``fingerprint``, ``safety_number``.

Network requests go through ``call`` (blocking, raises ``RequestError``/
``RequestTimeout``) and are never made while holding ``_lock``, which guards
the account and the sessions (vodozemac objects are not thread-safe).

What goes inside each ciphertext (checked on decrypt, as Matrix does, so a
ciphertext cannot be passed off as another message, sender or recipient):
``{"v","id","to","type","body","sender","sender_device","sender_ed25519",
"recipient","recipient_ed25519"}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from chatproto import (
    OP_KEYS_CLAIM,
    OP_KEYS_COUNT,
    OP_KEYS_LIST,
    OP_KEYS_PUBLISH,
    ErrorCode,
    MsgItem,
    client_id,
    preview_key_object,
    split_client_id,
)
from client_sdk import keys as K
from client_sdk import preview as P
from client_sdk.crypto import PRE_KEY, Account, Ciphertext, CryptoError, Session, verify
from client_sdk.errors import RequestError, StoreError, UnknownDevice
from client_sdk.events import Event, IdentityChanged
from client_sdk.inbox import opened_row, stored_event, undecryptable_row
from client_sdk.localstore import DeviceRecord, LocalStore, OutMessage, SessionRecord

log = logging.getLogger(__name__)

Call = Callable[[str, dict[str, Any]], Any]
"""Run a request and return its result (blocking); raises RequestError / RequestTimeout."""

PAYLOAD_VERSION: Final = 1
BAD_KEYS: Final = "bad_keys"
"""ErrorEvent code: a required device's keys did not verify, so the message was not sent."""


class SendRefused(Exception):
    """The message cannot be encrypted for its recipients; report ``code`` and drop it."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Sealed:
    """A message encrypted for its devices: ``bodies`` (client id -> ciphertext) and ``keys``
    (client id -> the Curve25519 identity key each was encrypted to; the server refuses a
    replaced one as ``stale``). Kept in the outbox so that a re-send is identical."""

    bodies: dict[str, str]
    keys: dict[str, str] | None
    """None only for a message sealed by an SDK older than ``keys`` (sent without them)."""
    previews: dict[str, str] | None = None
    """Push previews for the recipient's devices that have a preview key (``preview``)."""

    def to_json(self) -> str:
        return json.dumps({"bodies": self.bodies, "keys": self.keys, "previews": self.previews})

    @classmethod
    def from_json(cls, text: str) -> Sealed:
        obj = json.loads(text)
        if isinstance(obj.get("bodies"), dict):  # a client id always has a dot: never "bodies"
            return cls(dict(obj["bodies"]), dict(obj["keys"]) if isinstance(obj.get("keys"), dict) else None,
                       dict(obj["previews"]) if isinstance(obj.get("previews"), dict) else None)
        return cls(dict(obj), None)  # the older form: the bodies alone


def now_ms() -> int:
    return int(time.time() * 1000)


class E2E:
    """The crypto state of ``user.device``, kept in ``store`` (pickles sealed with ``pickle_key``)."""

    def __init__(self, store: LocalStore, user: str, device: str, pickle_key: bytes, call: Call,
                 warn: Callable[[Event], None]) -> None:
        self._store, self.user, self.device = store, user, device
        self._key = pickle_key
        self._call = call
        self._warn = warn
        self._lock = threading.RLock()
        self.keys_wanted = threading.Event()
        """Set when this device should check its one-time keys on the server (the engine clears it)."""
        pickle = store.olm_account()
        if pickle is None:
            self._account = Account()
            store.set_olm_account(self._account.pickle(self._key))
        else:
            try:
                self._account = Account.from_pickle(pickle, self._key)
            except CryptoError as exc:
                raise StoreError(f"the Olm account in the store does not open: {exc}") from exc

    @property
    def ed25519(self) -> str:
        return self._account.ed25519

    @property
    def curve25519(self) -> str:
        return self._account.curve25519

    def _save_account(self) -> None:
        self._store.set_olm_account(self._account.pickle(self._key))

    # --- this device's keys --------------------------------------------------------------

    def sync_keys(self) -> None:
        """Publish this device's keys and top up its one-time keys (rule 4 of ``keys``). Blocking."""
        with self._lock:
            first = self._store.get_meta("keys_published") != self._account.curve25519
        if first:
            # Not counted: after a reinstall under this device id the server still holds the old
            # install's one-time and fallback keys, which this publish drops. Counting them would
            # leave this install with none. Zero is safe: nothing of this account was ever marked
            # published, so whatever of it the server may hold is still unpublished here.
            on_server, has_fallback = 0, False
        else:
            count = self._call(OP_KEYS_COUNT, {})
            on_server = int(count.get("one_time_keys", 0)) if isinstance(count, dict) else 0
            has_fallback = bool(count.get("fallback_key")) if isinstance(count, dict) else False
        with self._lock:
            unpublished = len(self._account.unpublished_one_time_keys())
            self._account.generate_one_time_keys(
                K.keys_to_generate(on_server, unpublished, self._account.max_one_time_keys))
            if not has_fallback and self._account.unpublished_fallback_key() is None:
                self._account.generate_fallback_key()
            one_time = self._account.unpublished_one_time_keys()
            fallback = self._account.unpublished_fallback_key()
            device_keys = self._account.device_keys(self.user, self.device)
            self._save_account()
        if not first and not one_time and fallback is None:
            return
        self._call(OP_KEYS_PUBLISH, K.publish_args(device_keys, one_time, fallback))
        with self._lock:
            self._account.mark_published()
            with self._store.transaction():
                self._save_account()
                self._store.set_meta("keys_published", self._account.curve25519)
        log.info("%s.%s: published keys (%d one-time, fallback %s)", self.user, self.device, len(one_time),
                 fallback is not None)

    # --- device lists --------------------------------------------------------------------

    def refresh(self, user: str) -> K.ListedDevices:
        """Fetch ``user``'s device list, apply it to the cache (rule 3); the trusted and refused devices."""
        result = self._call(OP_KEYS_LIST, {"user": user})
        listed = K.read_device_list(user, result)
        for device in listed.refused:
            log.warning("%s: refusing the keys of %s.%s: the signature does not verify", self.user, user, device)
        warnings: list[IdentityChanged] = []
        with self._lock, self._store.transaction():
            cached = self._store.devices_of(user)
            diff = K.diff_devices(cached, listed.devices)
            for record in diff.added:
                self._store.put_device(record)
            for device in diff.removed:
                self._store.forget_device(user, device)
            for old, new in diff.changed:
                self._store.forget_device(user, new.device)
                self._store.put_device(new)
                warnings.append(IdentityChanged(user, new.device, K.fingerprint(old.ed25519),
                                                K.fingerprint(new.ed25519)))
            self._store.set_list_fresh(user, True)
            P.set_peer_keys(self._store, user, K.read_preview_keys(user, result, listed.devices))
        for warning in warnings:
            log.warning("%s: the identity key of %s.%s changed", self.user, warning.user, warning.device)
            self._warn(warning)
        return listed

    def devices(self, user: str, refresh: bool = False) -> K.ListedDevices:
        """The trusted devices of ``user`` (fetched when not known or marked stale) and, if
        fetched now, the ones refused."""
        if refresh or not self._store.list_is_fresh(user):
            return self.refresh(user)
        return K.ListedDevices(self._store.devices_of(user), ())

    def on_mismatch(self, msg_id: str, missing: tuple[str, ...], extra: tuple[str, ...],
                    stale: tuple[str, ...] = ()) -> None:
        """The server's device set differs, or a device was reinstalled (``stale``): refetch the
        lists it names and encrypt the message again.

        A stale device's new identity key shows up in the refetched list as an identity
        change: ``refresh`` warns (``IdentityChanged``) and drops the old install's
        sessions, and ``bodies_for`` claims a one-time key for a new session. Queued messages
        to the same users are sealed again as well. Nothing is dropped here (paho's thread):
        an encryption running now must not find the device without sessions while its cached
        keys are still the old ones."""
        users = {parts[0] for parts in map(split_client_id, missing + extra + stale) if parts is not None}
        for user in users:
            self._store.set_list_fresh(user, False)
        self._store.set_outbox_bodies(msg_id, None)
        # The messages queued behind this one were sealed for the same stale set: the server holds
        # them and would refuse each in turn. Seal them again too (one refusal heals the queue).
        self._store.reseal_outbox(users, self.user)

    def on_no_keys(self, msg_id: str, to: str | None) -> None:
        """The server says ``to`` has no device with keys (its devices were removed since the list was
        fetched): fetch the list again and seal the message anew at the next try."""
        if to is not None:
            self._store.set_list_fresh(to, False)
        self._store.set_outbox_bodies(msg_id, None)

    # --- sending -------------------------------------------------------------------------

    def bodies_for(self, message: OutMessage) -> Sealed:
        """The message sealed for every required device (made once and kept in the outbox,
        so a re-send is identical).

        Raises SendRefused (code ``no_keys``: no device of the recipient has keys yet, the
        engine holds the message; ``bad_keys``: a required device's keys do not verify),
        RequestError or RequestTimeout (retry later).
        """
        kept = self._store.outbox_bodies(message.id)
        if kept is not None:
            return Sealed.from_json(kept)
        targets: list[DeviceRecord] = []
        for user in dict.fromkeys((message.to, self.user)):
            found = self.devices(user)
            if found.refused:
                raise SendRefused(BAD_KEYS, f"the keys of {', '.join(f'{user}.{d}' for d in found.refused)} "
                                            "do not verify; not sending to a device that cannot be trusted")
            targets.extend(r for r in found.devices.values() if (r.user, r.device) != (self.user, self.device))
        if not any(r.user == message.to for r in targets):
            self._store.set_list_fresh(message.to, False)  # ask the server again at the next try
            raise SendRefused(ErrorCode.NO_KEYS, f"{message.to} has no device with published keys")
        self._claim_sessions([r for r in targets if not self._store.sessions_of(r.user, r.device)])
        bodies: dict[str, str] = {}
        keys: dict[str, str] = {}
        with self._lock, self._store.transaction():
            for record in targets:
                saved = self._store.sessions_of(record.user, record.device)
                if not saved or self._store.devices_of(record.user).get(record.device) != record:
                    # No key to be had, or its keys changed meanwhile (and its sessions went with
                    # them): the server names it missing, and the lists are fetched again.
                    continue
                session = Session.from_pickle(saved[0].pickle, self._key)
                plaintext = self._payload(message, record)
                cid = client_id(record.user, record.device)
                bodies[cid] = session.encrypt(plaintext, self.curve25519).to_wire()
                keys[cid] = record.curve25519
                self._store.put_session(SessionRecord(record.user, record.device, session.id,
                                                      session.pickle(self._key)), now_ms())
            sealed = Sealed(bodies, keys, self._previews(message, bodies) or None)
            self._store.set_outbox_bodies(message.id, sealed.to_json())
        return sealed

    def _previews(self, message: OutMessage, bodies: dict[str, str]) -> dict[str, str]:
        """A push preview for each device of the recipient that has a trusted preview key (``preview``
        rule 2): the app's text, by default the body of a ``text`` message (docs/SDK.md)."""
        text = message.preview if message.preview is not None else message.body if message.type == "text" else ""
        if not text or message.to == self.user:
            return {}
        previews: dict[str, str] = {}
        for device, key in P.peer_keys(self._store, message.to).items():
            cid = client_id(message.to, device)
            if cid in bodies:
                try:
                    previews[cid] = P.seal(key, cid, message.id, self.user, self.device, text, self._account.sign)
                except ValueError:  # not an X25519 key, though signed: no preview for that device
                    log.warning("%s: the preview key of %s is not usable", self.user, cid)
        return previews

    def preview_registration(self) -> dict[str, str]:
        """``preview_key`` and ``preview_sig`` for ``push.register`` (``preview`` rule 1)."""
        key = P.public_key(P.own_key(self._store))
        with self._lock:
            signed = self._account.sign(preview_key_object(self.user, self.device, key))
        return {"preview_key": key, "preview_sig": signed["signature"]}

    def decrypt_preview(self, payload: Any) -> P.PushPreview | None:
        """The preview in a wake-up's payload, opened and checked (``preview`` rule 5), or None."""
        preview = P.payload_preview(payload)
        if preview is None or self._store.get_meta(P.META) is None:
            return None
        inner = P.open_inner(P.own_key(self._store), client_id(self.user, self.device), preview)
        if inner is None:
            return None
        record = self._store.devices_of(inner["from"]).get(inner["dev"])
        if record is not None and not verify(inner, record.ed25519):
            log.warning("%s: a push preview claiming %s.%s is not signed by it: dropped", self.user, inner["from"],
                        inner["dev"])
            return None
        return P.PushPreview(inner["text"], inner["id"], inner["from"], inner["dev"], record is not None)

    def _payload(self, message: OutMessage, record: DeviceRecord) -> bytes:
        return json.dumps({
            "v": PAYLOAD_VERSION, "id": message.id, "to": message.to, "type": message.type, "body": message.body,
            "sender": self.user, "sender_device": self.device, "sender_ed25519": self.ed25519,
            "recipient": record.user, "recipient_ed25519": record.ed25519,
        }, ensure_ascii=False).encode("utf-8", "surrogatepass")

    def _claim_sessions(self, records: list[DeviceRecord]) -> None:
        by_user: dict[str, dict[str, DeviceRecord]] = {}
        for record in records:
            by_user.setdefault(record.user, {})[record.device] = record
        for user, wanted in by_user.items():
            result = self._call(OP_KEYS_CLAIM, {"user": user, "devices": sorted(wanted)})
            claimed = result.get("devices") if isinstance(result, dict) else None
            for device, record in wanted.items():
                offered = claimed.get(device) if isinstance(claimed, dict) else None
                if offered is None:
                    continue
                key = K.check_claimed_key(record, offered)
                if key is None:
                    raise SendRefused(BAD_KEYS, f"the one-time key of {user}.{device} does not verify; refused")
                with self._lock:
                    if self._store.devices_of(user).get(device) != record:
                        continue  # replaced meanwhile (a reinstall): a session with the old keys is no use
                    session = self._account.outbound(record.curve25519, key)
                    self._store.put_session(SessionRecord(user, device, session.id, session.pickle(self._key)),
                                            now_ms())

    # --- receiving -----------------------------------------------------------------------

    def open_message(self, seq: int, item: MsgItem) -> Event:
        """Decrypt a staged olm message; its inbox row becomes the opened (or undecryptable) form
        in the same transaction as the session and account updates."""
        message: Ciphertext | None = None
        record: DeviceRecord | None = None
        reason = "the server did not say which device sent it"
        if item.dev is not None:
            try:
                message = Ciphertext.from_wire(item.body)
            except CryptoError as exc:
                reason = str(exc)
            else:
                record = self._sender(item.sender, item.dev, message.sender_key if message.type == PRE_KEY else None)
                reason = f"{item.sender}.{item.dev} is not a device with published keys"
        try:
            with self._lock, self._store.transaction():
                payload: dict[str, Any] | None = None
                if message is not None and record is not None:
                    reason, payload = self._decrypt(item, record, message)
                row = opened_row(seq, item, payload) if payload is not None else undecryptable_row(seq, item, reason)
                self._store.restage(row)
        except BaseException:
            with self._lock:  # the account may have used a one-time key the store still has
                pickle = self._store.olm_account()
                if pickle is not None:
                    self._account = Account.from_pickle(pickle, self._key)
            raise
        event = stored_event(row)
        assert event is not None  # an opened or undecryptable row, never a wire row
        return event

    def _decrypt(self, item: MsgItem, record: DeviceRecord, message: Ciphertext) -> tuple[str, dict[str, Any] | None]:
        """Under the lock, in the caller's transaction: decrypt, keep the session, check the payload."""
        opened = self._with_sessions(record, message)
        if opened is None and message.type == PRE_KEY:
            if message.sender_key != record.curve25519:
                return "the sender's identity key is not the one its device published", None
            try:
                opened = self._account.inbound(message)
            except CryptoError as exc:
                return f"no session for it ({exc})", None
            self._save_account()
            self.keys_wanted.set()  # a one-time key was used up: top up
        if opened is None:
            return "no session with the sending device decrypts it", None
        session, plaintext = opened
        self._store.put_session(SessionRecord(record.user, record.device, session.id, session.pickle(self._key)),
                                now_ms())
        return self._check(item, record, plaintext)

    def _with_sessions(self, record: DeviceRecord, message: Ciphertext) -> tuple[Session, bytes] | None:
        for saved in self._store.sessions_of(record.user, record.device):
            session = Session.from_pickle(saved.pickle, self._key)
            if message.type == PRE_KEY and not session.matches(message):
                continue
            try:
                return session, session.decrypt(message)
            except CryptoError:
                continue
        return None

    def _sender(self, user: str, device: str, curve25519: str | None) -> DeviceRecord | None:
        record = self._store.devices_of(user).get(device)
        if record is None or (curve25519 is not None and record.curve25519 != curve25519):
            try:
                record = self.refresh(user).devices.get(device)
            except RequestError as exc:  # refused: decide with what is cached
                log.warning("%s: cannot fetch the devices of %s: %s", self.user, user, exc)
            # A timeout or a close propagates: the item stays stored and is opened at the next hand-over,
            # rather than being marked undecryptable for good.
        return record

    def _check(self, item: MsgItem, record: DeviceRecord, plaintext: bytes) -> tuple[str, dict[str, Any] | None]:
        try:
            payload = json.loads(plaintext.decode("utf-8", "surrogatepass"))
        except ValueError:
            return "the decrypted payload is not JSON", None
        expected = {
            "id": item.id, "to": item.to, "sender": item.sender, "sender_device": item.dev,
            "sender_ed25519": record.ed25519, "recipient": self.user, "recipient_ed25519": self.ed25519,
        }
        if not isinstance(payload, dict):
            return "the decrypted payload is not an object", None
        wrong = sorted(k for k, v in expected.items() if payload.get(k) != v)
        if wrong:
            return f"the encrypted payload does not match the envelope ({', '.join(wrong)})", None
        if not isinstance(payload.get("body"), str) or not isinstance(payload.get("type"), str):
            return "the decrypted payload has no body or type", None
        return "", payload

    # --- verification ------------------------------------------------------------------

    def fingerprint(self, user: str | None = None, device: str | None = None) -> str:
        """This device's fingerprint, or that of ``user``'s ``device`` as trusted here."""
        if user is None or (user, device) == (self.user, self.device):
            return K.fingerprint(self.ed25519)
        record = self._store.devices_of(user).get(device or "") if device else None
        if record is None:
            record = self.devices(user, refresh=True).devices.get(device or "")
        if record is None:
            raise UnknownDevice(f"{user}.{device} has no published keys")
        return K.fingerprint(record.ed25519)

    def safety_number(self, peer: str) -> str:
        """The safety number of this user and ``peer`` over all devices' keys (see ``keys.safety_number``)."""
        mine = [r.ed25519 for r in self.devices(self.user, refresh=True).devices.values() if r.device != self.device]
        theirs = [r.ed25519 for r in self.devices(peer, refresh=True).devices.values()]
        if not theirs:
            raise UnknownDevice(f"{peer} has no device with published keys")
        return K.safety_number(self.user, [self.ed25519, *mine], peer, theirs)
