"""Wire protocol v1: identities, topics, and the JSON items both sides exchange.

Pure and stdlib-only, imported by the server (``bridge``, ``broker``) and by the
SDK, so that the two can never disagree about a field. Nothing here does I/O.

Rules (see docs/PROTOCOL.md):
- user id ``^[a-z0-9_]{1,32}$``, device id ``^[A-Za-z0-9_-]{1,32}$``,
  MQTT client id ``{user}.{device}``.
- a device subscribes to ``u/{me}/in`` only and publishes to the five uplink
  topics ``u/{me}/{out,ack,seen,hb,req}`` only.
- every downlink item is a JSON object with a ``kind``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

PROTOCOL_VERSION: Final = 1

USER_RE: Final = re.compile(r"[a-z0-9_]{1,32}")
DEVICE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
MESSAGE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
OP_RE: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")

MAX_JSON_DEPTH: Final = 32  # deepest nesting of arrays/objects accepted in a payload

TOPIC_PREFIX: Final = "u/"
DOWNLINK: Final = "in"
UPLINKS: Final = frozenset({"out", "ack", "seen", "hb", "req"})


class ErrorCode:
    """The ``code`` values of ``error`` items and failed ``res`` items."""

    BAD_JSON: Final = "bad_json"
    BAD_ENVELOPE: Final = "bad_envelope"
    TOO_LARGE: Final = "too_large"
    FORBIDDEN: Final = "forbidden"
    UNKNOWN_RECIPIENT: Final = "unknown_recipient"
    QUEUE_FULL: Final = "queue_full"
    RATE_LIMITED: Final = "rate_limited"
    INTERNAL: Final = "internal"
    UNKNOWN_OP: Final = "unknown_op"
    UNSUPPORTED: Final = "unsupported"
    DEVICES_MISMATCH: Final = "devices_mismatch"
    NO_KEYS: Final = "no_keys"
    ENCRYPTION_REQUIRED: Final = "encryption_required"


# --- identities -----------------------------------------------------------


def is_user_id(value: object) -> bool:
    return isinstance(value, str) and USER_RE.fullmatch(value) is not None


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None


def client_id(user: str, device: str) -> str:
    return f"{user}.{device}"


@dataclass(frozen=True, slots=True)
class Caller:
    """A logged-in chat device: the broker names it, the bridge acts for it."""

    user: str
    device: str

    @property
    def client_id(self) -> str:
        return client_id(self.user, self.device)


def split_client_id(value: str) -> tuple[str, str] | None:
    """``"alice.phone"`` -> ``("alice", "phone")``; None unless both parts are valid."""
    user, dot, device = value.partition(".")
    if not dot or not is_user_id(user) or not is_device_id(device):
        return None
    return user, device


# --- topics ----------------------------------------------------------------


def inbox_topic(user: str) -> str:
    return f"{TOPIC_PREFIX}{user}/{DOWNLINK}"


def uplink_topic(user: str, kind: str) -> str:
    return f"{TOPIC_PREFIX}{user}/{kind}"


def is_chat_topic(topic: str) -> bool:
    """Topics under ``u/`` belong to the chat protocol, whatever follows."""
    return topic.startswith(TOPIC_PREFIX)


def uplink_kind(user: str, topic: str) -> str | None:
    """The uplink kind (``out``, ``ack``, ...) if ``user`` may publish to ``topic``."""
    prefix = f"{TOPIC_PREFIX}{user}/"
    if not topic.startswith(prefix):
        return None
    kind = topic[len(prefix):]
    return kind if kind in UPLINKS else None


def may_subscribe(user: str, topic_filter: str) -> bool:
    """A device may subscribe to its own inbox and to nothing else under ``u/``."""
    return topic_filter == inbox_topic(user)


# --- JSON helpers ------------------------------------------------------------


class DecodeError(ValueError):
    """A payload could not be read; ``code`` is the error code to answer with."""

    def __init__(self, code: str, detail: str, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses to infinity, which JSON cannot carry back out
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# A \uXXXX escape of a UTF-16 surrogate (D800-DFFF): the only way JSON text can carry one.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


def loads_object(payload: bytes, max_bytes: int, ref: tuple[str, re.Pattern[str]] | None = None) -> dict[str, Any]:
    """Parse a JSON object, refusing oversized, non-UTF-8, NaN and non-object input.

    ``ref``: the id field (and its pattern) to name in a refusal once the JSON is read."""
    if len(payload) > max_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes, limit is {max_bytes}")
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(ErrorCode.BAD_JSON, f"payload is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DecodeError(ErrorCode.BAD_JSON, "payload must be a JSON object")
    # Fuzzing found that whether deep nesting parses depended on the interpreter's
    # recursion limit (raised by test tools, debuggers): refuse it explicitly.
    if _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise DecodeError(ErrorCode.BAD_JSON, f"payload is nested deeper than {MAX_JSON_DEPTH} levels")
    # A lone surrogate escape ("\\ud800") is valid JSON but no text: it cannot be UTF-8, so
    # storing it failed later, far from its sender (it once stopped the staging flush).
    # Refused here, in any string or key; a pair is one character and passes.
    if _SURROGATE_ESCAPE.search(payload) is not None and not _is_text(value):
        field, pattern = ref if ref is not None else ("", None)
        rid = value.get(field)
        readable = isinstance(rid, str) and pattern is not None and pattern.fullmatch(rid) is not None
        raise DecodeError(ErrorCode.BAD_JSON, "payload holds a lone surrogate (\\udXXX), which is not UTF-8 text",
                          rid if readable else None)
    return value


def _is_text(value: dict[str, Any]) -> bool:
    """True if every string and key in ``value`` can be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nested_deeper_than(value: dict[str, Any], limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]  # containers only, with their depth
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def dumps(item: dict[str, Any]) -> bytes:
    """Compact, UTF-8 JSON; the one encoder for every item on the wire."""
    # "backslashreplace": a lone surrogate (valid as a JSON escape in client input,
    # e.g. "\ud800" in a body or an echoed id) cannot be encoded as UTF-8 and used
    # to turn the answer into an "internal" error (found by fuzzing); it becomes
    # the same \udxxx escape again, so the item stays valid UTF-8 JSON. Uplinks
    # holding one are refused now (loads_object): this guards what is built here.
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")


