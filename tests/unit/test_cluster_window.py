"""``Windows``: what a cluster node sends each connected device (bridge/cluster/window.py)."""

from __future__ import annotations

from bridge.cluster.store import QueuedItem
from bridge.cluster.window import Alias, Windows
from chatproto import MsgItem


def queued(seq: int, msg_id: str | None = None) -> QueuedItem:
    return QueuedItem(MsgItem(seq, msg_id or f"m{seq}", "alice", "bob", "text", "hi", 0, "phone"), 10**13)


def held_and_sent(windows: Windows, msg_id: str) -> tuple[int, int]:
    """bob.phone caught up with a held item ``msg_id`` in flight: (its local seq, the link)."""
    caught_up(windows, base=1024)
    seq = windows.local_seq("bob.phone")
    assert seq is not None
    out = windows.push_local("bob.phone", queued(seq, msg_id), now=0)
    assert [item.seq for _, item in out.sends] == [seq]
    link = windows.link("bob.phone")
    assert link is not None
    return seq, link


def test_a_store_copy_read_before_the_writer_said_so_is_recognised_and_not_sent_again() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    local, link = held_and_sent(windows, "x1")
    windows.behind(["bob.phone"], now=0)
    out = windows.read_done("bob.phone", 0, [queued(2048, "x1")], limit=10, now=0)
    assert out.sends == [], "the copy of the item in flight, by its sender and id"
    assert windows.split_ack("bob.phone", [local]) == ([local], [2048]), "the local ack acks the copy"
    assert windows.alias("bob.phone", link, local, 2048) == Alias.SET, "the writer's word changes nothing"


def test_a_store_copy_is_not_sent_again_after_the_local_ack_nor_when_written_after_it() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    local, link = held_and_sent(windows, "x1")
    assert windows.alias("bob.phone", link, local, 2048) == Alias.SET
    windows.acked("bob.phone", [local], now=0)  # the ack of the copy is on its way to the store
    windows.behind(["bob.phone"], now=0)
    assert windows.read_done("bob.phone", 0, [queued(2048, "x1")], limit=10, now=0).sends == []
    second = windows.local_seq("bob.phone")
    assert second is not None
    windows.push_local("bob.phone", queued(second, "x2"), now=0)
    windows.acked("bob.phone", [second], now=0)
    assert windows.alias("bob.phone", link, second, 3072) == Alias.ACKED, "acked first: the writer acks the copy"
    windows.behind(["bob.phone"], now=0)
    assert windows.read_done("bob.phone", 2048, [queued(3072, "x2")], limit=10, now=0).sends == []


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
    windows.online("bob.tablet", now=5)
    assert (windows.depths(), windows.linked()) == ([2], 2), "only devices with items have a depth"
    windows.acked("bob.phone", [1, 3], now=6)
    assert windows.depths() == []
    windows.offline("bob.phone")
    assert windows.depth("bob.phone") == 0 and "bob.phone" not in windows


def test_a_failed_read_leaves_the_device_behind() -> None:
    windows = Windows(window=10, redeliver_after_s=5)
    windows.online("bob.phone", now=0)
    windows.read_failed("bob.phone")
    assert windows.acked("bob.phone", [], now=1).reads == [("bob.phone", 0)]


def caught_up(windows: Windows, client_id: str = "bob.phone", base: int = 2048) -> None:
    """Link, reserve a block of local seqs, and read short after it (window rule 4)."""
    windows.online(client_id, now=0)
    link = windows.link(client_id)
    assert link is not None
    windows.set_base(client_id, link, base, now=0)
    out = windows.read_done(client_id, 0, [], limit=10, now=0)  # the first read started before the base
    assert windows.local_seq(client_id) is None, "a read started before the base does not catch up"
    assert out.reads == [(client_id, 0)], "the base asks for a read of its own"
    windows.read_done(client_id, 0, [], limit=10, now=0)


