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
import re
from dataclasses import dataclass
from typing import Any, Final

PROTOCOL_VERSION: Final = 1

USER_RE: Final = re.compile(r"[a-z0-9_]{1,32}")
DEVICE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
MESSAGE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
OP_RE: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")

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


# --- identities -----------------------------------------------------------


def is_user_id(value: object) -> bool:
    return isinstance(value, str) and USER_RE.fullmatch(value) is not None


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None


def client_id(user: str, device: str) -> str:
    return f"{user}.{device}"


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


def loads_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse a JSON object, refusing oversized, non-UTF-8, NaN and non-object input."""
    if len(payload) > max_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes, limit is {max_bytes}")
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(ErrorCode.BAD_JSON, f"payload is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DecodeError(ErrorCode.BAD_JSON, "payload must be a JSON object")
    return value


def dumps(item: dict[str, Any]) -> bytes:
    """Compact, UTF-8 JSON; the one encoder for every item on the wire."""
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- requests (u/{me}/req) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    rid: str
    op: str
    args: dict[str, Any]


def parse_request(payload: bytes, max_bytes: int) -> Request:
    """Read ``{"rid":..,"op":..,"args":{..}}``; raises DecodeError naming the fault."""
    obj = loads_object(payload, max_bytes)
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


def error_item(code: str, detail: str, ref: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"kind": "error", "code": code, "detail": detail}
    if ref is not None:
        item["ref"] = ref
    return item


def result_item(rid: str, result: Any) -> dict[str, Any]:
    return {"kind": "res", "rid": rid, "ok": True, "result": result}


def failure_item(rid: str, code: str, detail: str) -> dict[str, Any]:
    return {"kind": "res", "rid": rid, "ok": False, "error": {"code": code, "detail": detail}}