# --- requests (u/{me}/req) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    rid: str
    op: str
    args: dict[str, Any]


def parse_request(payload: bytes, max_bytes: int) -> Request:
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
    return Request(rid=rid, op=op, args=args)


# --- downlink items ----------------------------------------------------------


def error_item(code: str, detail: str, ref: str | None = None, **fields: Any) -> dict[str, Any]:
    """An ``error`` item; ``fields`` adds code-specific fields (``missing``/``extra``/``stale`` of devices_mismatch)."""
    item: dict[str, Any] = {"kind": "error", "code": code, "detail": detail}
    if ref is not None:
        item["ref"] = ref
    item.update(fields)
    return item


def result_item(rid: str, result: Any) -> dict[str, Any]:
    return {"kind": "res", "rid": rid, "ok": True, "result": result}


def failure_item(rid: str, code: str, detail: str) -> dict[str, Any]:
    return {"kind": "res", "rid": rid, "ok": False, "error": {"code": code, "detail": detail}}


# --- chat messages (u/{me}/out) ---------------------------------------------------

TYPE_RE: Final = re.compile(r"[a-z0-9_.-]{1,32}")
GROUP_PREFIX: Final = "g:"
MAX_IDS_PER_ITEM: Final = 1000
MESSAGE_FIELDS: Final = frozenset({"id", "to", "body", "bodies", "keys", "type", "ts"})
OLM_TYPE: Final = "olm"
"""``type`` of an end-to-end encrypted message: uplink with ``bodies``, downlink ``body`` = this device's ciphertext."""
PUBLIC_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/=_-]{1,256}")
"""A public key or a signature on the wire: base64 (standard or URL-safe, padded or not)."""
DEFAULT_MAX_DEVICES_PER_MESSAGE: Final = 64
"""Default of ``limits.max_devices_per_message``: entries allowed in one message's ``bodies``."""


