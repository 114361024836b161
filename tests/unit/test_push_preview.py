"""Push previews, the parts without a network: the SDK's encryption (client_sdk/preview.py) and its
trust in preview keys (client_sdk/keys.py rule 5), and the protocol's checks of ``push.register``'s
preview key and a message's ``previews`` (chatproto)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from chatproto import MAX_PREVIEW_CHARS, ChatMessage, DecodeError, ErrorCode, PushRegister, preview_key_object
from client_sdk import keys as K
from client_sdk import preview as P
from client_sdk.crypto import Account, verify
from client_sdk.localstore import DeviceRecord

ALICE = Account()
BOB_KEY = X25519PrivateKey.generate()


def seal(text: str, recipient: str = "bob.phone", key: X25519PrivateKey = BOB_KEY) -> str:
    return P.seal(P.public_key(key), recipient, "m1", "alice", "phone", text, ALICE.sign)


def test_the_recipient_opens_what_the_sender_signed() -> None:
    inner = P.open_inner(BOB_KEY, "bob.phone", seal("Alice: hi"))
    assert inner is not None
    assert (inner["text"], inner["id"], inner["from"], inner["dev"], inner["to"]) == \
        ("Alice: hi", "m1", "alice", "phone", "bob.phone")
    assert verify(inner, ALICE.ed25519) and not verify(inner, Account().ed25519)


def test_every_preview_has_the_same_size_and_a_long_text_is_cut_to_fit() -> None:
    sizes = {len(seal(text)) for text in ("", "hi", "x" * 1000, "é😀" * 300, '"\\' * 200)}
    assert sizes == {578} and MAX_PREVIEW_CHARS >= 578
    inner = P.open_inner(BOB_KEY, "bob.phone", seal("😀" * 500))
    assert inner is not None and 20 < len(inner["text"]) < 500 and set(inner["text"]) == {"😀"}


def test_a_preview_opens_only_on_its_device_unchanged() -> None:
    preview = seal("hi")
    assert P.open_inner(BOB_KEY, "bob.laptop", preview) is None  # the client id is bound
    assert P.open_inner(X25519PrivateKey.generate(), "bob.phone", preview) is None
    raw = bytearray(P.b64url_decode(preview))
    raw[-1] ^= 1
    assert P.open_inner(BOB_KEY, "bob.phone", P.b64url(bytes(raw))) is None
    for junk in ("", "AAAA", "!!", P.b64url(b"\x02" + bytes(100))):
        assert P.open_inner(BOB_KEY, "bob.phone", junk) is None


def test_the_preview_is_found_in_every_provider_s_payload() -> None:
    preview = seal("hi")
    assert P.payload_preview({"wake": "1", "preview": preview}) == preview  # FCM data
    assert P.payload_preview({"aps": {"mutable-content": 1}, "preview": preview}) == preview  # APNs
    assert P.payload_preview(json.dumps({"wake": 1, "preview": preview}).encode()) == preview  # Web/UnifiedPush
    assert P.payload_preview(b'{"wake":1}') is None
    assert P.payload_preview(b"not json") is None
    assert P.payload_preview("[1]") is None


def bob_phone(account: Account) -> DeviceRecord:
    return DeviceRecord("bob", "phone", account.curve25519, account.ed25519)


def test_a_preview_key_is_trusted_only_when_the_device_s_own_key_signed_it() -> None:
    phone = Account()
    key = P.public_key(X25519PrivateKey.generate())
    good = phone.sign(preview_key_object("bob", "phone", key))["signature"]
    forged = Account().sign(preview_key_object("bob", "phone", key))["signature"]
    other_device = phone.sign(preview_key_object("bob", "laptop", key))["signature"]
    trusted = {"phone": bob_phone(phone)}
    assert K.read_preview_keys("bob", {"previews": {"phone": {"key": key, "sig": good}}}, trusted) == {"phone": key}
    for entry in ({"key": key, "sig": forged}, {"key": key, "sig": other_device}, {"key": key}, "junk"):
        assert K.read_preview_keys("bob", {"previews": {"phone": entry}}, trusted) == {}
    assert K.read_preview_keys("bob", {"previews": {"phone": {"key": key, "sig": good}}}, {}) == {}  # not trusted
    assert K.read_preview_keys("bob", {"devices": {}}, trusted) == {}


KEY, SIG = "A" * 43, "B" * 86  # 32 and 64 bytes in base64


def test_push_register_takes_a_preview_key_and_its_signature_together() -> None:
    args = {"platform": "fcm", "token": "t", "preview_key": KEY, "preview_sig": SIG}
    request = PushRegister.from_args(args)
    assert (request.preview_key, request.preview_sig) == (KEY, SIG) and request.args() == args
    assert PushRegister.from_args({"platform": "fcm", "token": "t"}).args() == {"platform": "fcm", "token": "t"}


@pytest.mark.parametrize("extra", [
    {"preview_key": KEY}, {"preview_sig": SIG}, {"preview_key": KEY[:-2], "preview_sig": SIG},
    {"preview_key": KEY, "preview_sig": SIG + "AAAA"}, {"preview_key": 5, "preview_sig": SIG},
    {"preview_key": "!" * 43, "preview_sig": SIG},
])
def test_a_bad_preview_key_is_refused(extra: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as caught:
        PushRegister.from_args({"platform": "fcm", "token": "t", **extra})
    assert caught.value.code == ErrorCode.BAD_ENVELOPE


OLM = {"id": "m1", "to": "bob", "type": "olm", "bodies": {"bob.phone": "c1", "bob.laptop": "c2"}}


def decode(obj: dict[str, Any]) -> ChatMessage:
    return ChatMessage.decode(json.dumps(obj).encode(), 64 * 1024)


def test_previews_go_with_bodies_for_some_of_its_devices() -> None:
    message = decode({**OLM, "previews": {"bob.phone": "AbC_-9"}})
    assert message.previews == {"bob.phone": "AbC_-9"}
    assert decode(json.loads(message.encode())) == message
    assert decode({**OLM, "previews": {}}).previews == {}


@pytest.mark.parametrize(("previews", "code"), [
    ({"bob.tablet": "AAAA"}, ErrorCode.BAD_ENVELOPE),
    ({"bob.phone": ""}, ErrorCode.BAD_ENVELOPE),
    ({"bob.phone": "a+b/"}, ErrorCode.BAD_ENVELOPE),
    ({"bob.phone": 5}, ErrorCode.BAD_ENVELOPE),
    (["bob.phone"], ErrorCode.BAD_ENVELOPE),
    ({"bob.phone": "A" * (MAX_PREVIEW_CHARS + 1)}, ErrorCode.TOO_LARGE),
])
def test_bad_previews_are_refused(previews: object, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as caught:
        decode({**OLM, "previews": previews})
    assert (caught.value.code, caught.value.ref) == (code, "m1")


def test_a_plain_message_has_no_previews() -> None:
    with pytest.raises(DecodeError) as caught:
        decode({"id": "m1", "to": "bob", "body": "hi", "previews": {"bob.phone": "AAAA"}})
    assert caught.value.code == ErrorCode.BAD_ENVELOPE
