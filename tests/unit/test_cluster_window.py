"""``Windows``: what a cluster node sends each connected device (bridge/cluster/window.py)."""

from __future__ import annotations

from bridge.cluster.store import QueuedItem
from bridge.cluster.window import Windows
from chatproto import MsgItem


def queued(seq: int) -> QueuedItem:
    return QueuedItem(MsgItem(seq, f"m{seq}", "alice", "bob", "text", "hi", 0, "phone"), 10**13)


def test_linking_reads_from_the_start_and_sends_at_most_a_window() -> None:
    windows = Windows(window=2, redeliver_after_s=30)
    out = windows.online("bob.phone", now=0)
    assert out.reads == [("bob.phone", 0)] and out.sends == []
    out = windows.read_done("bob.phone", 0, [queued(1), queued(2)], limit=2, now=0)
    assert [item.seq for _, item in out.sends] == [1, 2]
    assert out.reads == [], "the window is full: no read until an ack"
    out = windows.acked("bob.phone", [1], now=1)
    assert out.reads == [("bob.phone", 2)], "a full read means more may wait"
    out = windows.read_done("bob.phone", 2, [queued(3)], limit=2, now=1)
    assert [item.seq for _, item in out.sends] == [3]


def test_one_read_at_a_time_and_a_nudge_during_a_read_reads_again() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    windows.online("bob.phone", now=0)
    assert windows.behind(["bob.phone"], now=0).reads == [], "a read is under way"
    out = windows.read_done("bob.phone", 0, [queued(1)], limit=10, now=0)
    assert [item.seq for _, item in out.sends] == [1]
    assert out.reads == [("bob.phone", 1)], "the nudge came during the read: read after what was read"
    out = windows.read_done("bob.phone", 1, [], limit=10, now=0)
    assert out.reads == [] and out.sends == []


def test_nudges_for_devices_elsewhere_are_ignored_and_a_relink_starts_over() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    assert windows.behind(["carol.phone"], now=0).reads == []
    windows.online("bob.phone", now=0)
    windows.read_done("bob.phone", 0, [queued(1), queued(2)], limit=10, now=0)
    out = windows.online("bob.phone", now=1)
    assert out.reads == [("bob.phone", 0)], "unacked items go again after a relink"
    stale = windows.read_done("bob.phone", 5, [queued(6)], limit=10, now=1)
    assert stale.sends == [], "a read of the old link is not used"


def test_unacked_items_go_again_in_send_order() -> None:
    windows = Windows(window=10, redeliver_after_s=5)
    windows.online("bob.phone", now=0)
    windows.read_done("bob.phone", 0, [queued(1), queued(2), queued(3)], limit=10, now=0)
    windows.acked("bob.phone", [2], now=1)
    assert windows.redeliver(now=4).sends == []
    out = windows.redeliver(now=5)
    assert [item.seq for _, item in out.sends] == [1, 3]
    assert windows.redeliveries == 2
    assert windows.depth("bob.phone") == 2
    windows.offline("bob.phone")
    assert windows.depth("bob.phone") == 0 and "bob.phone" not in windows


def test_a_failed_read_leaves_the_device_behind() -> None:
    windows = Windows(window=10, redeliver_after_s=5)
    windows.online("bob.phone", now=0)
    windows.read_failed("bob.phone")
    assert windows.acked("bob.phone", [], now=1).reads == [("bob.phone", 0)]