def chat_envelope_bytes(max_body_bytes: int) -> int:
    """Largest accepted ``u/{me}/out`` payload: a body of ``max_body_bytes`` JSON-escaped
    (x 6) plus 1 KiB of fields. It bounds an olm message's ``bodies`` all together too."""
    return max_body_bytes * 6 + 1024


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A message as the sender published it (``from`` is added by the server).

    Exactly one of two forms: plain ``body``, or ``bodies`` (client id
    ``user.device`` -> that device's ciphertext, ``type`` "olm") with ``body`` "".
    ``keys`` (olm only, optional on the wire): client id -> the Curve25519 identity
    key that device's ciphertext was encrypted to, for exactly the ids of ``bodies``;
    the server refuses a message whose key for a device is not its current one.
    """

    id: str
    to: str
    body: str
    type: str = "text"
    ts: int | None = None
    bodies: dict[str, str] | None = None
    keys: dict[str, str] | None = None


def _body_size(body: str, max_body_bytes: int, msg_id: str, what: str) -> None:
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_body_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"{what} is {size} bytes, limit is {max_body_bytes}", msg_id)


def _parse_bodies(value: object, max_body_bytes: int, max_devices: int, msg_id: str) -> dict[str, str]:
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


def _parse_keys(value: object, bodies: dict[str, str] | None, msg_id: str) -> dict[str, str]:
    if bodies is None:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'keys' goes with 'bodies' only", msg_id)
    if (not isinstance(value, dict) or set(value) != set(bodies)
            or not all(isinstance(k, str) and PUBLIC_KEY_RE.fullmatch(k) for k in value.values())):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'keys' must map exactly the client ids of 'bodies' to "
                                                  "Curve25519 keys (base64, 1-256 characters)", msg_id)
    return dict(value)


def parse_chat_message(
    payload: bytes, max_body_bytes: int, max_devices: int = DEFAULT_MAX_DEVICES_PER_MESSAGE
) -> ChatMessage:
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
    if not isinstance(to, str) or not (is_user_id(to) or to.startswith(GROUP_PREFIX)):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'to' must be a user id", msg_id)
    if ("body" in obj) == ("bodies" in obj):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "a message has exactly one of 'body' and 'bodies'", msg_id)
    bodies: dict[str, str] | None = None
    body = obj.get("body", "")
    if "bodies" in obj:
        bodies = _parse_bodies(obj["bodies"], max_body_bytes, max_devices, msg_id)
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
    keys = _parse_keys(obj["keys"], bodies, msg_id) if "keys" in obj else None
    return ChatMessage(msg_id, to, body, kind, ts, bodies, keys)


def chat_message_payload(message: ChatMessage) -> bytes:
    obj: dict[str, Any] = {"id": message.id, "to": message.to, "type": message.type}
    if message.bodies is not None:
        obj["bodies"] = message.bodies
        if message.keys is not None:
            obj["keys"] = message.keys
    else:
        obj["body"] = message.body
    if message.ts is not None:
        obj["ts"] = message.ts
    return dumps(obj)


def canonical_json(obj: Any) -> bytes:
    """The bytes a key signature covers: sorted keys, no spaces, UTF-8 (the signed object
    without its ``signature`` field). Both the publishing and the verifying SDK use this."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- acks, seen, heartbeats ---------------------------------------------------------


def _int_list(value: object, field: str, limit: int = MAX_IDS_PER_ITEM) -> list[int]:
    if (
        not isinstance(value, list) or not value or len(value) > limit
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'{field}' must be a list of 1-{limit} positive integers")
    return value


def _id_list(value: object, field: str, limit: int = MAX_IDS_PER_ITEM) -> list[str]:
    if (
        not isinstance(value, list) or not value or len(value) > limit
        or not all(isinstance(v, str) and MESSAGE_ID_RE.fullmatch(v) for v in value)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'{field}' must be a list of 1-{limit} message ids")
    return value


def parse_ack(payload: bytes) -> list[int]:
    """``{"seqs":[17,18]}`` -> ``[17, 18]``."""
    obj = loads_object(payload, 64 * 1024)
    if set(obj) != {"seqs"}:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "an ack is exactly {\"seqs\": [...]}")
    return _int_list(obj["seqs"], "seqs")


def ack_payload(seqs: list[int]) -> bytes:
    return dumps({"seqs": seqs})


def parse_seen(payload: bytes) -> tuple[str, list[str]]:
    """``{"to":"alice","ids":["m1"]}`` -> ``("alice", ["m1"])``."""
    obj = loads_object(payload, 128 * 1024)
    if set(obj) != {"to", "ids"}:
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "a seen report is exactly {\"to\": user, \"ids\": [...]}")
    to = obj["to"]
    if not is_user_id(to):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "'to' must be a user id")
    return to, _id_list(obj["ids"], "ids")


