"""The SDK's crypto building blocks without a network: signed keys are accepted only when
their signatures verify, Olm messages round-trip through the wire form (also out of order),
the store key seals values bound to their place, and fingerprints/safety numbers behave."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client_sdk import keys as K
from client_sdk.crypto import Account, Ciphertext, CryptoError, verify
from client_sdk.errors import StoreError
from client_sdk.localstore import DeviceRecord, LocalStore
from client_sdk.outbox import MAX_MISMATCHES, ErrorVerdict, error_verdict
from client_sdk.securestore import Sealer, derive_key


def record_of(account: Account, user: str = "bob", device: str = "phone") -> DeviceRecord:
    found = K.check_device_keys(user, device, account.device_keys(user, device))
    assert found is not None
    return found


def test_device_keys_verify_only_untampered_and_for_the_listed_device() -> None:
    account = Account()
    signed = account.device_keys("bob", "phone")
    assert verify(signed, account.ed25519)
    assert record_of(account).curve25519 == account.curve25519
    assert K.check_device_keys("bob", "laptop", signed) is None  # listed under another device
    assert K.check_device_keys("carol", "phone", signed) is None
    other = Account()
    swapped = {**signed, "curve25519": other.curve25519}  # the server swaps in its own identity key
    assert K.check_device_keys("bob", "phone", swapped) is None
    resigned = other.sign({**signed, "ed25519": account.ed25519})  # signed by a key that is not the listed one
    assert K.check_device_keys("bob", "phone", resigned) is None


def test_claimed_one_time_keys_must_be_signed_by_the_device() -> None:
    bob = Account()
    bob.generate_one_time_keys(2)
    keys = bob.unpublished_one_time_keys()
    key_id, offered = next(iter(keys.items()))
    record = record_of(bob)
    assert K.check_claimed_key(record, {"id": key_id, **offered}) == offered["key"]
    other_id, other = list(keys.items())[1]
    assert K.check_claimed_key(record, {"id": key_id, "key": other["key"], "signature": offered["signature"]}) is None
    assert K.check_claimed_key(record, {"id": other_id, **offered}) is None  # signature binds the id too
    forged = Account().sign({"id": key_id, "key": offered["key"]})
    assert K.check_claimed_key(record, forged) is None


def test_olm_round_trip_out_of_order_with_gaps_and_no_replay() -> None:
    alice, bob = Account(), Account()
    bob.generate_one_time_keys(1)
    one_time = next(iter(bob.unpublished_one_time_keys().values()))["key"]
    bob.mark_published()
    outbound = alice.outbound(bob.curve25519, one_time)
    wire = [outbound.encrypt(f"m{i}".encode(), alice.curve25519).to_wire() for i in range(6)]
    first = Ciphertext.from_wire(wire[3])
    assert first.sender_key == alice.curve25519
    inbound, plaintext = bob.inbound(first)
    assert plaintext == b"m3"
    for i in (5, 0, 2):  # 1 and 4 never arrive
        assert inbound.decrypt(Ciphertext.from_wire(wire[i])) == f"m{i}".encode()
    with pytest.raises(CryptoError):
        inbound.decrypt(Ciphertext.from_wire(wire[0]))
    reply = inbound.encrypt(b"back", bob.curve25519)
    assert reply.type == 1 and reply.sender_key == ""
    assert outbound.decrypt(Ciphertext.from_wire(reply.to_wire())) == b"back"


@pytest.mark.parametrize("text", ["", "2.0.x.AAAA", "1.7..AAAA", "1.0.x.not base64!", "1.1"])
def test_malformed_ciphertext_is_refused(text: str) -> None:
    with pytest.raises(CryptoError):
        Ciphertext.from_wire(text)


def test_device_list_diff_names_identity_changes() -> None:
    a, b, c = (DeviceRecord("bob", d, f"c{d}", f"e{d}") for d in ("a", "b", "c"))
    reinstalled = DeviceRecord("bob", "b", "cb2", "eb2")
    diff = K.diff_devices({"a": a, "b": b}, {"b": reinstalled, "c": c})
    assert diff.added == (c,)
    assert diff.removed == ("a",)
    assert diff.changed == ((b, reinstalled),)


@pytest.mark.parametrize(("on_server", "unpublished", "expected"), [
    (0, 0, 50), (24, 0, 26), (25, 0, 0), (10, 40, 0), (0, 50, 0),
])
def test_one_time_keys_are_topped_up_to_the_account_maximum(on_server: int, unpublished: int, expected: int) -> None:
    assert K.keys_to_generate(on_server, unpublished, 50) == expected


def test_fingerprints_and_safety_numbers() -> None:
    alice, bob, bob2 = Account(), Account(), Account()
    assert K.fingerprint(alice.ed25519).replace(" ", "") == alice.ed25519
    mine = K.safety_number("alice", [alice.ed25519], "bob", [bob.ed25519])
    assert mine == K.safety_number("bob", [bob.ed25519], "alice", [alice.ed25519])
    assert len(mine.replace(" ", "")) == 60 and mine.replace(" ", "").isdigit()
    assert mine != K.safety_number("alice", [alice.ed25519], "bob", [bob.ed25519, bob2.ed25519])


def test_sealed_values_open_only_in_their_place_with_their_key() -> None:
    key = derive_key(b"secret", b"salt" * 4, n=2 ** 10)
    sealer = Sealer(key)
    sealed = sealer.seal("hello \ud800", "outbox:m1")
    assert "hello" not in sealed
    assert sealer.open(sealed, "outbox:m1") == "hello \ud800"
    with pytest.raises(StoreError):
        sealer.open(sealed, "outbox:m2")
    with pytest.raises(StoreError):
        Sealer(derive_key(b"other", b"salt" * 4, n=2 ** 10)).open(sealed, "outbox:m1")
    assert sealer.subkey("olm-pickle") != key


def test_store_refuses_a_wrong_secret_and_keeps_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "bob.db"
    store = LocalStore(path, "bob", "phone")
    store.unlock(b"right")
    store.set_token("tok-123")
    store.close()
    store = LocalStore(path, "bob", "phone")
    with pytest.raises(StoreError, match="another key"):
        store.unlock(b"wrong")
    store.unlock(b"right")
    assert store.token() == "tok-123"
    store.close()
    assert b"tok-123" not in path.read_bytes()
    keyed = LocalStore(tmp_path / "carol.db", "carol", "phone")
    keyed.unlock(None)
    keyed.close()
    mode = os.stat(tmp_path / "carol.db.key").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_devices_mismatch_is_rebuilt_a_bounded_number_of_times() -> None:
    verdicts = [error_verdict("devices_mismatch", True, n) for n in range(MAX_MISMATCHES + 1)]
    assert verdicts == [ErrorVerdict.REBUILD] * MAX_MISMATCHES + [ErrorVerdict.DROPPED]
    assert error_verdict("no_keys", True) is ErrorVerdict.HOLD  # waits for the first device, never dropped
    assert error_verdict("devices_mismatch", False) is ErrorVerdict.NOT_OURS
