"""The sender-key rules (client_sdk/senderkeys.py), pure: rotation, who gets the key, the share's
and the group ciphertext's wire forms (fuzzed: bad input is a clear SenderKeyError, never a crash),
what a receiver does with a share, replays and the pending bound."""

from __future__ import annotations

import json

import pytest
import vodozemac
from hypothesis import given
from hypothesis import strategies as st

from client_sdk.localstore import DeviceRecord
from client_sdk.senderkeys import (
    DAY_MS,
    Envelope,
    GroupCiphertext,
    KeyShare,
    OutboundState,
    Replay,
    Rotation,
    RotationPolicy,
    SenderKeyError,
    ShareVerdict,
    check_payload,
    devices_to_share,
    holder,
    judge_share,
    payload,
    pending_overflow,
    replay_verdict,
    rotation_reason,
)

POLICY = RotationPolicy(max_messages=3, max_age_ms=7 * DAY_MS)
ME = ("alice", "phone")


def dev(user: str, device: str, curve: str = "c") -> DeviceRecord:
    return DeviceRecord(user, device, f"{curve}-{user}-{device}", "ed")


BOB, CAROL, ALICE_LAPTOP = dev("bob", "phone"), dev("carol", "phone"), dev("alice", "laptop")


def state(*holders: DeviceRecord, sent: int = 0, created_ms: int = 0) -> OutboundState:
    return OutboundState("s", created_ms, sent, frozenset(holder(r) for r in holders))


def real_share(index: int = 0) -> KeyShare:
    session = vodozemac.GroupSession()
    for _ in range(index):
        session.encrypt(b"x")
    return KeyShare("g:team", session.session_id, session.session_key.to_base64(), session.message_index)


# --- rule 1: rotation ---------------------------------------------------------------------

def test_a_first_message_starts_a_session() -> None:
    assert rotation_reason(None, set(), 0, POLICY) is Rotation.NEW


def test_kept_while_every_holder_is_still_a_member_device() -> None:
    now = {holder(BOB), holder(CAROL), holder(ALICE_LAPTOP)}
    assert rotation_reason(state(BOB, CAROL), now, 10, POLICY) is None


@pytest.mark.parametrize("gone", [BOB, CAROL], ids=["removed", "left"])
def test_rotates_when_a_holder_is_no_longer_a_member_device(gone: DeviceRecord) -> None:
    now = {holder(r) for r in (BOB, CAROL) if r != gone}
    assert rotation_reason(state(BOB, CAROL), now, 10, POLICY) is Rotation.MEMBER_LEFT


def test_rotates_when_a_holder_device_was_reinstalled_with_new_keys() -> None:
    reinstalled = dev("bob", "phone", curve="new")
    assert rotation_reason(state(BOB), {holder(reinstalled)}, 10, POLICY) is Rotation.MEMBER_LEFT


def test_a_new_member_alone_does_not_rotate() -> None:
    assert rotation_reason(state(BOB), {holder(BOB), holder(CAROL)}, 10, POLICY) is None


def test_rotates_after_max_messages_and_after_max_age() -> None:
    assert rotation_reason(state(BOB, sent=2), {holder(BOB)}, 10, POLICY) is None
    assert rotation_reason(state(BOB, sent=3), {holder(BOB)}, 10, POLICY) is Rotation.MESSAGE_LIMIT
    assert rotation_reason(state(BOB, created_ms=5), {holder(BOB)}, 5 + 7 * DAY_MS - 1, POLICY) is None
    assert rotation_reason(state(BOB, created_ms=5), {holder(BOB)}, 5 + 7 * DAY_MS, POLICY) is Rotation.AGE


def test_the_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        RotationPolicy(max_messages=0)


# --- rule 2: who gets the key ---------------------------------------------------------------------

def test_every_member_device_without_the_key_gets_it_but_this_one() -> None:
    mine = dev(*ME)
    assert devices_to_share([mine, BOB, CAROL, ALICE_LAPTOP], {holder(BOB)}, ME) == (ALICE_LAPTOP, CAROL)
    assert devices_to_share([mine, BOB], {holder(BOB)}, ME) == ()


def test_a_reinstalled_device_gets_the_key_again() -> None:
    assert devices_to_share([dev("bob", "phone", curve="new")], {holder(BOB)}, ME) == (dev("bob", "phone", "new"),)


# --- the share's wire form -----------------------------------------------------------------------

def test_a_share_round_trips() -> None:
    share = real_share(index=2)
    assert KeyShare.decode(share.encode()) == share
    assert json.loads(share.encode())["t"] == "group_key"


