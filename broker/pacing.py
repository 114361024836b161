"""Publish pacing, pure: how long to stop reading a connection that publishes too fast (``limits.publishes_per_s``).

Used by both connection paths: the wire gate on amqtt's (broker/wire.py) and the lean chat
session (broker/chat_session.py). The caller passes the time.
"""

from __future__ import annotations


class Pacer:
    """A token bucket that says how long to wait instead of refusing (pure: the caller passes the time)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def wait_s(self, now: float) -> float:
        """Take one token; the seconds to wait before using it (0: at once)."""
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate) - 1.0
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
