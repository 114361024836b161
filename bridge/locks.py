"""A lock per key (a group, a blob's content), kept in memory only while some task holds or awaits it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> its lock, the tasks holding or awaiting it

    def __contains__(self, key: str) -> bool:
        """Some task holds or awaits the lock of ``key``."""
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]  # nobody else holds or awaits it
            else:
                self._locks[key] = (lock, users - 1)
