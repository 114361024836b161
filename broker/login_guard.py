"""Throttling of failed logins, per user and per remote address. Pure: the
caller passes the clock.

Rules: each key (``user:alice``, ``addr:10.0.0.7``) may fail ``free_failures``
times; after that, every further failure makes the key wait
``base_delay * 2**k`` (capped at ``max_delay``) before its next attempt is even
checked. Attempts during the wait are refused without checking the password,
so a password-guessing flood costs no scrypt work. A success clears the user
key; failures are forgotten ``forget_after`` seconds after the last one. State
is bounded: the oldest keys are dropped past ``max_keys``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    blocked_until: float


class LoginGuard:
    def __init__(
        self,
        free_failures: int,
        base_delay_s: float,
        max_delay_s: float,
        forget_after_s: float,
        max_keys: int = 100_000,
    ) -> None:
        self._free = free_failures
        self._base = base_delay_s
        self._max = max_delay_s
        self._forget = forget_after_s
        self._max_keys = max_keys
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last_failure > self._forget:
            del self._records[key]
            return None
        return record

    def retry_after(self, keys: list[str], now: float) -> float:
        """Seconds until these keys may try again; 0.0 means: check the credentials."""
        wait = 0.0
        for key in keys:
            record = self._get(key, now)
            if record is not None:
                wait = max(wait, record.blocked_until - now)
        return wait

    def begin(self, keys: list[str], now: float) -> float:
        """An attempt on ``keys``: > 0 is the wait (refuse it unchecked); 0.0 means check the
        credentials, the attempt now counting as a failure until ``succeeded`` releases it."""
        wait = self.retry_after(keys, now)
        if wait <= 0:
            self.failed(keys, now)
        return wait

    def _delay(self, failures: int) -> float:
        over = failures - self._free
        return min(self._base * (2 ** min(over - 1, 32)), self._max) if over > 0 else 0.0

    def failed(self, keys: list[str], now: float) -> float:
        """Record a failed attempt; returns how long the keys are now blocked."""
        wait = 0.0
        for key in keys:
            record = self._get(key, now) or _Record(0, now, now)
            record.failures += 1
            record.last_failure = now
            delay = self._delay(record.failures)
            if delay > 0:
                record.blocked_until = now + delay
                wait = max(wait, delay)
            self._records[key] = record
            self._records.move_to_end(key)
        while len(self._records) > self._max_keys:
            self._records.popitem(last=False)
        return wait

    def succeeded(self, keys: Sequence[str], released: Sequence[str] = ()) -> None:
        """A ``begin`` attempt succeeded: ``keys`` are cleared; on ``released`` keys only its
        reserved failure is taken back (with the back-off it alone would have started)."""
        for key in keys:
            self._records.pop(key, None)
        for key in released:
            record = self._records.get(key)
            if record is None:
                continue
            record.failures -= 1
            if record.failures <= 0:
                del self._records[key]
            else:
                record.blocked_until = min(record.blocked_until,
                                           record.last_failure + self._delay(record.failures))

    def __len__(self) -> int:
        return len(self._records)
