"""The wire module's end-to-end additions: the olm message form (``bodies``) and its stated
identity keys (``keys``), ``dev`` on ``msg`` items, ``devices_mismatch`` fields on error items
(``missing``/``extra``/``stale``) and canonical JSON, without a network."""

import json

import pytest

import chatproto as p


def olm(bodies: object, **fields: object) -> bytes:
    return json.dumps({"id": "m1", "to": "bob", "type": "olm", "bodies": bodies, **fields}).encode()


def test_olm_message_round_trip() -> None:
    bodies = {"bob.phone": "Y3Qx", "bob.laptop": "Y3Qy", "alice.tablet": "Y3Qz"}
    message = p.ChatMessage.decode(olm(bodies, ts=5), 100)
    assert message == p.ChatMessage("m1", "bob", "", p.OLM_TYPE, 5, bodies)
    assert p.ChatMessage.decode(message.encode(), 100) == message
    assert "body" not in json.loads(message.encode())


def test_olm_message_with_keys_round_trip() -> None:
    bodies, keys = {"bob.phone": "Y3Qx", "alice.tab": "Y3Qz"}, {"bob.phone": "Q1+/=", "alice.tab": "Q2-_"}
    message = p.ChatMessage.decode(olm(bodies, keys=keys), 100)
    assert message == p.ChatMessage("m1", "bob", "", p.OLM_TYPE, None, bodies, keys)
    assert json.loads(message.encode())["keys"] == keys
    assert p.ChatMessage.decode(message.encode(), 100) == message
    assert "keys" not in json.loads(p.ChatMessage("m1", "bob", "", p.OLM_TYPE, None, bodies).encode())


def test_olm_type_is_implied_by_bodies() -> None:
    payload = json.dumps({"id": "m1", "to": "bob", "bodies": {"bob.phone": "x"}}).encode()
    assert p.ChatMessage.decode(payload, 100).type == p.OLM_TYPE


def test_plain_message_round_trip_is_unchanged() -> None:
    message = p.ChatMessage("m2", "bob", "hi", "text", None)
    assert json.loads(message.encode()) == {"id": "m2", "to": "bob", "body": "hi", "type": "text"}
    assert p.ChatMessage.decode(message.encode(), 100) == message


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (olm({}), "bad_envelope"),
        (olm(["bob.phone"]), "bad_envelope"),
        (olm({"bob": "x"}), "bad_envelope"),  # not a client id
        (olm({"Bob.phone": "x"}), "bad_envelope"),
        (olm({"bob.phone": 5}), "bad_envelope"),
        (olm({"bob.phone": "x"}, body="also"), "bad_envelope"),  # both forms
        (json.dumps({"id": "m1", "to": "bob", "type": "olm", "body": "x"}).encode(), "bad_envelope"),
        (json.dumps({"id": "m1", "to": "bob", "type": "text", "bodies": {"bob.a": "x"}}).encode(), "bad_envelope"),
        (json.dumps({"id": "m1", "to": "bob"}).encode(), "bad_envelope"),  # neither form
        (olm({"bob.phone": "x" * 101}), "too_large"),
        (olm({f"bob.d{i}": "x" for i in range(4)}), "too_large"),  # more devices than allowed
        (olm({"bob.phone": "x"}, keys={}), "bad_envelope"),  # 'keys' must name the ids of 'bodies' exactly
        (olm({"bob.phone": "x"}, keys={"bob.phone": "Q1", "bob.tab": "Q2"}), "bad_envelope"),
        (olm({"bob.phone": "x", "bob.tab": "y"}, keys={"bob.phone": "Q1"}), "bad_envelope"),
        (olm({"bob.phone": "x"}, keys={"bob.phone": 5}), "bad_envelope"),
        (olm({"bob.phone": "x"}, keys={"bob.phone": ""}), "bad_envelope"),
        (olm({"bob.phone": "x"}, keys={"bob.phone": "not base64!"}), "bad_envelope"),
        (olm({"bob.phone": "x"}, keys={"bob.phone": "Q" * 257}), "bad_envelope"),
        (olm({"bob.phone": "x"}, keys=["Q1"]), "bad_envelope"),
        (json.dumps({"id": "m1", "to": "bob", "body": "x", "keys": {}}).encode(), "bad_envelope"),  # plain
    ],
)
def test_bad_olm_messages_name_their_fault(payload: bytes, code: str) -> None:
    with pytest.raises(p.DecodeError) as info:
        p.ChatMessage.decode(payload, 100, max_devices=3)
    assert (info.value.code, info.value.ref) == (code, "m1")


