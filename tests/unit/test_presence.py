"""The presence core's rules (bridge/presence/core.py), driven with a fake clock and no I/O.

Proves: online after a heartbeat and offline with the right ``last_seen`` after
away, window expiry and the last foreground device going away (also a late
will); background devices never make a user online; every privacy combination
(everyone / contacts / nobody x reciprocity) as an explicit table; unknown users
look hidden; watchers get items only when their view changes, coalesced; limits
change nothing when exceeded; ``last_seen`` is written in batches.
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge.presence.core import HIDDEN, LimitExceeded, PresenceCore, PresenceOutcome, PresenceRules, View, visible

W = 30_000  # online window, ms
C = 1_000  # coalescing, ms
RULES = PresenceRules(online_window_ms=W, coalesce_ms=C, max_contacts=3, max_watched=3)


def core(rules: PresenceRules = RULES) -> PresenceCore:
    return PresenceCore(rules)


def items(out: PresenceOutcome) -> list[tuple[str, str, Any, Any]]:
    return [(cid, item.user, item.online, item.last_seen) for cid, item in out.items]


def everyone(c: PresenceCore, *users: str) -> None:
    for user in users:
        c.set_privacy(user, "everyone", 0)


# --- online, offline, last_seen ---------------------------------------------------------


def test_a_heartbeat_makes_the_user_online_with_last_seen_then_the_window_ends_it() -> None:
    c = core()
    everyone(c, "alice", "bob")
    assert c.view("bob", "alice") == View(False, None), "never seen: offline, no last_seen"
    c.heartbeat("alice", "alice.phone", False, 1_000)
    assert c.view("bob", "alice") == View(True, 1_000)
    assert c.next_deadline() == 1_000 + W
    c.tick(1_000 + W - 1)
    assert c.is_online("alice")
    c.tick(1_000 + W)
    assert c.view("bob", "alice") == View(False, 1_000), "last_seen is the last heartbeat, not the expiry"


def test_heartbeats_extend_the_window_with_one_expiry_entry_per_device() -> None:
    c = core()
    for t in range(0, 100_000, 10_000):  # every 10 s for 100 s
        c.heartbeat("alice", "alice.phone", False, t)
        c.tick(t + 5_000)
        assert c.is_online("alice")
    assert c.stats()["expiry_heap"] == 1
    c.tick(90_000 + W - 1)
    assert c.is_online("alice")
    c.tick(90_000 + W)
    assert not c.is_online("alice")
    assert c.last_seen("alice") == 90_000
    assert c.stats()["expiry_heap"] == 0 and c.stats()["armed_devices"] == 0


def test_away_from_the_foreground_device_ends_online_at_once() -> None:
    c = core()
    c.heartbeat("alice", "alice.phone", False, 1_000)
    c.heartbeat("alice", "alice.phone", True, 4_000)
    assert not c.is_online("alice")
    assert c.last_seen("alice") == 4_000, "away is a heartbeat: she was there until then"


def test_away_from_a_background_device_changes_nothing() -> None:
    c = core()
    c.heartbeat("alice", "alice.phone", False, 1_000)
    c.heartbeat("alice", "alice.laptop", True, 2_000)
    assert c.is_online("alice") and c.last_seen("alice") == 1_000
    c.heartbeat("bob", "bob.phone", True, 3_000)
    assert not c.is_online("bob") and c.last_seen("bob") is None


def test_online_lasts_until_the_last_foreground_device_goes() -> None:
    c = core()
    c.heartbeat("alice", "alice.phone", False, 1_000)
    c.heartbeat("alice", "alice.laptop", False, 2_000)
    c.heartbeat("alice", "alice.phone", True, 3_000)
    assert c.is_online("alice"), "the laptop is still in the foreground"
    c.device_offline("alice", "alice.laptop", 5_000)
    assert not c.is_online("alice")
    assert c.last_seen("alice") == 3_000, "a disconnect does not move last_seen"


def test_disconnect_of_the_last_foreground_device_then_a_late_will() -> None:
    """A keepalive timeout: the broker drops the connection (device_offline), then publishes the
    will ``{"state":"away"}``; the will must not move last_seen to the time of the drop."""
    c = core()
    c.heartbeat("alice", "alice.phone", False, 1_000)
    c.device_offline("alice", "alice.phone", 2_500)
    assert not c.is_online("alice") and c.last_seen("alice") == 1_000
    c.heartbeat("alice", "alice.phone", True, 2_501)
    assert c.last_seen("alice") == 1_000


def test_a_background_connection_alone_never_shows_online() -> None:
    c = core()
    everyone(c, "alice")
    out = c.device_offline("alice", "alice.phone", 1_000)  # connected, subscribed, never heartbeated, left
    assert out.items == []
    assert c.view("bob", "alice") == View(False, None)


def test_a_device_back_in_the_foreground_after_away_is_armed_again() -> None:
    c = core()
    c.heartbeat("alice", "alice.phone", False, 0)
    c.heartbeat("alice", "alice.phone", True, 1_000)
    c.heartbeat("alice", "alice.phone", False, 2_000)  # its first heap entry (at W) is still queued
    c.tick(W)
    assert c.is_online("alice"), "re-armed at 2 s + W"
    c.tick(2_000 + W)
    assert not c.is_online("alice") and c.last_seen("alice") == 2_000


def test_last_seen_restored_from_the_store_shows_offline() -> None:
    c = core()
    c.load([("alice", 1234)], [("alice", "everyone"), ("bob", "bogus")], [("bob", "alice")])
    assert c.view("bob", "alice") == View(False, 1234)
    assert c.setting("bob") == "contacts" and c.contacts("bob") == {"alice"}


# --- privacy: every combination ---------------------------------------------------------------

# Owner O's rule for viewer V, and V's own rule for O (reciprocity).
RULE_SETUPS = {
    "everyone": ("everyone", False),
    "contacts, other in list": ("contacts", True),
    "contacts, other not in list": ("contacts", False),
    "nobody": ("nobody", False),
    "nobody, other in list": ("nobody", True),
}
ONLINE, OFFLINE = (True, 5_000), (False, 5_000)
FULL, NO_LAST_SEEN = "full", "online only"
# (owner's rule, viewer's rule) -> what the viewer is shown. Written out, not computed.
PRIVACY_TABLE = [
    ("everyone", "everyone", FULL),
    ("everyone", "contacts, other in list", FULL),
    ("everyone", "contacts, other not in list", NO_LAST_SEEN),
    ("everyone", "nobody", NO_LAST_SEEN),
    ("everyone", "nobody, other in list", NO_LAST_SEEN),
    ("contacts, other in list", "everyone", FULL),
    ("contacts, other in list", "contacts, other in list", FULL),
    ("contacts, other in list", "contacts, other not in list", NO_LAST_SEEN),
    ("contacts, other in list", "nobody", NO_LAST_SEEN),
    ("contacts, other in list", "nobody, other in list", NO_LAST_SEEN),
    ("contacts, other not in list", "everyone", HIDDEN),
    ("contacts, other not in list", "contacts, other in list", HIDDEN),
    ("contacts, other not in list", "contacts, other not in list", HIDDEN),
    ("contacts, other not in list", "nobody", HIDDEN),
    ("nobody", "everyone", HIDDEN),
    ("nobody", "contacts, other in list", HIDDEN),
    ("nobody", "nobody", HIDDEN),
    ("nobody, other in list", "everyone", HIDDEN),
    ("nobody, other in list", "contacts, other in list", HIDDEN),
]


def _configure(c: PresenceCore, user: str, other: str, setup: str) -> None:
    setting, lists_other = RULE_SETUPS[setup]
    c.set_privacy(user, setting, 0)
    if lists_other:
        c.add_contacts(user, [other], 0)


@pytest.mark.parametrize(("owner_rule", "viewer_rule", "shown"), PRIVACY_TABLE)
@pytest.mark.parametrize("state", [ONLINE, OFFLINE], ids=["owner-online", "owner-offline"])
def test_privacy_table(owner_rule: str, viewer_rule: str, shown: Any, state: tuple[bool, int]) -> None:
    c = core(PresenceRules(W, C, max_contacts=10, max_watched=10))
    _configure(c, "olga", "vic", owner_rule)
    _configure(c, "vic", "olga", viewer_rule)
    c.heartbeat("olga", "olga.phone", False, 5_000)
    if not state[0]:
        c.device_offline("olga", "olga.phone", 6_000)
    expected = {FULL: View(*state), NO_LAST_SEEN: View(state[0], None)}.get(shown, shown)
    assert c.view("vic", "olga") == expected
    views, _ = c.get("vic", ["olga"], 7_000)
    assert views == {"olga": expected}
    # The pure rule says the same, and the owner always sees themself in full.
    assert visible("vic", "olga", c.setting("olga"), c.contacts("olga"), c.setting("vic"), c.contacts("vic"),
                   state[0], 5_000) == expected
    assert c.view("olga", "olga") == View(*state)


def test_contacts_means_the_owners_list_not_the_viewers() -> None:
    c = core()
    c.heartbeat("olga", "olga.phone", False, 1_000)
    c.add_contacts("vic", ["olga"], 0)  # vic lists olga; olga (default "contacts") does not list vic
    assert c.view("vic", "olga") == HIDDEN
    c.add_contacts("olga", ["vic"], 0)
    assert c.view("vic", "olga") == View(True, 1_000)
    c.remove_contacts("olga", ["vic"], 0)
    assert c.view("vic", "olga") == HIDDEN


def test_unknown_users_look_exactly_like_hidden_ones() -> None:
    c = core()
    c.set_privacy("olga", "nobody", 0)
    c.heartbeat("olga", "olga.phone", False, 1_000)
    views, _ = c.get("vic", ["olga", "nosuchuser", "carol"], 2_000)
    assert views == {"olga": HIDDEN, "nosuchuser": HIDDEN, "carol": HIDDEN}


# --- watchers and coalescing ---------------------------------------------------------------------


def watched(c: PresenceCore, watcher: str = "bob.phone", owner: str = "alice", now: int = 0) -> View:
    views, _ = c.subscribe(watcher, watcher.split(".", maxsplit=1)[0], [owner], now)
    return views[owner]


def test_watchers_get_an_item_on_each_change_but_not_on_every_heartbeat() -> None:
    c = core()
    everyone(c, "alice", "bob")
    assert watched(c) == View(False, None)
    assert items(c.heartbeat("alice", "alice.phone", False, 10_000)) == [("bob.phone", "alice", True, 10_000)]
    assert items(c.heartbeat("alice", "alice.phone", False, 20_000)) == [], "only last_seen moved"
    assert items(c.heartbeat("alice", "alice.laptop", False, 21_000)) == [], "still online"
    c.device_offline("alice", "alice.laptop", 22_000)
    assert items(c.heartbeat("alice", "alice.phone", True, 25_000)) == [("bob.phone", "alice", False, 25_000)]


def test_window_expiry_sends_the_item_from_tick() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    c.heartbeat("alice", "alice.phone", False, 10_000)
    assert c.next_deadline() == 10_000 + W
    assert items(c.tick(10_000 + W)) == [("bob.phone", "alice", False, 10_000)]
    assert c.next_deadline() is None


def test_flapping_ten_times_in_a_second_costs_two_items() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    sent: list[tuple[str, str, Any, Any]] = []
    for i in range(10):  # online, away, online, away, ... within 950 ms
        sent += items(c.heartbeat("alice", "alice.phone", i % 2 == 1, 10_000 + i * 100))
        sent += items(c.tick(10_000 + i * 100 + 50))
    assert sent == [("bob.phone", "alice", True, 10_000)], "the first change goes at once, the rest wait"
    assert c.next_deadline() == 10_000 + C
    sent += items(c.tick(10_000 + C))
    assert sent[1:] == [("bob.phone", "alice", False, 10_900)], "then one item with the latest state"
    assert items(c.tick(20_000)) == []


def test_a_flap_back_to_what_was_shown_sends_nothing_more() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    c.heartbeat("alice", "alice.phone", False, 10_000)  # sent: online
    c.device_offline("alice", "alice.phone", 10_100)
    c.heartbeat("alice", "alice.phone", False, 10_200)  # online again: what bob was shown
    assert items(c.tick(10_000 + C)) == []


def test_coalescing_is_per_watched_user() -> None:
    c = core()
    everyone(c, "alice", "carol", "bob")
    c.subscribe("bob.phone", "bob", ["alice", "carol"], 0)
    out = c.heartbeat("alice", "alice.phone", False, 10_000)
    out.items += c.heartbeat("carol", "carol.phone", False, 10_001).items
    assert items(out) == [("bob.phone", "alice", True, 10_000), ("bob.phone", "carol", True, 10_001)]


def test_the_first_change_after_subscribe_goes_at_once() -> None:
    c = core()
    everyone(c, "alice", "bob")
    c.heartbeat("alice", "alice.phone", False, 10_000)
    assert watched(c, now=10_050) == View(True, 10_000)
    assert items(c.heartbeat("alice", "alice.phone", True, 10_100)) == [("bob.phone", "alice", False, 10_100)]


def test_hidden_watchers_get_no_items_for_any_change() -> None:
    c = core()
    c.set_privacy("alice", "nobody", 0)
    assert watched(c) == HIDDEN
    sent = items(c.heartbeat("alice", "alice.phone", False, 10_000))
    sent += items(c.heartbeat("alice", "alice.phone", True, 11_000))
    sent += items(c.heartbeat("alice", "alice.phone", False, 20_000))
    sent += items(c.tick(20_000 + W))
    assert sent == []


def test_privacy_changes_reach_watchers_once() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    c.heartbeat("alice", "alice.phone", False, 10_000)
    assert items(c.set_privacy("alice", "nobody", 20_000)) == [("bob.phone", "alice", None, None)]
    assert items(c.heartbeat("alice", "alice.phone", True, 30_000)) == []
    assert items(c.set_privacy("alice", "everyone", 40_000)) == [("bob.phone", "alice", False, 30_000)]


def test_reciprocity_changes_what_the_hider_is_shown() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    c.heartbeat("alice", "alice.phone", False, 10_000)
    c.heartbeat("alice", "alice.phone", True, 11_000)
    out = c.set_privacy("bob", "nobody", 20_000)  # bob hides his last seen: he loses alice's
    assert items(out) == [("bob.phone", "alice", False, None)]
    assert items(c.heartbeat("alice", "alice.phone", False, 30_000)) == [("bob.phone", "alice", True, None)]
    out = c.add_contacts("bob", ["alice"], 40_000)  # "nobody" ignores the list
    assert items(out) == []
    c.set_privacy("bob", "contacts", 50_000)  # now alice is in his list: he shows her, she shows him
    assert items(c.heartbeat("alice", "alice.phone", True, 55_000)) == [("bob.phone", "alice", False, 55_000)]


def test_a_watch_list_ends_with_its_device() -> None:
    c = core()
    everyone(c, "alice", "bob")
    watched(c)
    watched(c, "bob.laptop")
    c.device_offline("bob", "bob.phone", 1_000)
    assert items(c.heartbeat("alice", "alice.phone", False, 2_000)) == [("bob.laptop", "alice", True, 2_000)]
    assert c.unsubscribe("bob.laptop", ["alice"]) == 0
    assert items(c.heartbeat("alice", "alice.phone", True, 9_000)) == []
    assert c.stats()["watch_lists"] == 0 and c.stats()["watched_users"] == 0


# --- limits --------------------------------------------------------------------------------------


def test_watch_and_contact_limits_change_nothing_when_exceeded() -> None:
    c = core()
    c.subscribe("bob.phone", "bob", ["a", "b"], 0)
    c.subscribe("bob.phone", "bob", ["a", "b", "c"], 0)  # repeats do not count twice
    with pytest.raises(LimitExceeded):
        c.subscribe("bob.phone", "bob", ["d"], 0)
    assert c.watching("bob.phone") == 3
    c.add_contacts("bob", ["a", "b", "bob"], 0)  # himself: ignored
    assert c.contacts("bob") == {"a", "b"}
    with pytest.raises(LimitExceeded):
        c.add_contacts("bob", ["c", "d"], 0)
    assert c.contacts("bob") == {"a", "b"}
    c.add_contacts("bob", ["c", "a"], 0)
    assert c.contacts("bob") == {"a", "b", "c"}


# --- persistence ------------------------------------------------------------------------------------


def test_last_seen_is_written_in_batches_one_row_per_user() -> None:
    c = core()
    for t in range(0, 5_000, 100):
        c.heartbeat("alice", "alice.phone", False, t)
        c.heartbeat("bob", "bob.phone", False, t + 1)
    assert sorted(c.take_dirty()) == [("alice", 4_900), ("bob", 4_901)]
    assert c.take_dirty() == []
    c.heartbeat("alice", "alice.phone", False, 6_000)
    rows = c.take_dirty()
    c.write_failed(rows)
    c.heartbeat("alice", "alice.phone", False, 7_000)
    assert c.take_dirty() == [("alice", 7_000)], "a failed batch is written again, with the newest value"
