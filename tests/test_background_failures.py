"""No background task dies silently (chatserver/supervisor.py), through the real broker.

A fault is injected into the real staging store's group commit (tests/faults.py):
a ``RuntimeError``, what a bug or unencodable text raises, not a ``StoreError``.
Before the supervision, the first one ended the flush task: no sender got ``sent``
again, nothing was logged, ``/readyz`` stayed 200, and shutdown could hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.sqlite.messages import SqliteMessageStore
from storage.sqlite.presence import SqlitePresenceStore
from tests import faults
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually, online_peer, register_offline
from tests.observe import LoggedBroker, base_url, get, scrape

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture
def fault() -> Iterator[None]:
    original = faults.install()
    yield
    faults.ARMED.clear()
    SqliteMessageStore.commit = original  # type: ignore[method-assign]




def answer(peer: Peer) -> dict[str, Any]:
    """The next receipt or error."""
    return peer.expect(lambda i: i.get("kind") in ("receipt", "error"))


def bob_receives(port: int, ids: list[str]) -> None:
    made: list[Peer] = []
    try:
        bob = online_peer(port, made, "bob")
        got = [bob.expect(lambda i: i.get("kind") == "msg")["id"] for _ in ids]
        assert got == ids
        assert bob.nothing_arrives(0.3), "nothing else (no dropped message) arrives"
    finally:
        for peer in made:
            peer.close()


def test_failing_commits_are_logged_counted_not_ready_and_retried(
        tmp_path: Path, fault: None, caplog: pytest.LogCaptureFixture) -> None:
    broker = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    made: list[Peer] = []
    try:
        broker.add_users(PASSWORDS)
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        assert get(base_url(broker) + "/readyz")[0] == 200
        faults.ARMED.set()
        with caplog.at_level(logging.ERROR, "chatserver.supervisor"):
            alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "one"})
            told = answer(alice)
            assert (told["kind"], told["code"], told["ref"]) == ("error", "internal", "m1"), told
            status, body = get(base_url(broker) + "/readyz")
            assert status == 503 and "background task flush failing" in body and "RuntimeError" in body, body
            assert scrape(broker).value("chat_background_failures_total", task="flush") >= 1
            assert scrape(broker).value("chat_background_failures_total", task="sweep") == 0
            failed = [r for r in caplog.records if r.getMessage() == "background task flush failed, retrying"]
            assert failed and failed[0].exc_info is not None and "injected" in str(failed[0].exc_info[1])
            faults.ARMED.clear()
            sent = answer(alice)
        assert (sent["kind"], sent.get("status"), sent.get("ids")) == ("receipt", "sent", ["m1"]), sent
        eventually(lambda: get(base_url(broker) + "/readyz")[0] == 200, what="ready again")
        bob_receives(broker.port, ["m1"])
    finally:
        for peer in made:
            peer.close()
        broker.stop()


def test_one_unwritable_message_does_not_hold_back_the_others(tmp_path: Path, fault: None) -> None:
    """Its sender is told it was dropped; every other message gets 'sent' and survives a restart."""
    data = tmp_path / "data"
    broker = BrokerThread(data).start()
    made: list[Peer] = []
    try:
        broker.add_users(PASSWORDS)
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        alice.publish("u/alice/out", {"id": "p1", "to": "bob", "body": faults.POISON})
        ids = [f"n{n}" for n in range(5)]
        for msg_id in ids:
            alice.publish("u/alice/out", {"id": msg_id, "to": "bob", "body": "fine"})
        sent: list[str] = []
        dropped = False
        deadline = time.monotonic() + WAIT_S
        while (len(sent) < len(ids) or not dropped) and time.monotonic() < deadline:
            item = answer(alice)
            if item["kind"] == "receipt":
                assert item["status"] == "sent" and "p1" not in item["ids"], item
                sent += item["ids"]
            else:
                assert (item["code"], item["ref"]) == ("internal", "p1"), item
                dropped = dropped or "dropped" in item["detail"]
        assert sent == ids and dropped
    finally:
        for peer in made:
            peer.close()
        broker.stop()
    again = BrokerThread(data).start()
    try:
        bob_receives(again.port, ids)
    finally:
        again.stop()


def test_sigterm_with_an_unwritable_message_pending_ends_and_says_what_was_lost(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(faults.sitecustomize_dir(tmp_path / "site"))}
    broker = LoggedBroker(tmp_path / "data", [], env=env)
    broker.add_users(PASSWORDS)
    broker.start()
    made: list[Peer] = []
    try:
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        alice.publish("u/alice/out", {"id": "p1", "to": "bob", "body": faults.POISON})
        eventually(lambda: "background task flush failed" in broker.log_path.read_text(), what="the failure logged")
        told = answer(alice)
        assert (told["kind"], told["code"], told["ref"]) == ("error", "internal", "p1"), told
    finally:
        for peer in made:
            peer.close()
        log = broker.stop()  # asserts exit code 0 within 30 s
    assert "RuntimeError: injected commit fault" in log
    assert "shutdown: could not write 1 message(s) [alice/p1]" in log, log[-2000:]
    assert log.rstrip().endswith("stopped"), log[-500:]


def test_a_failed_last_seen_batch_is_kept_and_written_by_the_next(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    original = SqlitePresenceStore.save_last_seen
    failures: list[int] = []

    async def fails_once(self: SqlitePresenceStore, rows: list[tuple[str, int]]) -> None:
        if not failures:
            failures.append(len(rows))
            raise RuntimeError("injected last-seen fault")
        await original(self, rows)

    monkeypatch.setattr(SqlitePresenceStore, "save_last_seen", fails_once)
    broker = BrokerThread(tmp_path / "data", {"presence.persist_s": 0.05}).start()
    made: list[Peer] = []
    try:
        broker.add_users(PASSWORDS)
        alice = online_peer(broker.port, made, "alice")
        alice.publish("u/alice/hb", b"{}")
        eventually(lambda: broker.app.presence.stats()["rows_written"] >= 1, what="alice's last-seen written")
        assert failures == [1], "the one row of the failed batch is the one written after it"
        assert broker.app.supervisor.failures == {"presence_persist": 1}
        assert broker.app.supervisor.problems() == []
    finally:
        for peer in made:
            peer.close()
        broker.stop()


def test_a_commit_under_way_at_shutdown_is_written_by_the_last_flush(tmp_path: Path, fault: None) -> None:
    """SIGTERM cancels the flusher in the middle of a commit: what it held is written by the last flush."""
    data = tmp_path / "data"
    broker = BrokerThread(data).start()
    made: list[Peer] = []
    try:
        broker.add_users(PASSWORDS)
        register_offline(broker.port, "bob")
        alice = online_peer(broker.port, made, "alice")
        faults.HANG.set()
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "caught mid-commit"})
        eventually(lambda: not faults.HANG.is_set(), what="the commit under way")
    finally:
        for peer in made:
            peer.close()
        broker.stop()
    again = BrokerThread(data).start()
    try:
        bob_receives(again.port, ["m1"])
    finally:
        again.stop()
