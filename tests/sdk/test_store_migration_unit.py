"""A store file written before the inbox had a ``kind`` column (schema 2) opens with this SDK:
its rows are kept, and rows the old SDK wrote in its own forms are told from wire rows once."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from pathlib import Path

import pytest

from chatproto import MsgItem, ReceiptItem
from client_sdk.events import Event, Message, Receipt, Undecryptable
from client_sdk.inbox import Inbox
from client_sdk.localstore import MIGRATIONS, LocalStore, RowKind
from client_sdk.securestore import CHECK_TEXT, Sealer, derive_key

SECRET = b"the app's secret"
OLD_VERSION = 2


def old_rows() -> dict[int, str]:
    """Inbox rows as schema-2 SDKs wrote them: wire items compact, their own forms by ``json.dumps``."""
    return {
        4: MsgItem(4, "m4", "alice", "bob", "text", "plain hi", 1004).encode().decode(),
        5: json.dumps({"kind": "opened", "seq": 5, "id": "m5", "from": "alice", "to": "bob", "dev": "laptop",
                       "type": "text", "body": "secret hi", "ts": 1005}),
        6: json.dumps({"kind": "undecryptable", "seq": 6, "id": "m6", "from": "alice", "to": "bob",
                       "dev": "laptop", "reason": "no session for it", "ts": 1006}),
        7: ReceiptItem("seen", ("x1",), "carol", 1007, seq=7).encode().decode(),
    }


def write_old_store(path: Path, sealed: bool) -> None:
    """A schema-2 file for bob.phone: sealed with SECRET (or from before sealing), with a token,
    a handed-over seq, an outbox message and four staged rows."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:OLD_VERSION], start=1):
        db.executescript(f"BEGIN;\n{script};\nPRAGMA user_version = {number};\nCOMMIT;")
    salt = secrets.token_hex(16)
    sealer = Sealer(derive_key(SECRET, bytes.fromhex(salt))) if sealed else None

    def seal(text: str, where: str) -> str:
        return text if sealer is None else sealer.seal(text, where)

    meta = {"identity": "bob.phone", "last_seq": "3", "token": seal("dt1.bob", "meta:token")}
    if sealer is not None:
        meta |= {"kdf_salt": salt, "key_check": seal(CHECK_TEXT, "meta:key_check")}
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
    db.execute("INSERT INTO outbox (id, recipient, body, type, ts) VALUES ('o1', 'carol', ?, 'text', 1)",
               (seal("queued", "outbox:o1"),))
    db.executemany("INSERT INTO inbox (seq, item, received_ms) VALUES (?, ?, 1)",
                   [(seq, seal(text, f"inbox:{seq}")) for seq, text in old_rows().items()])
    db.close()
    os.chmod(path, 0o600)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "from-before-sealing"])
def test_an_old_store_opens_and_keeps_its_rows(tmp_path: Path, sealed: bool) -> None:
    path = tmp_path / "bob.db"
    write_old_store(path, sealed)

    store = LocalStore(path, "bob", "phone")
    store.unlock(SECRET)
    assert [(row.seq, row.kind) for row in store.staged()] == [
        (4, RowKind.WIRE), (5, RowKind.OPENED), (6, RowKind.UNDECRYPTABLE), (7, RowKind.WIRE)]
    assert {row.seq: row.item for row in store.staged()} == old_rows()
    assert (store.token(), store.last_seq()) == ("dt1.bob", 3)
    assert [(m.id, m.to, m.body) for m in store.outbox_all()] == [("o1", "carol", "queued")]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("SELECT count(*) FROM inbox WHERE kind IS NULL").fetchone()[0] == 0

    store = LocalStore(path, "bob", "phone")  # opened again: nothing left to migrate
    store.unlock(SECRET)
    events: list[Event] = []
    acked: list[int] = []
    assert Inbox(store).hand_over(lambda e: events.append(e) is None, acked.append)
    store.close()
    assert acked == [4, 5, 6, 7]
    plain, opened, undecryptable, receipt = events
    assert isinstance(plain, Message) and (plain.id, plain.body, plain.encrypted) == ("m4", "plain hi", False)
    assert isinstance(opened, Message) and (opened.id, opened.body, opened.device, opened.encrypted) == (
        "m5", "secret hi", "laptop", True)
    assert isinstance(undecryptable, Undecryptable)
    assert (undecryptable.id, undecryptable.reason) == ("m6", "no session for it")
    assert isinstance(receipt, Receipt) and (receipt.status, receipt.ids) == ("seen", ("x1",))
