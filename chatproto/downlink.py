"""The downlink items: what the server sends on ``u/{me}/in``, one frozen dataclass per ``kind``.

Rules (docs/PROTOCOL.md section 5):
- ``MsgItem`` (``msg``): a staged message; ``seq``, needs an ack. ``dev`` is the sending
  device; for ``type`` "olm" ``body`` is this device's ciphertext (section 9).
- ``ReceiptItem`` (``receipt``): ``sent`` (no ``seq``, not staged), or ``delivered``,
  ``seen``, ``expired`` (staged: ``seq``, needs an ack); section 6.
- ``GroupItem`` (``group``): a change of a group (section 11): ``seq``, needs an ack; its
  ``gseq`` orders it among the group's messages and other changes.
- ``PresenceItem`` (``presence``): another user's ``online`` and ``last_seen`` (section 8).
- ``ResItem`` (``res``): the one answer to a request, ``ok`` with a ``result`` or not with
  an ``error`` (section 7).
- ``ErrorItem`` (``error``): an uplink was refused; ``ref`` names the offending message or
  request id; ``devices_mismatch`` adds ``missing``, ``extra`` and ``stale`` (section 9).
Each has ``encode() -> bytes`` (what the server sends) and ``decode(payload) -> item``;
``parse_downlink`` reads any of them (what a client does with each inbox payload).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

from chatproto.errors import DecodeError, ErrorCode
from chatproto.ids import is_device_id
from chatproto.jsonwire import dumps, dumps_plain, loads_object
from chatproto.limits import MAX_DOWNLINK_BYTES

RECEIPT_SENT: Final = "sent"
RECEIPT_DELIVERED: Final = "delivered"
RECEIPT_SEEN: Final = "seen"
RECEIPT_EXPIRED: Final = "expired"
STAGED_RECEIPTS: Final = frozenset({RECEIPT_DELIVERED, RECEIPT_SEEN, RECEIPT_EXPIRED})
GROUP_CREATED: Final = "created"
GROUP_MEMBER_ADDED: Final = "member_added"
GROUP_MEMBER_REMOVED: Final = "member_removed"
GROUP_MEMBER_LEFT: Final = "member_left"
GROUP_RENAMED: Final = "renamed"
GROUP_ADMINS_CHANGED: Final = "admins_changed"
GROUP_EVENTS: Final = frozenset({GROUP_CREATED, GROUP_MEMBER_ADDED, GROUP_MEMBER_REMOVED, GROUP_MEMBER_LEFT,
                                 GROUP_RENAMED, GROUP_ADMINS_CHANGED})


class Downlink:
    """What every downlink item shares: its ``KIND`` and ``decode``; each reads its own fields."""

    __slots__ = ()
    KIND: ClassVar[str]

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """The item of this kind in ``payload``; DecodeError if it is not one."""
        return cls._from_object(_object_of_kind(payload, cls.KIND))

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class MsgItem(Downlink):
    """A message for this device. ``dev`` is the sending device (None only from a server
    older than the e2e protocol; the server always sets it). ``gseq``: a group message's place
    in its group (``to`` is then the group id; section 11), None otherwise and then not encoded."""

    KIND: ClassVar[str] = "msg"
    seq: int
    id: str
    sender: str
    to: str
    type: str
    body: str
    ts: int
    dev: str | None = None
    gseq: int | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"kind": self.KIND, "seq": self.seq, "id": self.id, "from": self.sender,
                               "to": self.to, "type": self.type, "body": self.body, "ts": self.ts}
        if self.dev is not None:
            obj["dev"] = self.dev
        if self.gseq is not None:
            obj["gseq"] = self.gseq
        return dumps_plain(obj)

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        dev = obj.get("dev")
        if dev is not None and not is_device_id(dev):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "msg 'dev' must be a device id")
        gseq = obj.get("gseq")
        if gseq is not None and (not isinstance(gseq, int) or isinstance(gseq, bool)):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "msg 'gseq' must be an integer")
        return cls(_need(obj, "seq", int), _need(obj, "id", str), _need(obj, "from", str), _need(obj, "to", str),
                   str(obj.get("type", "text")), _need(obj, "body", str), _need(obj, "ts", int), dev, gseq)


@dataclass(frozen=True, slots=True)
class ReceiptItem(Downlink):
    """``status`` of the messages ``ids`` at ``peer``; ``seq`` None for ``sent`` (not staged)."""

    KIND: ClassVar[str] = "receipt"
    status: str
    ids: tuple[str, ...]
    peer: str
    ts: int
    seq: int | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"kind": self.KIND, "status": self.status, "ids": list(self.ids), "peer": self.peer,
                               "ts": self.ts}
        if self.seq is not None:
            obj["seq"] = self.seq
        return dumps_plain(obj)

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        seq = obj.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "receipt 'seq' must be an integer")
        ids = _need(obj, "ids", list)
        return cls(_need(obj, "status", str), tuple(str(i) for i in ids), _need(obj, "peer", str),
                   _need(obj, "ts", int), seq)


@dataclass(frozen=True, slots=True)
class GroupItem(Downlink):
    """``event`` of ``group`` at ``gseq``, caused by ``by``. ``users``: the members a
    ``created``/``member_added``/``member_removed``/``member_left`` names; ``name``: with
    ``created`` and ``renamed``; ``promoted``/``demoted``: with ``admins_changed``. ``seq`` is the
    device's own (0 until the item is staged for a device)."""

    KIND: ClassVar[str] = "group"
    seq: int
    group: str
    gseq: int
    event: str
    by: str
    ts: int
    users: tuple[str, ...] = ()
    name: str | None = None
    promoted: tuple[str, ...] = ()
    demoted: tuple[str, ...] = ()

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"kind": self.KIND, "seq": self.seq, "group": self.group, "gseq": self.gseq,
                               "event": self.event, "by": self.by, "ts": self.ts}
        for key in ("users", "promoted", "demoted"):
            if getattr(self, key):
                obj[key] = list(getattr(self, key))
        if self.name is not None:
            obj["name"] = self.name
        return dumps(obj)

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        name = obj.get("name")
        if name is not None and not isinstance(name, str):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "group 'name' must be a string")
        return cls(_need(obj, "seq", int), _need(obj, "group", str), _need(obj, "gseq", int), _need(obj, "event", str),
                   _need(obj, "by", str), _need(obj, "ts", int), _str_tuple(obj, "users"), name,
                   _str_tuple(obj, "promoted"), _str_tuple(obj, "demoted"))


