"""The SDK's reaction to a peer's reinstall, without a network (a fake key directory answers
``keys.list``/``keys.claim``): every sealed message states the identity key each ciphertext was
encrypted to; a ``stale`` refusal makes the next sealing fetch the list again, warn
``IdentityChanged``, drop the old install's session and encrypt to the new install (which can
decrypt it); what the outbox kept from an older SDK (bodies alone) is still read."""

from __future__ import annotations

import json
from typing import Any

from chatproto import OP_KEYS_CLAIM, OP_KEYS_LIST
from client_sdk.crypto import Account, Ciphertext
from client_sdk.e2e import E2E, Sealed
from client_sdk.events import Event, IdentityChanged
from client_sdk.localstore import LocalStore, OutMessage


class Directory:
    """bob.phone's published keys, as the server would list and hand them out."""

    def __init__(self) -> None:
        self.install(Account())

    def install(self, account: Account) -> None:
        account.generate_one_time_keys(3)
        self.account = account
        self.one_time = list(account.unpublished_one_time_keys().items())
        account.mark_published()

    def call(self, op: str, args: dict[str, Any]) -> Any:
        if args["user"] != "bob":
            return {"user": args["user"], "devices": {}}
        if op == OP_KEYS_LIST:
            return {"user": "bob", "devices": {"phone": self.account.device_keys("bob", "phone")}}
        assert op == OP_KEYS_CLAIM
        key_id, key = self.one_time.pop(0)
        return {"user": "bob", "devices": {"phone": {"id": key_id, **key, "fallback": False}}}


def alice(directory: Directory, warnings: list[Event]) -> tuple[E2E, LocalStore]:
    store = LocalStore(None, "alice", "phone")
    sealer = store.unlock(None)
    return E2E(store, "alice", "phone", sealer.subkey("olm-pickle"), directory.call, warnings.append), store


def queued(store: LocalStore, msg_id: str) -> OutMessage:
    message = OutMessage(msg_id, "bob", f"text of {msg_id}", "text", 0)
    store.outbox_add(message)
    return message


def opens_for(account: Account, sealed: Sealed) -> str:
    _session, plaintext = account.inbound(Ciphertext.from_wire(sealed.bodies["bob.phone"]))
    return str(json.loads(plaintext)["body"])


def test_stale_refusal_reencrypts_for_the_new_install() -> None:
    directory = Directory()
    warnings: list[Event] = []
    e2e, store = alice(directory, warnings)
    old = directory.account
    first = e2e.bodies_for(queued(store, "m1"))
    assert first.keys == {"bob.phone": old.curve25519}
    assert opens_for(old, first) == "text of m1"
    directory.install(Account())  # bob reinstalls under the same device id
    message = queued(store, "m2")
    stale = e2e.bodies_for(message)
    assert stale.keys == {"bob.phone": old.curve25519}, "the cached list still has the old install"
    assert e2e.bodies_for(message) == stale, "kept: a re-send is identical"
    assert len(directory.one_time) == 3, "nothing claimed from the new install yet"
    e2e.on_mismatch("m2", (), (), ("bob.phone",))
    assert not warnings, "nothing is fetched or dropped on paho's thread"
    fresh = e2e.bodies_for(message)
    assert fresh.keys == {"bob.phone": directory.account.curve25519}
    assert len(directory.one_time) == 2, "one one-time key of the new install claimed"
    assert opens_for(directory.account, fresh) == "text of m2"
    [warning] = warnings
    assert isinstance(warning, IdentityChanged) and (warning.user, warning.device) == ("bob", "phone")
    assert len(store.sessions_of("bob", "phone")) == 1, "the old install's session is gone"


def test_outbox_bodies_of_an_older_sdk_are_sent_without_keys() -> None:
    assert Sealed.from_json(json.dumps({"bob.phone": "ct"})) == Sealed({"bob.phone": "ct"}, None)
    sealed = Sealed({"bob.phone": "ct", "alice.tab": "ct2"}, {"bob.phone": "K1", "alice.tab": "K2"})
    assert Sealed.from_json(sealed.to_json()) == sealed
