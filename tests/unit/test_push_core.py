"""The push core's rules (bridge/push/core.py), one test per rule, with the time passed in."""

from __future__ import annotations

from bridge.push.core import PushCore, PushRules, QueuedWake, Settled, retried, retry_delay_ms
from bridge.push.provider import Outcome, PushResult, PushTarget

RULES = PushRules(grace_ms=5_000, min_interval_ms=60_000, max_queue=3, retry_min_ms=1_000, retry_max_ms=8_000,
                  max_attempts=5, wake_ttl_ms=600_000)
PHONE = PushTarget("unifiedpush", "https://push.example/x", "bob.phone")
SENT, RETRY = PushResult(Outcome.SENT), PushResult(Outcome.RETRY)


def core(*targets: PushTarget) -> PushCore:
    c = PushCore(RULES)
    for target in targets or (PHONE,):
        c.register(target)
    return c


def send_all(c: PushCore, now: int, result: PushResult = SENT) -> list[Settled]:
    return [c.settle(wake, target, result, now) for wake, target in c.take_due(now, 100)]


def test_rule1_an_away_device_is_woken_once_per_burst() -> None:
    c = core()
    assert c.staged("bob.phone", 1_000) == QueuedWake("bob.phone", 1_000, 601_000)
    assert all(c.staged("bob.phone", 1_000 + n) is None for n in range(49))  # rule 4: one queued wake-up
    assert send_all(c, 1_100) == [Settled.DONE]
    assert c.take_due(1_200, 100) == []


def test_unregistered_and_connected_devices_are_not_woken() -> None:
    c = core()
    assert c.staged("alice.laptop", 0) is None
    c.online("bob.phone")
    assert c.staged("bob.phone", 0) is None
    c.delivered("bob.phone", 0)
    c.acked("bob.phone")
    assert c.overdue(10_000) == []


def test_rule2_a_delivery_unacked_past_the_grace_wakes_the_device() -> None:
    c = core()
    c.online("bob.phone")
    c.delivered("bob.phone", 1_000)
    c.delivered("bob.phone", 3_000)  # the first attempt starts the wait
    assert c.next_due_ms() == 6_000
    assert c.overdue(5_999) == []
    assert [w.client_id for w in c.overdue(6_000)] == ["bob.phone"]
    assert c.overdue(20_000) == []  # once; the next delivery starts a new wait


def test_rule2_a_disconnect_keeps_the_wait() -> None:
    c = core()
    c.online("bob.phone")
    c.delivered("bob.phone", 0)
    c.offline("bob.phone")
    assert [w.client_id for w in c.overdue(5_000)] == ["bob.phone"]


def test_rule3_min_interval_defers_and_an_ack_ends_it() -> None:
    c = core()
    c.staged("bob.phone", 0)
    send_all(c, 0)
    wake = c.staged("bob.phone", 10_000)
    assert wake is not None and wake.due_ms == 60_000
    assert c.take_due(59_999, 100) == []
    c.online("bob.phone")  # rule 4: dropped on connect
    assert c.queue == {}
    c.acked("bob.phone")
    c.offline("bob.phone")
    wake = c.staged("bob.phone", 20_000)
    assert wake is not None and wake.due_ms == 20_000


def test_rule4_connecting_drops_the_queued_wake_up() -> None:
    c = core()
    c.staged("bob.phone", 0)
    assert c.online("bob.phone") is True
    assert c.take_due(0, 100) == []


def test_rule5_the_queue_is_bounded() -> None:
    targets = [PushTarget("fcm", f"t{n}", f"u{n}.d") for n in range(5)]
    c = core(*targets)
    queued = [c.staged(t.client_id, 0) for t in targets]
    assert sum(w is not None for w in queued) == 3 and c.dropped == 2


def test_rule6_retry_after_and_back_off() -> None:
    assert [retry_delay_ms(RULES, n, None) for n in (1, 2, 3, 4, 5)] == [1_000, 2_000, 4_000, 8_000, 8_000]
    assert retry_delay_ms(RULES, 1, 30.0) == 30_000
    c = core()
    c.staged("bob.phone", 0)
    assert send_all(c, 0, PushResult(Outcome.RETRY, retry_after_s=7)) == [Settled.RETRY]
    assert c.queue["bob.phone"].due_ms == 7_000 and c.queue["bob.phone"].attempts == 1
    assert c.take_due(6_999, 100) == []
    now = 7_000
    for _ in range(3):
        assert send_all(c, now, RETRY) == [Settled.RETRY]
        now = c.queue["bob.phone"].due_ms
    assert send_all(c, now, RETRY) == [Settled.DONE]  # the 5th attempt: given up
    assert c.queue == {} and "bob.phone" in c.targets


def test_rule6_an_expired_wake_up_is_given_up() -> None:
    c = core()
    c.staged("bob.phone", 0)
    assert send_all(c, 0, PushResult(Outcome.RETRY, retry_after_s=700)) == [Settled.DONE]
    assert c.queue == {}