@dataclass(frozen=True, slots=True)
class PresenceItem(Downlink):
    KIND: ClassVar[str] = "presence"
    user: str
    online: bool | None
    last_seen: int | None

    def encode(self) -> bytes:
        return dumps({"kind": self.KIND, "user": self.user, "online": self.online, "last_seen": self.last_seen})

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        return cls(_need(obj, "user", str), obj.get("online"), obj.get("last_seen"))


@dataclass(frozen=True, slots=True)
class ResItem(Downlink):
    """The answer to request ``rid``: ``result`` if ``ok``, else ``error_code``/``error_detail``."""

    KIND: ClassVar[str] = "res"
    rid: str
    ok: bool
    result: Any
    error_code: str | None
    error_detail: str | None

    @classmethod
    def success(cls, rid: str, result: Any) -> Self:
        return cls(rid, True, result, None, None)

    @classmethod
    def failure(cls, rid: str, code: str, detail: str) -> Self:
        return cls(rid, False, None, code, detail)

    def encode(self) -> bytes:
        if self.ok:
            return dumps({"kind": self.KIND, "rid": self.rid, "ok": True, "result": self.result})
        return dumps({"kind": self.KIND, "rid": self.rid, "ok": False,
                      "error": {"code": self.error_code, "detail": self.error_detail}})

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        raw_error = obj.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        return cls(_need(obj, "rid", str), bool(obj.get("ok")), obj.get("result"), error.get("code"),
                   error.get("detail"))


@dataclass(frozen=True, slots=True)
class ErrorItem(Downlink):
    """``missing``/``extra``/``stale``: the client ids a ``devices_mismatch`` names (empty otherwise);
    ``stale``: devices whose stated identity key is not their current one (a reinstall). On the
    wire all three are present when any is not empty (a mismatch names at least one device; a
    later message refused behind it under the same code names none)."""

    KIND: ClassVar[str] = "error"
    code: str
    detail: str
    ref: str | None = None
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"kind": self.KIND, "code": self.code, "detail": self.detail}
        if self.ref is not None:
            obj["ref"] = self.ref
        if self.missing or self.extra or self.stale:
            obj.update(missing=list(self.missing), extra=list(self.extra), stale=list(self.stale))
        return dumps(obj)

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Self:
        return cls(_need(obj, "code", str), str(obj.get("detail", "")), obj.get("ref"),
                   _str_tuple(obj, "missing"), _str_tuple(obj, "extra"), _str_tuple(obj, "stale"))


DownlinkItem = MsgItem | ReceiptItem | GroupItem | PresenceItem | ResItem | ErrorItem

_BY_KIND: Final[dict[str, type[DownlinkItem]]] = {
    cls.KIND: cls for cls in (MsgItem, ReceiptItem, GroupItem, PresenceItem, ResItem, ErrorItem)
}


def parse_downlink(payload: bytes) -> DownlinkItem:
    """Read one item from ``u/{me}/in`` (used by clients); DecodeError if it is not one."""
    obj = loads_object(payload, MAX_DOWNLINK_BYTES)
    kind = obj.get("kind")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"unknown downlink kind {kind!r}")
    return cls._from_object(obj)


def _object_of_kind(payload: bytes, kind: str) -> dict[str, Any]:
    obj = loads_object(payload, MAX_DOWNLINK_BYTES)
    if obj.get("kind") != kind:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"not a {kind!r} item: kind is {obj.get('kind')!r}")
    return obj


def _need(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"downlink item field {key!r} missing or of the wrong type")
    return value


def _str_tuple(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"downlink item field {key!r} must be a list of strings")
    return tuple(value)
