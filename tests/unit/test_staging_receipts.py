"""Receipt rules of the staging core (PROTOCOL.md delivery rules 6 and 11): seen costs a send token,
pending seen receipts coalesce, and per message a sender's device gets sent, delivered, seen in order."""

from __future__ import annotations

import dataclasses
from typing import Any

from bridge.messaging.core import Staging
from bridge.messaging.records import StagingOutcome
from chatproto import MAX_IDS_PER_ITEM
from tests.unit.test_staging import RULES, core, kinds, msg


def queued(s: Staging, device: str) -> list[tuple[str, list[str], str]]:
    """(status, ids, peer) of the receipts waiting for ``device``, in seq order."""
    box = s.boxes[device]
    return [(i.receipt["status"], i.receipt["ids"], i.receipt["peer"]) for i in box.items.values() if i.receipt]


def receipts(out: StagingOutcome) -> list[tuple[str, str, Any]]:
    """The receipts an outcome sends, in the order the shell sends them: notices first."""
    return [(device, item.status, list(item.ids)) for device, item in [*out.notices, *out.deliveries]
            if item.KIND == "receipt"]


def test_a_repeated_seen_report_merges_into_the_pending_receipt() -> None:
    s = core()
    s.seen("bob", "alice", ["m1", "m2"], "bob.phone", 1000, 0.0)
    s.seen("bob", "alice", ["m2", "m3"], "bob.phone", 1001, 0.1)
    assert queued(s, "alice.phone") == [("seen", ["m1", "m2", "m3"], "bob")]
    assert s.counters.receipts_coalesced == 1


def test_no_merge_across_peers_statuses_or_later_items() -> None:
    s = core()
    s.seen("bob", "alice", ["m1"], "bob.phone", 1000, 0.0)
    s.seen("carol", "alice", ["c1"], "carol.x", 1000, 0.0)  # another peer
    s.seen("carol", "alice", ["c2"], "carol.x", 1000, 0.0)  # merges: carol's is the tail
    s.seen("bob", "alice", ["m2"], "bob.phone", 1000, 0.0)  # bob's pending one is not the tail: no merge
    assert queued(s, "alice.phone") == [("seen", ["m1"], "bob"), ("seen", ["c1", "c2"], "carol"),
                                        ("seen", ["m2"], "bob")]


def test_no_merge_into_a_receipt_already_sent_to_the_device() -> None:
    s = core()
    s.device_online("alice.phone", 0.0)
    first = s.seen("bob", "alice", ["m1"], "bob.phone", 1000, 0.0)
    assert receipts(first) == [("alice.phone", "seen", ["m1"])]
    later = s.seen("bob", "alice", ["m2"], "bob.phone", 1001, 0.1)
    assert receipts(later) == [("alice.phone", "seen", ["m2"])]  # the first is in flight: left alone
    assert queued(s, "alice.phone") == [("seen", ["m1"], "bob"), ("seen", ["m2"], "bob")]


def test_a_merge_stops_at_the_id_cap() -> None:
    s = core()
    full = [f"a{i}" for i in range(MAX_IDS_PER_ITEM)]
    s.seen("bob", "alice", full, "bob.phone", 1000, 0.0)
    s.seen("bob", "alice", full[:10], "bob.phone", 1000, 0.0)  # all known: still fits
    s.seen("bob", "alice", ["b1"], "bob.phone", 1000, 0.0)  # would exceed the cap: a new receipt
    assert [len(ids) for _, ids, _ in queued(s, "alice.phone")] == [MAX_IDS_PER_ITEM, 1]


def test_merging_into_a_written_receipt_deletes_its_row_with_the_new_write() -> None:
    s = core()
    s.seen("bob", "alice", ["m1"], "bob.phone", 1000, 0.0)
    batch = s.take_flush(1.0)
    assert batch is not None
    s.flush_done(batch)
    (old_seq,) = s.boxes["alice.phone"].items
    s.seen("bob", "alice", ["m2"], "bob.phone", 1001, 1.0)
    batch = s.take_flush(2.0)
    assert batch is not None and batch.deleted_items == [("alice.phone", old_seq)]
    assert [i.receipt["ids"] for i in batch.items if i.receipt] == [["m1", "m2"]]


def test_seen_costs_a_send_token_and_respects_the_queue_bound() -> None:
    s = core(burst=2)
    assert kinds(s.seen("bob", "alice", ["m1"], "bob.phone", 1000, 0.0)) == []
    s.submit("bob.phone", "bob", msg("b1", to="alice"), 1000, 0.0)  # the same bucket as messages
    assert kinds(s.seen("bob", "alice", ["m2"], "bob.phone", 1000, 0.0)) == [("bob.phone", "rate_limited", None)]
    assert queued(s, "alice.phone") == [("seen", ["m1"], "bob")]
    small = core(rules=dataclasses.replace(RULES, max_queue=1))
    small.submit("carol.x", "carol", msg("c1", to="alice"), 1000, 0.0)
    assert kinds(small.seen("bob", "alice", ["m1"], "bob.phone", 1000, 0.0)) == [("bob.phone", "queue_full", None)]


def test_seen_before_sent_waits_for_sent_and_delivered() -> None:
    s = core()
    for device in ("alice.phone", "bob.phone"):
        s.device_online(device, 0.0)
    seq = s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0).deliveries[0][1].seq
    out = s.ack("bob.phone", [seq], 1001, 0.01)  # bob.laptop (offline) keeps 'sent' back until the flush
    later = s.seen("bob", "alice", ["m1"], "bob.phone", 1002, 0.02)
    out.notices += later.notices
    out.deliveries += later.deliveries
    assert receipts(out) == []
    batch = s.take_flush(1.0)
    assert batch is not None
    done = s.flush_done(batch)  # 'delivered' goes out now and stands for 'sent' (folded)
    assert receipts(done) == [("alice.phone", "delivered", ["m1"]), ("alice.phone", "seen", ["m1"])]
    assert [r.status for r in done.folded] == ["sent"]


def test_seen_before_any_ack_stages_delivered_first_and_only_once() -> None:
    s = core()
    for device in ("alice.phone", "bob.phone", "bob.laptop"):
        s.device_online(device, 0.0)
    out = s.submit("alice.phone", "alice", msg("m1"), 1000, 0.0)
    seqs = {device: item.seq for device, item in out.deliveries}
    batch = s.take_flush(1.0)
    assert batch is not None
    assert receipts(s.flush_done(batch)) == [("alice.phone", "sent", ["m1"])]
    seen = s.seen("bob", "alice", ["m1"], "bob.phone", 1002, 1.1)  # the app showed it before the SDK acked
    assert receipts(seen) == [("alice.phone", "delivered", ["m1"]), ("alice.phone", "seen", ["m1"])]
    assert receipts(s.ack("bob.phone", [seqs["bob.phone"]], 1003, 1.2)) == []
    assert receipts(s.ack("bob.laptop", [seqs["bob.laptop"]], 1004, 1.3)) == []
