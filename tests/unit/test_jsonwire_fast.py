"""orjson in chatproto/jsonwire.py changes nothing but the speed: every reading and writing is the
standard library's, side by side on fuzzed input (the same value with the same types, or the same
refusal with the same detail and ``ref``; the same bytes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chatproto.jsonwire as jw
from chatproto import MESSAGE_ID_RE, DecodeError

pytest.importorskip("orjson")

REF = ("id", MESSAGE_ID_RE)

# Pieces that stress what the two readers could disagree on: numbers at the edges of a double and of
# 64 bits, surrogate escapes (paired, lone, reversed), control characters, a BOM, deep nesting, keys twice.
PIECES = [
    "0", "-0", "-0.0", "1e999", "-1E400", "1e-400", "2.5e-324", "1.7976931348623157e308", "0.1", "1E5",
    "9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616",
    "-9223372036854775809", "123456789012345678901234567890", "007", "1.", ".5", "NaN", "Infinity", "-Infinity",
    "true", "false", "null", '"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', '"\\ude00\\ud83d"', '"\\ud800\\ud800"',
    '"\\u0000"', '"\x01"', '"\x7f"', '"\u2028"', '"é"', '"\\""', '"\\/"', '"\\x"', '"m1"', "[]", "{}", "[[[[[]]]]]",
    '{"a":1,"a":2}', '{"id":"m1"}', "\ufeff", " ", "\n", ",", ":", "[", "]", "{", "}",
]

texts = st.recursive(
    st.sampled_from(PIECES),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(['"id"', '"a"', '"\\ud800"', '"b"']), inner), max_size=4)
        .map(lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"),
        st.lists(inner, min_size=2, max_size=3).map("".join),
    ),
    max_leaves=12,
)
payloads = st.one_of(
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    texts.map(lambda t: ('{"id":"m1","x":' + t + "}").encode("utf-8", "surrogatepass")),
    st.integers(0, 1100).map(lambda n: ("{\"a\":" + "[" * n + "]" * n + "}").encode()),  # past the recursion limit
    st.binary(max_size=64),
)


@contextmanager
def standard() -> Iterator[None]:
    """The standard library only, as in an SDK-only install."""
    fast, jw.orjson = jw.orjson, None
    try:
        yield
    finally:
        jw.orjson = fast


def outcome(read: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", repr(read())  # repr: 1 and 1.0, 0.0 and -0.0 differ
    except DecodeError as exc:
        return "refused", (exc.code, exc.detail, exc.ref)


@settings(max_examples=1500, deadline=None)
@given(payloads)
def test_reading_is_the_standard_librarys(payload: bytes) -> None:
    fast = outcome(lambda: jw.loads_object(payload, 4096, REF))
    with standard():
        slow = outcome(lambda: jw.loads_object(payload, 4096, REF))
    assert fast == slow


plain = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.text(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**65), st.none(), st.booleans(),
              st.lists(st.text(max_size=10), max_size=3)),
    max_size=6,
)


@settings(max_examples=1500, deadline=None)
@given(plain)
def test_writing_plain_items_is_the_standard_librarys(item: dict[str, Any]) -> None:
    assert jw.dumps_plain(item) == jw.dumps(item)


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\x00\x1f\x7f\u2028\u2029\"\\\n\t\b\f\r", "é😀"])
def test_writing_the_edge_cases_is_the_standard_librarys(text: str) -> None:
    item = {"kind": "receipt", "ids": [text], "peer": text, "ts": 2**64, "seq": None}
    assert jw.dumps_plain(item) == jw.dumps(item)


def test_the_fast_path_is_taken() -> None:
    """Guard for the benchmark's claim: the common payloads do not fall back."""
    assert isinstance(jw._fast_loads(b'{"id":"m1","to":"bob","body":"hi"}'), dict)
    assert isinstance(jw._fast_loads(b'{"seqs":[1000000000000000001]}'), type(None))  # 19 digits: the standard way
