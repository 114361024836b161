"""The uplink items: what a device publishes, one frozen dataclass per topic.

Rules (docs/PROTOCOL.md):
- ``ChatMessage`` on ``u/{me}/out`` (section 4; encrypted form: section 9): an ``id``,
  a ``to``, exactly one of ``body`` and ``bodies``; ``from`` is added by the server.
  ``previews`` (with ``bodies`` only, section 12): client ids of ``bodies`` -> a push preview
  encrypted for that device, base64url, at most ``MAX_PREVIEW_CHARS``.
- ``Ack`` on ``u/{me}/ack`` (section 6 rule 4): ``{"seqs":[...]}``, 1-1000 positive ints.
- ``Seen`` on ``u/{me}/seen`` (section 6 rule 6): ``{"to":user,"ids":[...]}``, 1-1000 ids.
- ``Heartbeat`` on ``u/{me}/hb`` (section 8, "Online and last seen"): ``{}`` or
  ``{"state":"away"}``.
- ``Request`` on ``u/{me}/req`` (section 7): ``{"rid","op","args"}``, answered by one ``res``.
Each has ``encode() -> bytes`` (what the SDK publishes) and ``decode(payload) -> item``
(what the server reads), which raises ``DecodeError`` naming the fault and, once it is
known, the ``ref`` (message id, request id) to answer with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Self

from chatproto.errors import DecodeError, ErrorCode
from chatproto.ids import (
    MESSAGE_ID_RE,
    OP_RE,
    PREVIEW_RE,
    PUBLIC_KEY_RE,
    REQUEST_ID_RE,
    TYPE_RE,
    is_group_id,
    is_user_id,
    split_client_id,
)
from chatproto.jsonwire import dumps, loads_object
from chatproto.limits import (
    DEFAULT_MAX_DEVICES_PER_MESSAGE,
    MAX_ACK_BYTES,
    MAX_HEARTBEAT_BYTES,
    MAX_IDS_PER_ITEM,
    MAX_PREVIEW_CHARS,
    MAX_SEEN_BYTES,
    chat_envelope_bytes,
)

MESSAGE_FIELDS: Final = frozenset({"id", "to", "body", "bodies", "keys", "previews", "type", "ts"})
OLM_TYPE: Final = "olm"
"""``type`` of an end-to-end encrypted message: uplink with ``bodies``, downlink ``body`` = this device's ciphertext."""
MEGOLM_TYPE: Final = "megolm"
"""``type`` of an end-to-end encrypted group message: ``body`` is one Megolm ciphertext for every member."""
HB_ACTIVE: Final = "active"
HB_AWAY: Final = "away"