def seen_payload(to: str, ids: list[str]) -> bytes:
    return dumps({"to": to, "ids": ids})


HB_ACTIVE: Final = "active"
HB_AWAY: Final = "away"


def parse_heartbeat(payload: bytes) -> str:
    """``{}`` -> ``"active"``; ``{"state":"away"}`` -> ``"away"``."""
    obj = loads_object(payload, 1024)
    state = obj.get("state", HB_ACTIVE)
    if set(obj) - {"state"} or state not in (HB_ACTIVE, HB_AWAY):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, "a heartbeat is {} or {\"state\":\"away\"}")
    return str(state)


def heartbeat_payload(away: bool = False) -> bytes:
    return dumps({"state": HB_AWAY} if away else {})


# --- presence requests (docs/PROTOCOL.md, "Presence") ----------------------------------

PRIVACY_EVERYONE: Final = "everyone"
PRIVACY_CONTACTS: Final = "contacts"
PRIVACY_NOBODY: Final = "nobody"
PRIVACY_CHOICES: Final = (PRIVACY_EVERYONE, PRIVACY_CONTACTS, PRIVACY_NOBODY)
PRIVACY_DEFAULT: Final = PRIVACY_CONTACTS
MAX_USERS_PER_REQUEST: Final = 256
"""Users named in one presence.get/subscribe/unsubscribe or contacts.add/remove request."""


def parse_user_list(args: dict[str, Any]) -> list[str]:
    """``{"users": [...]}`` (1-256 user ids, repeats collapsed, order kept); DecodeError otherwise."""
    users = args.get("users")
    if (
        not isinstance(users, list) or not users or len(users) > MAX_USERS_PER_REQUEST
        or not all(is_user_id(u) for u in users)
    ):
        raise DecodeError(ErrorCode.BAD_ENVELOPE, f"'users' must be a list of 1-{MAX_USERS_PER_REQUEST} user ids")
    return list(dict.fromkeys(users))


# --- end-to-end keys and devices (docs/PROTOCOL.md, "End-to-end encryption") -----------

OP_KEYS_PUBLISH: Final = "keys.publish"
OP_KEYS_COUNT: Final = "keys.count"
OP_KEYS_LIST: Final = "keys.list"
OP_KEYS_CLAIM: Final = "keys.claim"
OP_DEVICES_REMOVE: Final = "devices.remove"
MAX_ONE_TIME_KEYS_PER_PUBLISH: Final = 100
MAX_ONE_TIME_KEYS_STORED: Final = 200
"""Unclaimed one-time keys the server keeps per device; a publish beyond it is refused."""


# --- downlink items ------------------------------------------------------------------

