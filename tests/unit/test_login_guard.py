"""Login throttling rules with a fake clock."""

from broker.login_guard import LoginGuard


def guard() -> LoginGuard:
    return LoginGuard(free_failures=3, base_delay_s=1.0, max_delay_s=8.0, forget_after_s=100.0, max_keys=5)


def test_free_failures_then_doubling_delays_capped() -> None:
    g = guard()
    keys = ["user:alice"]
    assert [g.failed(keys, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert g.retry_after(keys, 0.0) == 0.0
    assert g.failed(keys, 0.0) == 1.0
    assert g.retry_after(keys, 0.5) == 0.5
    assert g.retry_after(keys, 1.0) == 0.0
    assert [g.failed(keys, 1.0) for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]


def test_the_longest_wait_of_user_and_address_applies() -> None:
    g = guard()
    for _ in range(4):
        g.failed(["addr:10.0.0.1"], 0.0)
    assert g.retry_after(["user:bob", "addr:10.0.0.1"], 0.2) == 0.8
    assert g.retry_after(["user:bob", "addr:10.0.0.2"], 0.2) == 0.0


def test_success_clears_and_old_failures_are_forgotten() -> None:
    g = guard()
    for _ in range(5):
        g.failed(["user:alice"], 0.0)
    g.succeeded(["user:alice"])
    assert g.retry_after(["user:alice"], 0.0) == 0.0
    for _ in range(5):
        g.failed(["user:carol"], 0.0)
    assert g.retry_after(["user:carol"], 1.0) > 0
    assert g.retry_after(["user:carol"], 101.0) == 0.0
    assert g.failed(["user:carol"], 101.0) == 0.0  # counting starts over


def test_memory_is_bounded() -> None:
    g = guard()
    for i in range(50):
        g.failed([f"addr:{i}"], 0.0)
    assert len(g) == 5