# --- chat messages (u/{me}/out) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A message as the sender published it (``from`` is added by the server).

    Exactly one of two forms: plain ``body``, or ``bodies`` (client id
    ``user.device`` -> that device's ciphertext, ``type`` "olm") with ``body`` "".
    ``keys`` (olm only, optional on the wire): client id -> the Curve25519 identity
    key that device's ciphertext was encrypted to, for exactly the ids of ``bodies``;
    the server refuses a message whose key for a device is not its current one.
    ``previews`` (olm only, optional): client id (some of ``bodies``) -> an encrypted push preview.
    """

    id: str
    to: str
    body: str
    type: str = "text"
    ts: int | None = None
    bodies: dict[str, str] | None = None
    keys: dict[str, str] | None = None
    previews: dict[str, str] | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "to": self.to, "type": self.type}
        if self.bodies is not None:
            obj["bodies"] = self.bodies
            if self.keys is not None:
                obj["keys"] = self.keys
            if self.previews:
                obj["previews"] = self.previews
        else:
            obj["body"] = self.body
        if self.ts is not None:
            obj["ts"] = self.ts
        return dumps(obj)

    @classmethod
    def decode(cls, payload: bytes, max_body_bytes: int, max_devices: int = DEFAULT_MAX_DEVICES_PER_MESSAGE) -> Self:
        """Validate an uplink chat message; DecodeError.ref is the message id once known."""
        # The envelope may exceed the body limit by a little (fields, escaping).
        obj = loads_object(payload, chat_envelope_bytes(max_body_bytes), ("id", MESSAGE_ID_RE))
        msg_id = obj.get("id")
        if not isinstance(msg_id, str) or MESSAGE_ID_RE.fullmatch(msg_id) is None:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'id' must be a string of 1-64 of [A-Za-z0-9_-]")
        unknown = set(obj) - MESSAGE_FIELDS
        if unknown:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, f"unknown field(s): {', '.join(sorted(unknown))}", msg_id)
        to = obj.get("to")
        if not isinstance(to, str) or not (is_user_id(to) or is_group_id(to)):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'to' must be a user id or a group id 'g:...'", msg_id)
        if ("body" in obj) == ("bodies" in obj):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "a message has exactly one of 'body' and 'bodies'", msg_id)
        bodies: dict[str, str] | None = None
        body = obj.get("body", "")
        if "bodies" in obj:
            if is_group_id(to):  # a group message is one ciphertext for all (Megolm): 'body'
                raise DecodeError(ErrorCode.BAD_ENVELOPE, "a group message has a 'body', not 'bodies'", msg_id)
            bodies = _bodies(obj["bodies"], max_body_bytes, max_devices, msg_id)
        elif not isinstance(body, str):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'body' must be a string", msg_id)
        else:
            _body_size(body, max_body_bytes, msg_id, "body")
        kind = obj.get("type", OLM_TYPE if bodies is not None else "text")
        if not isinstance(kind, str) or TYPE_RE.fullmatch(kind) is None:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'type' must be 1-32 of [a-z0-9_.-]", msg_id)
        if (kind == OLM_TYPE) != (bodies is not None):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'bodies' goes with type 'olm', and type 'olm' with 'bodies'",
                              msg_id)
        ts = obj.get("ts")
        if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool) or ts < 0):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'ts' must be a non-negative integer (ms)", msg_id)
        keys = _keys(obj["keys"], bodies, msg_id) if "keys" in obj else None
        previews = _previews(obj["previews"], bodies, msg_id) if "previews" in obj else None
        return cls(msg_id, to, body, kind, ts, bodies, keys, previews)


def _body_size(body: str, max_body_bytes: int, msg_id: str, what: str) -> None:
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_body_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"{what} is {size} bytes, limit is {max_body_bytes}", msg_id)


def _bodies(value: object, max_body_bytes: int, max_devices: int, msg_id: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'bodies' must be an object of client id -> ciphertext", msg_id)
    if len(value) > max_devices:
        raise DecodeError(ErrorCode.TOO_LARGE, f"'bodies' has {len(value)} devices, limit is {max_devices}", msg_id)
    for key, body in value.items():
        # An empty ciphertext cannot be an Olm message (found by tests/test_fuzz_e2e.py): refused, not staged.
        if split_client_id(key) is None or not isinstance(body, str) or not body:
            raise DecodeError(ErrorCode.BAD_ENVELOPE,
                              "'bodies' keys must be client ids 'user.device' and values non-empty strings", msg_id)
        _body_size(body, max_body_bytes, msg_id, f"ciphertext for {key}")
    return dict(value)


def _keys(value: object, bodies: dict[str, str] | None, msg_id: str) -> dict[str, str]:
    if bodies is None:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'keys' goes with 'bodies' only", msg_id)
    if (not isinstance(value, dict) or set(value) != set(bodies)
            or not all(isinstance(k, str) and PUBLIC_KEY_RE.fullmatch(k) for k in value.values())):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'keys' must map exactly the client ids of 'bodies' to "
                                                  "Curve25519 keys (base64, 1-256 characters)", msg_id)
    return dict(value)


def _previews(value: object, bodies: dict[str, str] | None, msg_id: str) -> dict[str, str]:
    if bodies is None:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'previews' goes with 'bodies' only", msg_id)
    if (not isinstance(value, dict) or not set(value) <= set(bodies)
            or not all(isinstance(v, str) and PREVIEW_RE.fullmatch(v) for v in value.values())):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'previews' must map client ids of 'bodies' to push previews "
                                                  "(non-empty base64url)", msg_id)
    for key, preview in value.items():
        if len(preview) > MAX_PREVIEW_CHARS:
            raise DecodeError(ErrorCode.TOO_LARGE, f"preview for {key} is {len(preview)} characters, "
                                                   f"limit is {MAX_PREVIEW_CHARS}", msg_id)
    return dict(value)


# --- acks, seen reports, heartbeats ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"seqs":[17,18]}``: the device has stored the items with these seqs."""

    seqs: tuple[int, ...]

    def encode(self) -> bytes:
        return dumps({"seqs": list(self.seqs)})

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        obj = loads_object(payload, MAX_ACK_BYTES)
        if len(obj) != 1 or "seqs" not in obj:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "an ack is exactly {\"seqs\": [...]}")
        seqs = obj["seqs"]
        if (
            not isinstance(seqs, list) or not seqs or len(seqs) > MAX_IDS_PER_ITEM
            or not all(type(v) is int and v > 0 for v in seqs)  # type(): not a bool, and one check (hot)
        ):
            raise DecodeError(ErrorCode.BAD_ENVELOPE,
                              f"'seqs' must be a list of 1-{MAX_IDS_PER_ITEM} positive integers")
        return cls(tuple(seqs))