def test_local_seqs_only_once_caught_up_above_everything_read_and_below_the_next_store_seq() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    windows.online("bob.phone", now=0)
    assert windows.local_seq("bob.phone") is None, "no block of local seqs yet"
    caught_up(windows)
    assert windows.local_seq("bob.phone") == 2049
    assert windows.local_seq("bob.phone") == 2050
    windows.behind(["bob.phone"], now=0)
    windows.read_done("bob.phone", 0, [queued(3072)], limit=10, now=0)  # a store seq: SEQ_STRIDE above the base
    assert windows.local_seq("bob.phone") == 3073, "above the store seq just read"


def test_local_seqs_run_out_after_a_stride_and_a_full_window_takes_no_held_item() -> None:
    windows = Windows(window=2, redeliver_after_s=30)
    caught_up(windows, base=1024)
    for _ in range(1023):
        windows.local_seq("bob.phone")
    assert windows.local_seq("bob.phone") is None, "every seq between the base and the next store seq is used"
    other = Windows(window=2, redeliver_after_s=30)
    caught_up(other, base=1024)
    for _ in range(2):
        seq = other.local_seq("bob.phone")
        assert seq is not None
        other.push_local("bob.phone", queued(seq), now=0)
    assert not other.can_hold("bob.phone"), "two held items in flight fill the window"
    other.acked("bob.phone", [1025], now=1)
    assert other.can_hold("bob.phone")


def test_a_held_item_goes_after_what_is_buffered_and_its_store_copy_is_not_sent_again() -> None:
    windows = Windows(window=1, redeliver_after_s=30)
    caught_up(windows, base=1024)
    windows.behind(["bob.phone"], now=0)
    out = windows.read_done("bob.phone", 0, [queued(2048), queued(3072)], limit=10, now=0)
    assert [item.seq for _, item in out.sends] == [2048]
    windows.acked("bob.phone", [2048], now=0)  # 3072 is now in flight, the window (1) is full
    assert not windows.can_hold("bob.phone")
    windows.acked("bob.phone", [3072], now=0)
    seq = windows.local_seq("bob.phone")
    assert seq == 3073
    out = windows.push_local("bob.phone", queued(seq), now=0)
    assert [item.seq for _, item in out.sends] == [3073]
    link = windows.link("bob.phone")
    assert link is not None
    assert windows.alias("bob.phone", link, 3073, 4096) == Alias.SET, "written to the store as 4096"
    assert windows.alias("bob.phone", link + 1, 3073, 4096) == Alias.GONE, "not for another link"
    windows.behind(["bob.phone"], now=0)
    out = windows.read_done("bob.phone", 3072, [queued(4096)], limit=10, now=0)
    assert out.sends == [], "the store copy of an item in flight is not sent again"
    assert windows.split_ack("bob.phone", [3073]) == ([3073], [4096]), "the ack of the local seq acks the copy"
    windows.acked("bob.phone", [3073], now=1)
    assert windows.split_ack("bob.phone", [3073]) == ([], [3073])
    assert windows.depth("bob.phone") == 0


def test_a_device_has_read_past_a_tail_only_once_a_read_returned_it() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    caught_up(windows, base=1024)
    assert windows.read_past("bob.phone", 0) and not windows.read_past("bob.phone", 2048)
    windows.behind(["bob.phone"], now=0)
    windows.read_done("bob.phone", 0, [queued(2048)], limit=10, now=0)
    assert windows.read_past("bob.phone", 2048), "staged before the held item: read, so it goes first"
    assert not windows.read_past("carol.phone", 0), "not linked here"


def test_the_users_with_a_device_linked_here_are_known() -> None:
    windows = Windows(window=10, redeliver_after_s=30)
    windows.online("bob.phone", now=0)
    windows.online("bob.tablet", now=0)
    windows.online("bob.phone", now=1)  # a relink counts once
    windows.offline("bob.phone")
    assert windows.has_user("bob") and not windows.has_user("carol")
    windows.offline("bob.tablet")
    windows.offline("bob.tablet")
    assert not windows.has_user("bob")
