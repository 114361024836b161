"""Cluster presence, the pure parts: the core's mirror of users on other nodes (rule 8 of
bridge/presence/core.py), the lease arithmetic and the re-read heap (bridge/cluster/presence_state.py).

Proves: a user online on another node is online to watchers here, through the same rules 5-6
(coalescing included); local and remote foreground add up; a mirrored privacy or contact change
reaches watchers here (reciprocity too); local foreground transitions are reported; ``forget``
keeps what is still needed; a lease outlasts every window a heartbeat can open before the next
renewal; re-reads come due once, at the latest time armed.
"""

from __future__ import annotations

from typing import Any

from bridge.cluster.presence_state import Leases, Rechecks, SharedState
from bridge.presence.core import HIDDEN, PresenceCore, PresenceOutcome, PresenceRules, View

W = 30_000
C = 1_000
RULES = PresenceRules(online_window_ms=W, coalesce_ms=C, max_contacts=3, max_watched=3)


def items(out: PresenceOutcome) -> list[tuple[str, str, Any, Any]]:
    return [(cid, item.user, item.online, item.last_seen) for cid, item in out.items]


def watching(c: PresenceCore) -> None:
    """bob's phone (here) watches alice (elsewhere); both show everything to everyone."""
    c.mirror("bob", None, "everyone", (), False, 0)
    c.mirror("alice", 500, "everyone", (), False, 0)
    views, _ = c.subscribe("bob.phone", "bob", ["alice"], 0)
    assert views == {"alice": View(False, 500)}


def test_a_user_online_on_another_node_is_online_to_watchers_here() -> None:
    c = PresenceCore(RULES)
    watching(c)
    assert items(c.mirror("alice", 2_000, "everyone", (), True, 2_000)) == [("bob.phone", "alice", True, 2_000)]
    assert c.is_online("alice") and not c.is_local_online("alice")
    assert items(c.mirror("alice", 9_000, "everyone", (), True, 9_000)) == [], "last_seen of an online user"
    assert items(c.mirror("alice", 9_500, "everyone", (), False, 10_000)) == [("bob.phone", "alice", False, 9_500)]


def test_remote_flapping_is_coalesced_like_local_flapping() -> None:
    c = PresenceCore(RULES)
    watching(c)
    sent = items(c.mirror("alice", 1_000, "everyone", (), True, 1_000))
    for t in range(1_100, 2_000, 100):
        sent += items(c.mirror("alice", t, "everyone", (), t % 200 == 0, t))
    sent += items(c.tick(2_000))
    assert sent == [("bob.phone", "alice", True, 1_000), ("bob.phone", "alice", False, 1_900)]


def test_local_and_remote_foreground_add_up_and_transitions_are_reported() -> None:
    c = PresenceCore(RULES)
    watching(c)
    out = c.heartbeat("alice", "alice.phone", False, 1_000)
    assert out.foreground == [("alice", True)] and items(out) == [("bob.phone", "alice", True, 1_000)]
    assert items(c.mirror("alice", 800, "everyone", (), True, 1_500)) == [], "online either way"
    assert c.last_seen("alice") == 1_000, "last_seen never moves back"
    out = c.heartbeat("alice", "alice.phone", True, 3_000)
    assert out.foreground == [("alice", False)] and items(out) == [], "still online on the other node"
    assert c.heartbeat("alice", "alice.phone", False, 4_000).foreground == [("alice", True)]
    assert c.heartbeat("alice", "alice.phone", False, 5_000).foreground == [], "only transitions"


def test_a_mirrored_privacy_change_reaches_watchers_here_and_reciprocity_too() -> None:
    c = PresenceCore(RULES)
    watching(c)
    assert items(c.mirror("alice", 500, "nobody", (), False, 100)) == [("bob.phone", "alice", None, None)]
    assert items(c.mirror("alice", 500, "contacts", ("bob",), False, 2_000)) == [("bob.phone", "alice", False, 500)]
    assert items(c.mirror("bob", None, "contacts", (), False, 4_000)) == [("bob.phone", "alice", False, None)], \
        "bob hides his last seen from alice: he sees none of hers"
    assert c.view("bob", "alice") == View(False, None) and c.view("carol", "alice") == HIDDEN


def test_forget_keeps_what_is_still_needed() -> None:
    c = PresenceCore(RULES)
    watching(c)
    c.heartbeat("carol", "carol.phone", False, 1_000)
    for user in ("alice", "bob", "carol"):
        c.forget(user)
    assert c.setting("alice") == "everyone" and c.setting("bob") == "everyone", "watched, and watching"
    assert c.last_seen("carol") == 1_000, "in the foreground here"
    c.device_offline("bob", "bob.phone", 2_000)
    c.device_offline("carol", "carol.phone", 2_000)
    for user in ("alice", "bob", "carol"):
        c.forget(user)
        assert c.setting(user) == "contacts" and c.last_seen(user) is None and not c.is_online(user)


def test_a_lease_outlasts_every_window_opened_before_the_next_renewal() -> None:
    leases = Leases(W)
    written = leases.until(0)
    for heartbeat in range(0, leases.renew_ms + 1, 100):  # heartbeats until the renewal
        assert heartbeat + W <= written
    assert written - W == leases.renew_ms, "written at a heartbeat: half a window past its own window"


def test_a_read_state_is_online_while_another_nodes_lease_runs() -> None:
    state = SharedState(3, 100, "everyone", frozenset(), {"n1": 5_000, "n2": 7_000, "n3": 1_000})
    assert state.online_until(2_000) == 7_000
    assert state.online_until(2_000, other_than="n2") == 5_000
    assert state.online_until(7_000) is None
    assert SharedState().online_until(0) is None
    assert state.shown_to("bob", SharedState(), "alice", True) == View(True, None), "bob hides his from alice"


def test_rechecks_come_due_once_at_the_latest_time_armed() -> None:
    r = Rechecks()
    r.arm("alice", 100)
    r.arm("alice", 300)
    r.arm("bob", 200)
    r.arm("carol", 150)
    r.drop("carol")
    assert r.next() == 100
    assert r.due(250) == ["bob"]
    assert r.due(299) == []
    assert r.due(300) == ["alice"] and len(r) == 0
    r.arm("alice", 50)
    r.arm("alice", 40)
    assert r.due(60) == ["alice"] and r.due(1_000) == []