def test_rule7_gone_drops_the_registration_and_marks_the_device() -> None:
    c = core()
    c.staged("bob.phone", 0)
    assert send_all(c, 0, PushResult(Outcome.GONE)) == [Settled.GONE]
    assert c.targets == {} and c.queue == {} and c.gone == {"bob.phone"}
    assert c.staged("bob.phone", 1) is None
    c.register(PHONE)
    assert c.gone == set()


def test_rule7_gone_for_a_replaced_token_keeps_the_new_one() -> None:
    c = core()
    c.staged("bob.phone", 0)
    [(wake, old)] = c.take_due(0, 100)
    new = PushTarget("fcm", "new-token", "bob.phone")
    c.register(new)
    assert c.settle(wake, old, PushResult(Outcome.GONE), 0) is Settled.RETRY
    assert c.targets["bob.phone"] == new and c.take_due(1_000, 100) == [(c.queue["bob.phone"], new)]


def test_rejected_is_given_up_and_the_registration_kept() -> None:
    c = core()
    c.staged("bob.phone", 0)
    assert send_all(c, 0, PushResult(Outcome.REJECTED)) == [Settled.DONE]
    assert c.queue == {} and "bob.phone" in c.targets


def test_an_answer_after_the_device_connected_changes_nothing() -> None:
    c = core()
    c.staged("bob.phone", 0)
    [(wake, target)] = c.take_due(0, 100)
    c.online("bob.phone")
    assert c.settle(wake, target, RETRY, 10) is Settled.DONE and c.queue == {}


def test_restore_keeps_only_wake_ups_of_registered_devices() -> None:
    c = PushCore(RULES)
    c.restore([PHONE], [QueuedWake("bob.phone", 5, 10), QueuedWake("carol.tab", 5, 10)], ["dave.phone"])
    assert list(c.queue) == ["bob.phone"] and c.gone == {"dave.phone"}
    assert c.take_due(5, 100) == [(QueuedWake("bob.phone", 5, 10), PHONE)]
    assert c.take_due(5, 100) == []  # in flight: not taken twice


def test_due_wake_ups_go_earliest_first_and_at_most_limit_at_once() -> None:
    rules = PushRules(5_000, 60_000, 100, 1_000, 8_000, 5, 600_000)
    c = PushCore(rules)
    for n in range(10):
        c.register(PushTarget("fcm", f"t{n}", f"u{n}.d"))
        c.staged(f"u{n}.d", 100 - n)
    assert c.next_due_ms() == 91
    first = c.take_due(1_000, 4)
    assert [w.client_id for w, _ in first] == ["u9.d", "u8.d", "u7.d", "u6.d"]
    assert c.next_due_ms() == 95
    c.online("u5.d")  # its entry is skipped when it comes up
    assert [w.client_id for w, _ in c.take_due(1_000, 100)] == ["u4.d", "u3.d", "u2.d", "u1.d", "u0.d"]
    assert c.next_due_ms() is None


def test_rule8_a_queued_wake_up_carries_the_newest_preview_until_it_is_being_sent() -> None:
    c = core()
    assert c.staged("bob.phone", 0, "p1") == QueuedWake("bob.phone", 0, 600_000, preview="p1")
    assert c.staged("bob.phone", 1, "p2") == QueuedWake("bob.phone", 0, 600_000, preview="p2")  # rewritten
    assert c.staged("bob.phone", 2, None) is None  # a message without one leaves it
    [(wake, target)] = c.take_due(10, 100)
    assert wake.preview == "p2"
    assert c.staged("bob.phone", 11, "p3") is None  # in flight: not changed under the provider
    assert c.settle(wake, target, RETRY, 12) is Settled.RETRY
    assert c.queue["bob.phone"].preview == "p3"  # the retry takes the newest


def test_rule8_a_later_wake_up_takes_the_newest_preview_since_the_last_ack() -> None:
    c = core()
    c.online("bob.phone")
    c.staged("bob.phone", 0, "old")
    c.acked("bob.phone")  # fetched: that preview is history
    c.delivered("bob.phone", 1)
    assert c.overdue(10_000)[0].preview is None
    c.online("bob.phone")
    c.staged("bob.phone", 20_000, "new")
    c.delivered("bob.phone", 20_000)
    assert [w.preview for w in c.overdue(30_000)] == ["new"]  # rule 2's wake-up carries it


def test_retried_is_rule6_alone_as_cluster_mode_settles_with_it() -> None:
    wake = QueuedWake("bob.phone", 1_000, 601_000)
    assert retried(RULES, wake, PushResult(Outcome.RETRY, retry_after_s=7), 2_000) == QueuedWake(
        "bob.phone", 9_000, 601_000, 1)
    assert retried(RULES, wake, RETRY, 2_000) == QueuedWake("bob.phone", 3_000, 601_000, 1)
    assert retried(RULES, wake, PushResult(Outcome.REJECTED), 2_000) is None
    assert retried(RULES, QueuedWake("bob.phone", 1_000, 601_000, RULES.max_attempts - 1), RETRY, 2_000) is None
    assert retried(RULES, wake, RETRY, 600_000) is None  # due past its expiry
