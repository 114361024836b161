"""The JSON of the wire: the one reader of uplink objects and the one encoder of items.

Every uplink payload is a UTF-8 JSON object, nested at most ``MAX_JSON_DEPTH`` levels,
without NaN/Infinity, out-of-range numbers or lone surrogates (docs/PROTOCOL.md section 4).

orjson, when installed (the server extra; the SDK alone does without), reads and writes the
common case ~5x faster (bench: 5 codec calls per message, ~30 µs of ~135). Its results are
taken only where they are the standard library's exactly; anything else goes the standard
library's way, so the semantics are one (tests/unit/test_jsonwire_fast.py checks them side by
side on fuzzed input):
- reading: orjson refuses everything the standard path refuses here (NaN, Infinity, 1e999,
  lone surrogates, invalid UTF-8, a BOM, control characters) and a refusal is read again the
  standard way (same error, same ``ref``); it reads an integer past 64 bits as a float, so a
  payload with a run of 19 digits is read the standard way too, and so is one with more
  brackets than the depth limit; duplicate keys keep the last value in both;
- writing (``dumps_plain``, the hot items only: their values are str, int, None and lists of
  str): the same bytes, escapes included; a lone surrogate or an integer past 64 bits
  (orjson refuses both) is written the standard way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from chatproto.errors import DecodeError, ErrorCode
from chatproto.limits import MAX_JSON_DEPTH

try:
    import orjson
except ImportError:  # the SDK alone: the standard library only
    orjson = None  # type: ignore[assignment]


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
    fast = _fast_loads(payload)
    if isinstance(fast, dict):  # text by orjson's own checks, and no deeper than its brackets: all checked
        return fast
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


# 19 digits in a row: maybe an integer past 64 bits, which orjson would read as a float.
_LONG_DIGITS: Final = re.compile(rb"[0-9]{19}")


def _fast_loads(payload: bytes) -> Any:
    """orjson's reading of ``payload`` where it is the standard library's; None: read it the standard way.

    Only for payloads with at most ``MAX_JSON_DEPTH`` brackets (counted in C), which cannot nest deeper:
    how deep nesting fails the standard way depends on the interpreter's recursion limit."""
    if orjson is None or payload.count(b"{") + payload.count(b"[") > MAX_JSON_DEPTH \
            or _LONG_DIGITS.search(payload) is not None:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


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


def dumps_plain(item: dict[str, Any]) -> bytes:
    """``dumps`` for an item whose values are only str, int, bool, None and lists of str (``msg``, ``receipt``):
    the same bytes, through orjson when it is installed (it writes floats differently, hence "plain")."""
    if orjson is not None:
        try:
            return orjson.dumps(item)
        except TypeError:  # a lone surrogate, an integer past 64 bits: written as dumps writes them
            pass
    return dumps(item)


def canonical_json(obj: Any) -> bytes:
    """The bytes a key signature covers: sorted keys, no spaces, UTF-8 (the signed object
    without its ``signature`` field). Both the publishing and the verifying SDK use this."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
