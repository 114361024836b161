"""Sender keys between SDK-side participants in one process, without a broker: each device has
a real local store, a GroupCrypto and an Olm account; shares travel inside real Olm messages.
Encrypt/decrypt, rotation on removal and after N messages, a new member reads from now on,
replays, pending until the key arrives, and everything across reopening the store."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_sdk.crypto import Account, Ciphertext, CryptoError, Session
from client_sdk.groupkeys import GroupCrypto, GroupItem, GroupSealed, Opened, Pending, Refused
from client_sdk.groupstore import GroupStore
from client_sdk.localstore import DeviceRecord, LocalStore
from client_sdk.megolm import Inbound, Outbound
from client_sdk.senderkeys import (
    DAY_MS,
    Envelope,
    GroupCiphertext,
    KeyShare,
    Rotation,
    RotationPolicy,
    ShareVerdict,
    payload,
)

GROUP = "g:team"
SECRET = b"the app's secret"


class Device:
    """One SDK-side participant: store, sender keys and an Olm account (its clock set by the test)."""

    def __init__(self, user: str, device: str, path: Path | None = None, account: Account | None = None,
                 max_messages: int = 100) -> None:
        self.user, self.device, self.path = user, device, path
        self.account = account if account is not None else Account()
        self.now = 1_000
        self.store = LocalStore(path, user, device)
        sealer = self.store.unlock(SECRET if path is not None else None)
        self.pickle_key = sealer.subkey("olm-pickle")
        self.groups = GroupCrypto(self.store, user, device, self.pickle_key,
                                  RotationPolicy(max_messages=max_messages), pending_per_sender=3,
                                  clock=lambda: self.now)
        self.olm_out: dict[str, Session] = {}
        self.olm_in: dict[str, Session] = {}

    @property
    def cid(self) -> str:
        return f"{self.user}.{self.device}"

    @property
    def record(self) -> DeviceRecord:
        return DeviceRecord(self.user, self.device, self.account.curve25519, self.account.ed25519)

    def reopen(self) -> Device:
        """This device after the app restarted: the same store file (and Olm account)."""
        self.store.close()
        again = Device(self.user, self.device, self.path, self.account, self.groups.policy.max_messages)
        again.olm_out, again.olm_in = self.olm_out, self.olm_in
        return again


def olm_send(sender: Device, recipient: Device, text: str) -> str:
    """``text`` through a real Olm session from ``sender`` to ``recipient``; what the recipient decrypts."""
    if recipient.cid not in sender.olm_out:
        recipient.account.generate_one_time_keys(1)
        key = next(iter(recipient.account.unpublished_one_time_keys().values()))["key"]
        recipient.account.mark_published()
        sender.olm_out[recipient.cid] = sender.account.outbound(recipient.account.curve25519, key)
    wire = sender.olm_out[recipient.cid].encrypt(text.encode(), sender.account.curve25519).to_wire()
    message = Ciphertext.from_wire(wire)
    if sender.cid in recipient.olm_in:
        return recipient.olm_in[sender.cid].decrypt(message).decode()
    session, plaintext = recipient.account.inbound(message)
    recipient.olm_in[sender.cid] = session
    return plaintext.decode()


def members_of(devices: Iterable[Device]) -> set[str]:
    return {d.user for d in devices}


def send(sender: Device, to: Iterable[Device], msg_id: str, text: str, deliver_shares: bool = True
         ) -> tuple[GroupItem, GroupSealed]:
    """``sender`` encrypts for the member devices ``to`` (+ itself); the shares go over Olm."""
    group = [sender, *to]
    sealed = sender.groups.encrypt(GROUP, [d.record for d in group], msg_id, "text", text)
    if deliver_shares:
        by_cid = {d.cid: d for d in group}
        for record in sealed.share_to:
            recipient = by_cid[f"{record.user}.{record.device}"]
            assert sealed.share is not None
            body = olm_send(sender, recipient, sealed.share.encode())
            outcome = recipient.groups.on_share(sender.user, sender.device, body, members_of(group))
            assert outcome.verdict is ShareVerdict.STORED, outcome.reason
    item = GroupItem(Envelope(msg_id, GROUP, sender.user, sender.device), sealed.ciphertext, sender.now, 0)
    return item, sealed


def opened_text(outcome: object) -> str:
    assert isinstance(outcome, Opened), outcome
    return outcome.body


@pytest.fixture
def trio() -> tuple[Device, Device, Device]:
    return Device("alice", "phone"), Device("bob", "phone"), Device("carol", "phone")


def test_members_decrypt_and_only_new_devices_get_shares(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    laptop = Device("alice", "laptop")  # alice's other device: the history copy
    item, sealed = send(alice, [bob, carol, laptop], "m1", "hello group")
    assert sealed.rotated is Rotation.NEW
    assert {r.device for r in sealed.share_to if r.user == "alice"} == {"laptop"}
    assert sealed.share_users() == ("alice", "bob", "carol")
    for device in (bob, carol, laptop):
        outcome = device.groups.decrypt(item)
        assert isinstance(outcome, Opened) and (outcome.body, outcome.type, outcome.index) == ("hello group", "text", 0)
    item2, sealed2 = send(alice, [bob, carol, laptop], "m2", "again")
    assert sealed2.share is None and sealed2.rotated is None
    assert opened_text(bob.groups.decrypt(item2)) == "again"


def test_a_removed_member_cannot_read_what_follows(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    first, sealed1 = send(alice, [bob, carol], "m1", "before")
    assert opened_text(carol.groups.decrypt(first)) == "before"
    later, sealed2 = send(alice, [bob], "m2", "after carol left")  # carol removed
    assert sealed2.rotated is Rotation.MEMBER_LEFT
    assert [r.user for r in sealed2.share_to] == ["bob"]
    assert GroupCiphertext.from_wire(sealed2.ciphertext).session_id != GroupCiphertext.from_wire(
        sealed1.ciphertext).session_id
    assert opened_text(bob.groups.decrypt(later)) == "after carol left"
    # Handed the later ciphertext anyway, carol has no key for it; the session she holds does not open it.
    assert isinstance(carol.groups.decrypt(later), Pending)
    old = GroupStore(carol.store).inbound("alice", "phone", GroupCiphertext.from_wire(sealed1.ciphertext).session_id)
    assert old is not None
    with pytest.raises(CryptoError):
        Inbound.from_pickle(old.pickle, carol.pickle_key).decrypt(GroupCiphertext.from_wire(sealed2.ciphertext).message)
    # A share of the new session offered to her is refused: she is no longer a member.
    assert sealed2.share is not None
    assert carol.groups.on_share("alice", "phone", sealed2.share.encode(), {"alice", "bob"}).verdict \
        is ShareVerdict.NOT_MEMBER


def test_rotation_after_max_messages_and_a_week() -> None:
    alice, bob = Device("alice", "phone", max_messages=3), Device("bob", "phone")
    rotations = [send(alice, [bob], f"m{i}", f"text {i}")[1].rotated for i in range(7)]
    assert rotations == [Rotation.NEW, None, None, Rotation.MESSAGE_LIMIT, None, None, Rotation.MESSAGE_LIMIT]
    alice.now += 7 * DAY_MS
    item, sealed = send(alice, [bob], "m7", "a week later")
    assert sealed.rotated is Rotation.AGE and sealed.share is not None and sealed.share.index == 0
    assert opened_text(bob.groups.decrypt(item)) == "a week later"


def test_a_new_member_reads_from_now_on_only(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    early = [send(alice, [bob], f"m{i}", f"early {i}")[0] for i in range(2)]
    item, sealed = send(alice, [bob, carol], "m2", "welcome carol")
    assert sealed.rotated is None and [r.user for r in sealed.share_to] == ["carol"]
    assert sealed.share is not None and sealed.share.index == 2
    assert opened_text(carol.groups.decrypt(item)) == "welcome carol"
    for old in early:
        outcome = carol.groups.decrypt(old)
        assert isinstance(outcome, Refused) and "unknown message index" in outcome.reason


def test_a_failed_share_is_sent_again_with_the_next_message(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    _, sealed = send(alice, [bob, carol], "m1", "one", deliver_shares=False)
    assert sealed.share_users() == ("bob", "carol")
    alice.groups.share_again(GROUP, "bob")  # the Olm message to bob failed for good
    item, again = send(alice, [bob, carol], "m2", "two")
    assert again.rotated is None and again.share_users() == ("bob",)
    assert again.share is not None and again.share.index == 1
    assert opened_text(bob.groups.decrypt(item)) == "two"


def test_replays_are_refused(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, _ = trio
    item, _ = send(alice, [bob], "m1", "pay 10")
    assert opened_text(bob.groups.decrypt(item)) == "pay 10"
    assert opened_text(bob.groups.decrypt(item)) == "pay 10"  # the same ciphertext again: the id dedups it
    moved = GroupItem(Envelope("m9", GROUP, "alice", "phone"), item.body, item.ts, 0)
    refused = bob.groups.decrypt(moved)
    assert isinstance(refused, Refused) and "does not match the envelope (id)" in refused.reason
    # A second ciphertext at an index already seen (an outbound session rolled back and used again).
    before = GroupStore(alice.store).outbound(GROUP)
    assert before is not None
    genuine, _ = send(alice, [bob], "m2", "pay 20")
    assert opened_text(bob.groups.decrypt(genuine)) == "pay 20"
    rolled_back = Outbound.from_pickle(before.pickle, alice.pickle_key)
    envelope = Envelope("m2", GROUP, "alice", "phone")
    forged = GroupCiphertext(rolled_back.id, rolled_back.encrypt(payload(envelope, "text", "pay 2000"))).to_wire()
    outcome = bob.groups.decrypt(GroupItem(envelope, forged, 0, 0))
    assert isinstance(outcome, Refused) and "replay" in outcome.reason


def test_a_share_forwarded_by_another_member_does_not_let_it_pose_as_the_owner(
        trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    item, sealed = send(alice, [bob, carol], "m1", "from alice")
    assert sealed.share is not None
    # bob passes alice's session key to carol as his own; the server hands alice's message to carol as bob's.
    assert carol.groups.on_share("bob", "phone", sealed.share.encode(), {"alice", "bob", "carol"}).verdict \
        is ShareVerdict.STORED
    posing = carol.groups.decrypt(GroupItem(Envelope("m1", GROUP, "bob", "phone"), item.body, 0, 0))
    assert isinstance(posing, Refused) and "sender" in posing.reason


def test_shares_duplicate_older_and_bad(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    _, first = send(alice, [bob], "m1", "one")
    item, _ = send(alice, [bob], "m2", "two")
    saved = GroupStore(alice.store).outbound(GROUP)
    assert saved is not None
    current = Outbound.from_pickle(saved.pickle, alice.pickle_key)
    later = KeyShare(GROUP, current.id, current.session_key(), current.index)
    assert bob.groups.on_share("alice", "phone", later.encode(), {"alice", "bob"}).verdict is ShareVerdict.DUPLICATE
    assert opened_text(bob.groups.decrypt(item)) == "two"  # the held share (index 0) still reads it
    other = Outbound()
    for body in (KeyShare(GROUP, current.id, other.session_key(), 0).encode(),  # a key of another session
                 KeyShare(GROUP, other.id, other.session_key()[:-8] + "AAAAAAAA", 0).encode(),  # signature broken
                 KeyShare(GROUP, other.id, other.session_key(), 3).encode(),  # wrong index
                 KeyShare("g:other", current.id, later.key, later.index).encode(),  # held for another group
                 '{"t":"group_key"}', "not json"):
        outcome = bob.groups.on_share("alice", "phone", body, {"alice", "bob"})
        assert outcome.verdict is ShareVerdict.BAD and outcome.reason
    # carol joins late and gets index 2; the index-0 share arriving after it reads more: it replaces it.
    members = {"alice", "bob", "carol"}
    assert carol.groups.on_share("alice", "phone", later.encode(), members).verdict is ShareVerdict.STORED
    assert isinstance(carol.groups.decrypt(item), Refused)
    assert first.share is not None
    assert carol.groups.on_share("alice", "phone", first.share.encode(), members).verdict is ShareVerdict.STORED
    assert opened_text(carol.groups.decrypt(item)) == "two"
    assert carol.groups.on_share("alice", "phone", later.encode(), members).verdict is ShareVerdict.DUPLICATE


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.text(), share_body=st.one_of(st.text(), st.builds(
    lambda k, i: KeyShare(GROUP, "A" * 43, k, i).encode(), st.text(min_size=1, max_size=40), st.integers(0, 9))))
def test_any_input_is_an_outcome_never_a_crash(body: str, share_body: str) -> None:
    bob = Device("bob", "phone")
    try:
        assert bob.groups.on_share("alice", "phone", share_body, {"alice", "bob"}).verdict is ShareVerdict.BAD
        outcome = bob.groups.decrypt(GroupItem(Envelope("m1", GROUP, "alice", "phone"), body, 0, 0))
        assert isinstance(outcome, (Refused, Pending))
    finally:
        bob.store.close()


def test_a_message_waits_for_its_key_and_the_wait_is_bounded(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, _ = trio
    sent = [send(alice, [bob], f"m{i}", f"text {i}", deliver_shares=False) for i in range(4)]
    share = sent[0][1].share
    assert share is not None and all(sealed.share is None for _, sealed in sent[1:])
    outcomes = [bob.groups.decrypt(item) for item, _ in sent]
    assert all(isinstance(o, Pending) for o in outcomes)
    last = outcomes[-1]
    assert isinstance(last, Pending) and last.dropped == (sent[0][0],)  # at most 3 kept per sender device
    body = olm_send(alice, bob, share.encode())
    result = bob.groups.on_share("alice", "phone", body, {"alice", "bob"})
    assert result.verdict is ShareVerdict.STORED
    assert [opened_text(o) for o in result.opened] == ["text 1", "text 2", "text 3"]
    assert bob.groups.on_share("alice", "phone", body, {"alice", "bob"}).opened == ()


def test_sessions_replays_and_pending_survive_reopening_the_store(tmp_path: Path) -> None:
    alice = Device("alice", "phone", tmp_path / "alice.db")
    bob = Device("bob", "phone", tmp_path / "bob.db")
    carol = Device("carol", "phone", tmp_path / "carol.db")
    first, _ = send(alice, [bob, carol], "m1", "one")
    assert opened_text(bob.groups.decrypt(first)) == "one"
    waiting, _ = send(alice, [bob, carol], "m2", "two")
    alice, bob = alice.reopen(), bob.reopen()
    item, sealed = send(alice, [bob, carol], "m3", "three")
    assert sealed.share is None and sealed.rotated is None  # the same session, its index moved on
    outcome = bob.groups.decrypt(item)
    assert isinstance(outcome, Opened) and (outcome.body, outcome.index) == ("three", 2)
    assert opened_text(bob.groups.decrypt(waiting)) == "two"
    assert opened_text(bob.groups.decrypt(first)) == "one"
    # carol gets a new member device's message before its share; the pending item survives a restart.
    dave = Device("dave", "phone", tmp_path / "dave.db")
    late, late_sealed = send(dave, [alice, carol], "d1", "from dave", deliver_shares=False)
    assert isinstance(carol.groups.decrypt(late), Pending)
    carol = carol.reopen()
    assert late_sealed.share is not None
    body = olm_send(dave, carol, late_sealed.share.encode())
    result = carol.groups.on_share("dave", "phone", body, {"alice", "carol", "dave"})
    assert [opened_text(o) for o in result.opened] == ["from dave"]
    for device in (alice, bob, carol, dave):
        device.store.close()


def test_an_index_is_kept_only_with_its_commit(trio: tuple[Device, Device, Device]) -> None:
    """The face seals inside its own transaction with the outbox write: a crash (here an exception)
    before the commit leaves nothing, the ciphertext was never published, and the next message
    gets that index; once committed, the next one never does."""
    alice, bob, _ = trio
    send(alice, [bob], "m1", "one")
    with pytest.raises(RuntimeError), alice.store.transaction():
        alice.groups.encrypt(GROUP, [alice.record, bob.record], "m2", "text", "lost in the crash")
        raise RuntimeError("the process dies before the outbox commit")
    item, _ = send(alice, [bob], "m2", "two")
    outcome = bob.groups.decrypt(item)
    assert isinstance(outcome, Opened) and outcome.index == 1
    later, _ = send(alice, [bob], "m3", "three")
    outcome = bob.groups.decrypt(later)
    assert isinstance(outcome, Opened) and outcome.index == 2