@dataclass(frozen=True, slots=True)
class Seen:
    """``{"to":"alice","ids":["m1"]}``: the user displayed these messages from ``to`` (a user, or a
    group id: messages of that group, section 11)."""

    to: str
    ids: tuple[str, ...]

    def encode(self) -> bytes:
        return dumps({"to": self.to, "ids": list(self.ids)})

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        obj = loads_object(payload, MAX_SEEN_BYTES)
        if set(obj) != {"to", "ids"}:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "a seen report is exactly {\"to\": user, \"ids\": [...]}")
        to = obj["to"]
        if not is_user_id(to) and not is_group_id(to):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'to' must be a user id or a group id")
        ids = obj["ids"]
        if (
            not isinstance(ids, list) or not ids or len(ids) > MAX_IDS_PER_ITEM
            or not all(isinstance(v, str) and MESSAGE_ID_RE.fullmatch(v) for v in ids)
        ):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'ids' must be a list of 1-{MAX_IDS_PER_ITEM} message ids")
        return cls(to, tuple(ids))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """``{}`` (in the foreground) or ``{"state":"away"}`` (going to the background)."""

    away: bool = False

    def encode(self) -> bytes:
        return dumps({"state": HB_AWAY} if self.away else {})

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        obj = loads_object(payload, MAX_HEARTBEAT_BYTES)
        state = obj.get("state", HB_ACTIVE)
        if set(obj) - {"state"} or state not in (HB_ACTIVE, HB_AWAY):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "a heartbeat is {} or {\"state\":\"away\"}")
        return cls(state == HB_AWAY)


# --- requests (u/{me}/req) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    rid: str
    op: str
    args: dict[str, Any]

    def encode(self) -> bytes:
        return dumps({"rid": self.rid, "op": self.op, "args": self.args})

    @classmethod
    def decode(cls, payload: bytes, max_bytes: int) -> Self:
        """Read ``{"rid":..,"op":..,"args":{..}}``; raises DecodeError naming the fault."""
        obj = loads_object(payload, max_bytes, ("rid", REQUEST_ID_RE))
        rid = obj.get("rid")
        if not isinstance(rid, str) or REQUEST_ID_RE.fullmatch(rid) is None:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'rid' must be a string of 1-64 of [A-Za-z0-9_.:-]")
        op = obj.get("op")
        if not isinstance(op, str) or OP_RE.fullmatch(op) is None:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'op' must be a lower-case operation name", ref=rid)
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "'args' must be a JSON object", ref=rid)
        unknown = set(obj) - {"rid", "op", "args"}
        if unknown:
            raise DecodeError(ErrorCode.BAD_ENVELOPE, f"unknown field(s): {', '.join(sorted(unknown))}", ref=rid)
        return cls(rid=rid, op=op, args=args)
