"""Small pure limiters: a per-user token bucket and a bounded, expiring set of recent ids."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """``rate`` per second sustained after a burst of ``burst``, per key, for at most ``max_keys`` keys.

    Only a bucket that is full again is forgotten: it behaves exactly like a new one, so
    forgetting it changes nothing. A bucket still limiting is never dropped (dropping the
    oldest let 104,000 claims for other keys reset a limit). When the table is full of
    limiting buckets, a new key is refused until one has refilled; the table is swept
    for full buckets at most once per refill time of its fullest one, not per call.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._next_sweep = float("-inf")

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys and not self._make_room(now):
                return False
            bucket = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        return True

    def _make_room(self, now: float) -> bool:
        """Forget every bucket that is full again; False if none is (the table stays full)."""
        if now < self._next_sweep:
            return False
        soonest = float("inf")
        for key, bucket in list(self._buckets.items()):
            missing = self._burst - (bucket.tokens + (now - bucket.stamp) * self._rate)
            if missing <= 0:
                del self._buckets[key]
            else:
                soonest = min(soonest, missing / self._rate)
        if len(self._buckets) < self._max_keys:
            return True
        self._next_sweep = now + soonest
        return False

    def __len__(self) -> int:
        return len(self._buckets)


class RecentIds:
    """(sender, id) pairs remembered until their expiry, at most ``max_entries`` (oldest forgotten)."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], int] = OrderedDict()

    def add(self, key: tuple[str, str], expires_ms: int) -> None:
        self._entries[key] = expires_ms
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def contains(self, key: tuple[str, str], now_ms: int) -> bool:
        expires = self._entries.get(key)
        return expires is not None and expires > now_ms

    def prune(self, now_ms: int) -> None:
        """Forget the expired ids at the front (the oldest added). Ids are added about in the order they
        expire; one added late with an early expiry waits behind the later ones (``contains`` says no
        already, and ``max_entries`` bounds them all). A scan of all of them held the event loop ~31 ms
        per 200,000 (the default bound) once a minute."""
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now_ms:
                return
            del entries[key]

    def __len__(self) -> int:
        return len(self._entries)
