"""Exponential backoff with jitter, as a pure function and a small counter.

The delay before attempt ``n`` (0-based) is ``min(maximum, initial * 2**n)``,
reduced by a random fraction of up to ``jitter`` so that many clients cut off
at the same moment do not come back at the same moment.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int, initial: float, maximum: float, jitter: float = 0.5, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry ``attempt`` (0 for the first retry)."""
    base = min(maximum, initial * float(2 ** min(max(attempt, 0), 32)))
    return base * (1.0 - jitter * rng())


class Backoff:
    """Counts consecutive failures; ``next()`` is the wait before the next try."""

    def __init__(
        self, initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= maximum and 0 <= jitter < 1")
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self._rng = rng
        self.attempts = 0

    def next(self) -> float:
        delay = backoff_delay(self.attempts, self.initial, self.maximum, self.jitter, self._rng)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