RECEIPT_SENT: Final = "sent"
RECEIPT_DELIVERED: Final = "delivered"
RECEIPT_SEEN: Final = "seen"
RECEIPT_EXPIRED: Final = "expired"
STAGED_RECEIPTS: Final = frozenset({RECEIPT_DELIVERED, RECEIPT_SEEN, RECEIPT_EXPIRED})


def msg_item(
    seq: int, msg_id: str, sender: str, to: str, kind: str, body: str, ts: int, dev: str | None = None
) -> dict[str, Any]:
    """A ``msg`` downlink item; the server always passes ``dev``, the sending device's id."""
    item: dict[str, Any] = {"kind": "msg", "seq": seq, "id": msg_id, "from": sender, "to": to, "type": kind,
                            "body": body, "ts": ts}
    if dev is not None:
        item["dev"] = dev
    return item


def receipt_item(status: str, ids: list[str], peer: str, ts: int, seq: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"kind": "receipt", "status": status, "ids": ids, "peer": peer, "ts": ts}
    if seq is not None:
        item["seq"] = seq
    return item


def presence_item(user: str, online: bool | None, last_seen: int | None) -> dict[str, Any]:
    return {"kind": "presence", "user": user, "online": online, "last_seen": last_seen}


@dataclass(frozen=True, slots=True)
class MsgItem:
    """A received message. ``dev`` is the sending device (None only from a server
    older than the e2e protocol); for ``type`` "olm", ``body`` is this device's ciphertext."""

    seq: int
    id: str
    sender: str
    to: str
    type: str
    body: str
    ts: int
    dev: str | None = None


@dataclass(frozen=True, slots=True)
class ReceiptItem:
    status: str
    ids: tuple[str, ...]
    peer: str
    ts: int
    seq: int | None


@dataclass(frozen=True, slots=True)
class PresenceItem:
    user: str
    online: bool | None
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class ResItem:
    rid: str
    ok: bool
    result: Any
    error_code: str | None
    error_detail: str | None


@dataclass(frozen=True, slots=True)
class ErrorItem:
    """``missing``/``extra``/``stale``: the client ids a ``devices_mismatch`` names (empty otherwise);
    ``stale``: devices whose stated identity key is not their current one (a reinstall)."""

    code: str
    detail: str
    ref: str | None
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()


DownlinkItem = MsgItem | ReceiptItem | PresenceItem | ResItem | ErrorItem


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


def parse_downlink(payload: bytes) -> DownlinkItem:
    """Read one item from ``u/{me}/in`` (used by clients); DecodeError if it is not one."""
    obj = loads_object(payload, 16 * 1024 * 1024)
    kind = obj.get("kind")
    if kind == "msg":
        dev = obj.get("dev")
        if dev is not None and not is_device_id(dev):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "msg 'dev' must be a device id")
        return MsgItem(
            _need(obj, "seq", int), _need(obj, "id", str), _need(obj, "from", str), _need(obj, "to", str),
            str(obj.get("type", "text")), _need(obj, "body", str), _need(obj, "ts", int), dev,
        )
    if kind == "receipt":
        seq = obj.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise DecodeError(ErrorCode.BAD_ENVELOPE, "receipt 'seq' must be an integer")
        ids = _need(obj, "ids", list)
        return ReceiptItem(_need(obj, "status", str), tuple(str(i) for i in ids), _need(obj, "peer", str),
                           _need(obj, "ts", int), seq)
    if kind == "presence":
        return PresenceItem(_need(obj, "user", str), obj.get("online"), obj.get("last_seen"))
    if kind == "res":
        raw_error = obj.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        return ResItem(_need(obj, "rid", str), bool(obj.get("ok")), obj.get("result"),
                       error.get("code"), error.get("detail"))
    if kind == "error":
        return ErrorItem(_need(obj, "code", str), str(obj.get("detail", "")), obj.get("ref"),
                         _str_tuple(obj, "missing"), _str_tuple(obj, "extra"), _str_tuple(obj, "stale"))
    raise DecodeError(ErrorCode.BAD_ENVELOPE, f"unknown downlink kind {kind!r}")
