"""The login throttle as the ``Authenticator`` sees it: the rules of ``LoginGuard``, behind an async
interface so that cluster mode can keep the counts in Redis, shared by every node (one node's
counts alone would give an attacker spreading connections over N nodes N times the guesses).

``MemoryThrottle`` is the one-process throttle: ``LoginGuard`` as it is. The shared one is
``storage.redis.throttle.RedisLoginThrottle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.login_guard import LoginGuard


class LoginThrottle(Protocol):
    """``LoginGuard``'s ``begin``, ``succeeded`` and ``retry_after``, awaited (same meaning, same numbers)."""

    async def begin(self, keys: list[str], now: float) -> float: ...

    async def succeeded(self, keys: Sequence[str], released: Sequence[str] = ()) -> None: ...

    async def retry_after(self, keys: list[str], now: float) -> float: ...


class MemoryThrottle:
    """One node's throttle: a ``LoginGuard`` in this process."""

    def __init__(self, guard: LoginGuard) -> None:
        self.guard = guard

    async def begin(self, keys: list[str], now: float) -> float:
        return self.guard.begin(keys, now)

    async def succeeded(self, keys: Sequence[str], released: Sequence[str] = ()) -> None:
        self.guard.succeeded(keys, released)

    async def retry_after(self, keys: list[str], now: float) -> float:
        return self.guard.retry_after(keys, now)
