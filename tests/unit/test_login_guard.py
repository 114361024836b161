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


def test_concurrent_attempts_are_throttled_like_sequential_ones() -> None:
    g = guard()
    keys = ["user:alice", "addr:10.0.0.1"]
    # 200 attempts begun before any is checked: free_failures + 1 go ahead, the rest wait.
    waits = [g.begin(keys, 0.0) for _ in range(200)]
    assert waits[:4] == [0.0] * 4
    assert all(w == 1.0 for w in waits[4:])
    sequential = guard()
    for _ in range(4):
        assert sequential.begin(keys, 0.0) == 0.0  # each one checked and failed before the next
    assert sequential.begin(keys, 0.0) == 1.0
    # After the back-off, one more goes ahead and doubles it, as it would one by one.
    assert [g.begin(keys, 1.0) for _ in range(3)] == [0.0, 2.0, 2.0]


def test_a_success_releases_its_reserved_failure() -> None:
    g = guard()
    user, addr = ["user:alice"], ["addr:10.0.0.1"]
    for _ in range(3):
        assert g.begin(user + addr, 0.0) == 0.0  # three wrong passwords in flight
    assert g.begin(["user:bob", *addr], 0.0) == 0.0  # the 4th, bob's, would start the address back-off ...
    assert g.retry_after(addr, 0.0) == 1.0
    g.succeeded(["user:bob"], addr)  # ... but it was right: its failure and back-off are taken back
    assert g.retry_after(addr, 0.0) == 0.0
    assert g.retry_after(["user:bob"], 0.0) == 0.0
    assert g.begin(user + addr, 0.0) == 0.0  # the address still has its 3 failures: the next starts it
    assert g.retry_after(addr, 0.0) == 1.0