def test_lone_surrogate_ciphertext_is_refused_with_its_ref() -> None:
    payload = b'{"id":"m1","to":"bob","bodies":{"bob.a":"\\ud800"}}'
    with pytest.raises(p.DecodeError) as info:
        p.ChatMessage.decode(payload, 100)
    assert (info.value.code, info.value.ref) == ("bad_json", "m1")


def test_surrogate_pairs_and_escaped_backslashes_are_text() -> None:
    # A pair is one character (U+1F600); an escaped backslash before "ud800" is plain text.
    payload = b'{"id":"m1","to":"bob","body":"\\ud83d\\ude00 \\\\ud800 \\uD83D\\uDE00"}'
    assert p.ChatMessage.decode(payload, 100).body == "\U0001f600 \\ud800 \U0001f600"


def test_msg_items_carry_the_sending_device() -> None:
    item = json.loads(p.MsgItem(7, "m1", "alice", "bob", "olm", "Y3Q=", 99, "phone").encode())
    assert item["dev"] == "phone"
    parsed = p.parse_downlink(p.dumps(item))
    assert parsed == p.MsgItem(7, "m1", "alice", "bob", "olm", "Y3Q=", 99, "phone")
    assert p.parse_downlink(p.MsgItem(7, "m1", "alice", "bob", "text", "x", 99).encode()).dev is None  # type: ignore[union-attr]
    with pytest.raises(p.DecodeError):
        p.parse_downlink(p.dumps({**item, "dev": "no.dots"}))


def test_error_items_keep_mismatch_fields() -> None:
    item = json.loads(p.ErrorItem(p.ErrorCode.DEVICES_MISMATCH, "x", "m1", ("bob.a",), ("bob.b", "bob.c")).encode())
    assert item["missing"] == ["bob.a"] and item["extra"] == ["bob.b", "bob.c"]
    assert p.parse_downlink(p.dumps(item)) == p.ErrorItem("devices_mismatch", "x", "m1", ("bob.a",), ("bob.b", "bob.c"))
    assert p.parse_downlink(p.ErrorItem("no_keys", "y", "m2").encode()) == p.ErrorItem("no_keys", "y", "m2")
    stale = p.parse_downlink(p.dumps({**item, "stale": ["bob.d", "bob.e"]}))
    assert isinstance(stale, p.ErrorItem) and stale.stale == ("bob.d", "bob.e")
    for field in ("missing", "stale"):
        with pytest.raises(p.DecodeError):
            p.parse_downlink(p.dumps({**item, field: "bob.a"}))


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert p.canonical_json({"b": 1, "a": {"d": "é", "c": [1, 2]}}) == '{"a":{"c":[1,2],"d":"é"},"b":1}'.encode()
    assert p.canonical_json({"x": 1, "y": 2}) == p.canonical_json({"y": 2, "x": 1})


def test_new_codes_and_ops_are_valid_names() -> None:
    assert {p.ErrorCode.DEVICES_MISMATCH, p.ErrorCode.NO_KEYS, p.ErrorCode.ENCRYPTION_REQUIRED} == {
        "devices_mismatch", "no_keys", "encryption_required"}
    for op in (p.OP_KEYS_PUBLISH, p.OP_KEYS_COUNT, p.OP_KEYS_LIST, p.OP_KEYS_CLAIM, p.OP_DEVICES_REMOVE):
        assert p.OP_RE.fullmatch(op)