@pytest.mark.parametrize(("change", "message"), [
    ({"t": "chat"}, "not a group key share"),
    ({"v": 2}, "unknown share version"),
    ({"group": "team"}, "no valid group"),
    ({"group": "g:" + "x" * 65}, "no valid group"),
    ({"session_id": "short"}, "no valid session id"),
    ({"key": ""}, "no valid session key"),
    ({"key": 5}, "no valid session key"),
    ({"index": -1}, "no valid index"),
    ({"index": True}, "no valid index"),
    ({"index": 2 ** 32}, "no valid index"),
])
def test_a_bad_share_is_refused_with_a_reason(change: dict[str, object], message: str) -> None:
    text = json.dumps({**json.loads(real_share().encode()), **change})
    with pytest.raises(SenderKeyError, match=message):
        KeyShare.decode(text)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=12)


@given(st.one_of(st.text(), JSON.map(json.dumps), JSON,
                 st.dictionaries(st.sampled_from(["t", "v", "group", "session_id", "key", "index"]), JSON)
                 .map(lambda d: json.dumps({"t": "group_key", "v": 1, **d}))))
def test_any_share_text_parses_or_is_refused_clearly(text: object) -> None:
    try:
        share = KeyShare.decode(text)
    except SenderKeyError as exc:
        assert str(exc)
    else:
        assert KeyShare.decode(share.encode()) == share


def test_a_deeply_nested_share_is_refused_not_a_crash() -> None:
    with pytest.raises(SenderKeyError):
        KeyShare.decode("[" * 100_000 + "]" * 100_000)


# --- rules 3 and 4: a share received ---------------------------------------------------------------

@pytest.mark.parametrize(("sender", "members", "held", "index", "verdict"), [
    ("mallory", {"alice", "bob"}, None, 0, ShareVerdict.NOT_MEMBER),
    ("bob", {"bob", "carol"}, None, 0, ShareVerdict.NOT_MEMBER),  # I am not (or no longer) a member
    ("bob", {"alice", "bob"}, None, 5, ShareVerdict.STORED),
    ("bob", {"alice", "bob"}, 5, 5, ShareVerdict.DUPLICATE),
    ("bob", {"alice", "bob"}, 3, 5, ShareVerdict.DUPLICATE),  # a later index reads less: keep the held one
    ("bob", {"alice", "bob"}, 5, 3, ShareVerdict.STORED),  # an older share, late: reads more
])
def test_judge_share(sender: str, members: set[str], held: int | None, index: int, verdict: ShareVerdict) -> None:
    assert judge_share(sender, "alice", members, held, index) is verdict


# --- the group ciphertext and its payload -----------------------------------------------------------

def test_group_ciphertext_round_trips() -> None:
    ciphertext = GroupCiphertext("A" * 43, b"\x00megolm")
    assert GroupCiphertext.from_wire(ciphertext.to_wire()) == ciphertext


@given(st.one_of(st.text(), st.integers(), st.none(),
                 st.builds(lambda s, b: f"g1.{s}.{b}", st.text(max_size=50), st.text(max_size=50))))
def test_any_group_body_parses_or_is_refused_clearly(text: object) -> None:
    try:
        GroupCiphertext.from_wire(text)
    except SenderKeyError as exc:
        assert str(exc)


ENVELOPE = Envelope("m1", "g:team", "bob", "phone")


def test_the_payload_is_bound_to_its_envelope() -> None:
    plaintext = payload(ENVELOPE, "text", "hi \ud800 there")
    assert check_payload(ENVELOPE, plaintext) == ("text", "hi \ud800 there")
    for other in (Envelope("m2", "g:team", "bob", "phone"), Envelope("m1", "g:other", "bob", "phone"),
                  Envelope("m1", "g:team", "carol", "phone"), Envelope("m1", "g:team", "bob", "laptop")):
        with pytest.raises(SenderKeyError, match="does not match the envelope"):
            check_payload(other, plaintext)


@given(st.binary())
def test_any_decrypted_bytes_are_checked_not_a_crash(plaintext: bytes) -> None:
    with pytest.raises(SenderKeyError):
        check_payload(ENVELOPE, plaintext)


# --- rules 6 and 7 --------------------------------------------------------------------------------

def test_replay_verdict() -> None:
    assert replay_verdict(None, "d1") is Replay.NEW
    assert replay_verdict("d1", "d1") is Replay.REPEAT
    assert replay_verdict("d1", "d2") is Replay.REPLAY


def test_pending_is_bounded_per_sender() -> None:
    assert pending_overflow(0, 3) == 0
    assert pending_overflow(2, 3) == 0
    assert pending_overflow(3, 3) == 1
