"""The shared wire module: identities, topic rules and request parsing, without a network."""

import json
from typing import Any

import pytest

import chatproto as p


@pytest.mark.parametrize("value", ["alice", "a", "a_1", "x" * 32])
def test_valid_user_ids(value: str) -> None:
    assert p.is_user_id(value)


@pytest.mark.parametrize("value", ["", "Alice", "al-ice", "a.b", "x" * 33, "é", 5, None])
def test_invalid_user_ids(value: object) -> None:
    assert not p.is_user_id(value)


def test_client_id_split() -> None:
    assert p.split_client_id("alice.phone-2_A") == ("alice", "phone-2_A")
    assert p.split_client_id("alice.") is None
    assert p.split_client_id("alice") is None
    assert p.split_client_id("Alice.phone") is None
    assert p.split_client_id("alice.ph.one") is None  # '.' is not a device character


def test_uplinks_are_exactly_five_and_only_own() -> None:
    for kind in ("out", "ack", "seen", "hb", "req"):
        assert p.uplink_kind("alice", f"u/alice/{kind}") == kind
    assert p.uplink_kind("alice", "u/alice/in") is None
    assert p.uplink_kind("alice", "u/bob/out") is None
    assert p.uplink_kind("alice", "u/alice/out/x") is None
    assert p.uplink_kind("ali", "u/alice/out") is None


def test_only_own_inbox_may_be_subscribed() -> None:
    assert p.may_subscribe("alice", "u/alice/in")
    for topic in ("u/bob/in", "#", "u/+/in", "u/alice/#", "$SYS/#", "u/alice/out", "u/alice/+"):
        assert not p.may_subscribe("alice", topic)


def test_request_roundtrip() -> None:
    req = p.Request.decode(b'{"rid":"r1","op":"presence.get","args":{"users":["bob"]}}', 1000)
    assert req == p.Request("r1", "presence.get", {"users": ["bob"]})
    assert p.Request.decode(b'{"rid":"r2","op":"ping"}', 1000).args == {}


@pytest.mark.parametrize(
    ("payload", "code", "ref"),
    [
        (b"not json", "bad_json", None),
        (b"\xff\xfe", "bad_json", None),
        (b"[1,2]", "bad_json", None),
        (b'{"rid":1,"op":"ping"}', "bad_envelope", None),
        (b'{"rid":"r","op":["ping"]}', "bad_envelope", "r"),
        (b'{"rid":"r","op":"ping","args":"x"}', "bad_envelope", "r"),
        (b'{"rid":"r","op":"ping","extra":1}', "bad_envelope", "r"),
        (b'{"rid":"r","op":"ping","n":NaN}', "bad_json", None),
        (b'{"rid":"r","op":"ping","n":1e999}', "bad_json", None),
        (b'{"rid":"r","op":"ping","args":' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "bad_json", None),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json", None),
        (b'{"rid":"' + b"x" * 2000 + b'"}', "too_large", None),
    ],
)
def test_bad_requests_name_their_fault(payload: bytes, code: str, ref: str | None) -> None:
    with pytest.raises(p.DecodeError) as info:
        p.Request.decode(payload, 1000 if code == "too_large" else 10**7)
    assert info.value.code == code
    assert info.value.ref == ref


def test_items_are_compact_utf8_json() -> None:
    item = json.loads(p.ErrorItem("forbidden", "héllo", ref="m1").encode())
    assert json.loads(p.dumps(item)) == {"kind": "error", "code": "forbidden", "detail": "héllo", "ref": "m1"}
    assert b" " not in p.ResItem.success("r", {"a": 1}).encode()
    assert json.loads(p.ResItem.failure("r", "unknown_op", "x").encode()) == {
        "kind": "res", "rid": "r", "ok": False, "error": {"code": "unknown_op", "detail": "x"}
    }


def test_acks_seen_reports_and_heartbeats_round_trip() -> None:
    for item in (p.Ack((17, 18)), p.Seen("alice", ("m1", "m2")), p.Seen("g:team", ("m1",)), p.Heartbeat(),
                 p.Heartbeat(away=True)):
        assert type(item).decode(item.encode()) == item
    assert p.Ack((1,)).encode() == b'{"seqs":[1]}'
    assert p.Heartbeat().encode() == b"{}" and p.Heartbeat(away=True).encode() == b'{"state":"away"}'


@pytest.mark.parametrize(
    ("decode", "payload"),
    [
        (p.Ack.decode, b'{"seqs":[]}'),
        (p.Ack.decode, b'{"seqs":[1,true]}'),
        (p.Ack.decode, b'{"seqs":[1],"x":1}'),
        (p.Seen.decode, b'{"to":"Alice","ids":["m1"]}'),
        (p.Seen.decode, b'{"to":"alice","ids":["m.1"]}'),
        (p.Seen.decode, b'{"to":"g:","ids":["m1"]}'),
        (p.Heartbeat.decode, b'{"state":"busy"}'),
    ],
)
def test_bad_acks_seen_reports_and_heartbeats_are_bad_envelopes(decode: Any, payload: bytes) -> None:
    with pytest.raises(p.DecodeError) as info:
        decode(payload)
    assert info.value.code == "bad_envelope"


def test_each_downlink_item_reads_back_as_itself() -> None:
    items: list[p.DownlinkItem] = [
        p.MsgItem(7, "m1", "alice", "bob", "text", "hi", 99, "phone"),
        p.ReceiptItem("delivered", ("m1",), "bob", 5, 9),
        p.PresenceItem("alice", True, None),
        p.ResItem.success("r1", {"a": 1}),
        p.ResItem.failure("r2", "unknown_op", "x"),
        p.ErrorItem("devices_mismatch", "x", "m1", ("bob.a",), (), ("bob.b",)),
    ]
    for item in items:
        assert p.parse_downlink(item.encode()) == item
        assert type(item).decode(item.encode()) == item
    with pytest.raises(p.DecodeError):
        p.MsgItem.decode(p.PresenceItem("alice", True, None).encode())
