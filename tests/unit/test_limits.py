"""The keyed rate limiter's table bound (bridge/limits.py): flooding it with new keys never
resets a bucket that is still limiting (issue 14, item 5)."""

from __future__ import annotations

from bridge.limits import RateLimiter, RecentIds

KEYS = 104_000


def test_a_flood_of_new_keys_never_resets_a_limiting_bucket() -> None:
    limiter = RateLimiter(rate=1 / 30, burst=20)  # the default table: 100,000 keys
    assert [limiter.allow("mallory\0dave", 0.0) for _ in range(21)] == [True] * 20 + [False]
    sweeps = 0
    make_room = limiter._make_room

    def counted(now: float) -> bool:  # a sweep reads the whole table: count those that do
        nonlocal sweeps
        sweeps += now >= limiter._next_sweep
        return make_room(now)

    limiter._make_room = counted  # type: ignore[method-assign]
    admitted = sum(limiter.allow(f"mallory\0ghost{n}", 1.0) for n in range(KEYS))
    assert sweeps == 1, "the table is swept once, not once per refused key"
    assert len(limiter) == 100_000
    assert admitted == 100_000 - 1, "newcomers beyond the table are refused while all buckets limit"
    assert not limiter.allow("mallory\0dave", 2.0), "dave's bucket was reset"
    # 30 s refill one token of dave's bucket (not full); 600 s refill every one-use bucket.
    assert limiter.allow("mallory\0dave", 31.0)
    assert limiter.allow("alice\0dave", 601.0), "full buckets are forgotten to make room"
    assert limiter.allow("mallory\0dave", 601.0), "dave's bucket, limiting at 31 s, was kept"
    assert len(limiter) == 2


def test_only_full_buckets_are_forgotten() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=2)
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert not limiter.allow("c", 0.5), "a and b still limit: no room"
    assert not limiter.allow("c", 0.7), "not swept again before the soonest refill (b at 1.0)"
    assert limiter.allow("c", 1.0), "b is full again and forgotten"
    assert limiter.allow("a", 1.0), "a, one token refilled, was kept"
    assert len(limiter) == 2


def test_recent_ids_forget_the_expired_ones_from_the_oldest_on() -> None:
    recent = RecentIds(10)
    recent.add(("alice", "m1"), 100)
    recent.add(("alice", "m2"), 300)
    recent.add(("alice", "m3"), 200)  # added late with an earlier expiry: waits behind m2
    recent.add(("alice", "m4"), 400)
    recent.prune(250)
    assert len(recent) == 3  # m1 forgotten; m3 waits behind m2 until that expires
    assert not recent.contains(("alice", "m3"), 250), "expired all the same"
    assert recent.contains(("alice", "m2"), 250)
    recent.prune(300)
    assert len(recent) == 1
    assert recent.contains(("alice", "m4"), 300)
    recent.prune(10**9)
    assert len(recent) == 0
