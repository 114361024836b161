"""Push: the thin shell around the push core (bridge/push/core.py).

Messaging tells it, synchronously and without waiting, what happens to a device's items
(``DeliveryWatch``: staged, delivered, acked, connected, gone); the core decides, and the
wake-ups it queues are written to the store and sent by one supervised round (``push``),
so routing never waits for a provider or the disk. The round writes what changed first,
then sends what is due (at most ``concurrency`` at once) and writes the answers: a wake-up
queued before a crash is in the store and goes out after the restart.

It also serves ``push.register``, ``push.unregister`` (the caller's own device only) and
``push.pending`` (how many items wait for the caller's device: what ``fetch_pending`` drains),
and, when previews are on (``include_preview``), each device's preview key to the key directory.
With previews off, a preview messaging reports is dropped here: never queued, stored nor sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.push.common import ProviderCounters, attempt, gone_error, log_failure, preview_key, registration
from bridge.push.core import PushCore, QueuedWake, Settled
from bridge.push.provider import PushProvider, PushTarget
from bridge.push.store import PushStore
from bridge.requests import Op, OpError, check_args
from chatproto import (
    OP_PUSH_PENDING,
    OP_PUSH_REGISTER,
    OP_PUSH_UNREGISTER,
    Caller,
    ErrorCode,
)

log = logging.getLogger(__name__)

TICK_S = 1.0  # the longest the round sleeps: a failed round is seen working again this soon


class PushService:
    def __init__(self, core: PushCore, store: PushStore, providers: Mapping[str, PushProvider], links: LinkRegistry,
                 pending: Callable[[str], int], *, allow_loopback: bool, concurrency: int, clock: Clock,
                 supervisor: Supervisor, include_preview: bool = False) -> None:
        self.core = core
        self.providers = providers
        self.counters = {platform: ProviderCounters() for platform in providers}
        self._store = store
        self._links = links
        self._pending = pending
        self._allow_loopback = allow_loopback
        self.include_preview = include_preview
        self._concurrency = concurrency
        self._now_ms = clock.wall_ms
        self._supervisor = supervisor
        self._changes: dict[str, QueuedWake | None] = {}  # not written yet: client id -> wake-up (None: delete)
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # store writes of hooks, which cannot wait

    async def start(self) -> None:
        targets, queued, gone = await self._store.load()
        if not self.include_preview:  # turned off since they were queued: none goes out
            queued = [replace(wake, preview=None) for wake in queued]
        self.core.restore(targets, queued, gone)
        log.info("push: %d registration(s), %d queued wake-up(s) restored", len(self.core.targets),
                 len(self.core.queue))
        self._loop = self._supervisor.spawn("push", self._round)

    # --- DeliveryWatch: what messaging reports (never waits) -----------------------------------

    def staged(self, client_id: str, preview: str | None = None) -> None:
        self._queued(self.core.staged(client_id, self._now_ms(), preview if self.include_preview else None))

    def delivered(self, client_id: str) -> None:
        self.core.delivered(client_id, self._now_ms())
        self._wake.set()  # a grace deadline may now be the next thing due

    def acked(self, client_id: str) -> None:
        self.core.acked(client_id)

    def online(self, client_id: str) -> None:
        if self.core.online(client_id):
            self._change(client_id, None)
        if client_id in self.core.gone:  # rule 7: told once, on its next connection
            self.core.gone.discard(client_id)
            self._links.send(client_id, gone_error())
            self._spawn_write(self._store.clear_gone(client_id))

    def offline(self, client_id: str) -> None:
        self.core.offline(client_id)

    def removed(self, client_id: str) -> None:
        """``devices.remove``: the registration goes with the device."""
        self.core.unregister(client_id)
        self.core.gone.discard(client_id)
        self._changes.pop(client_id, None)
        self._spawn_write(self._store.unregister(client_id))

    def _queued(self, wake: QueuedWake | None) -> None:
        if wake is not None:
            self._change(wake.client_id, wake)

    def _change(self, client_id: str, wake: QueuedWake | None) -> None:
        self._changes[client_id] = wake
        self._wake.set()

    def _spawn_write(self, write: Awaitable[object]) -> None:
        self._tasks.add(task := asyncio.ensure_future(self._write(write)))
        task.add_done_callback(self._tasks.discard)

    async def _write(self, write: Awaitable[object]) -> None:
        try:
            await write
        except Exception as exc:  # the next start reconciles (an orphan registration is dropped then)
            self._supervisor.failed("push", exc)

    # --- requests ---------------------------------------------------------------------------

    def ops(self) -> dict[str, Op]:
        return {OP_PUSH_REGISTER: self._register, OP_PUSH_UNREGISTER: self._unregister, OP_PUSH_PENDING: self._count}

    async def _register(self, caller: Caller, args: dict[str, Any]) -> Any:
        target = registration(caller, args, self.providers, self._allow_loopback)
        await self._store.register(target, self._now_ms())
        self.core.register(target)
        if self._links.get(caller.client_id) is not None:
            self.core.online(caller.client_id)
        return {"platform": target.platform}

    async def preview_keys(self, client_ids: list[str]) -> dict[str, dict[str, str]]:
        """The key directory's ``PreviewKeys`` (every registration is in memory)."""
        return {client_id: key for client_id in client_ids
                if (key := preview_key(self.core.targets.get(client_id))) is not None}

    async def _unregister(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        self.core.unregister(caller.client_id)
        self._changes.pop(caller.client_id, None)
        return {"removed": await self._store.unregister(caller.client_id)}

    async def _count(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        return {"items": self._pending(caller.client_id)}

    # --- the round ----------------------------------------------------------------------------

    async def _round(self) -> None:
        """Write what changed, queue the overdue, send what is due; else wait (at most a tick)."""
        now = self._now_ms()
        for wake in self.core.overdue(now):
            self._changes[wake.client_id] = wake
        await self._write_changes()
        due = self.core.take_due(now, self._concurrency)
        if due:
            results = await asyncio.gather(*(self._send(wake, target) for wake, target in due),
                                           return_exceptions=True)
            await self._write_changes()
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:  # a gone mark not written: the supervisor reports it (kept in memory)
                raise failed
            return
        self._wake.clear()
        next_ms = self.core.next_due_ms()
        timeout = TICK_S if next_ms is None else min(TICK_S, max(0.0, (next_ms - self._now_ms()) / 1000))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _write_changes(self) -> None:
        changes, self._changes = self._changes, {}
        try:
            saves = [w for w in changes.values() if w is not None]
            if saves:
                await self._store.save_wakes(saves)
            deletes = [c for c, w in changes.items() if w is None]
            if deletes:
                await self._store.delete_wakes(deletes)
        except BaseException:
            self._changes = {**changes, **self._changes}  # newer changes win; all are written again
            raise

    async def _send(self, wake: QueuedWake, target: PushTarget) -> None:
        result = await attempt(self.providers, self.counters, wake, target)
        settled = self.core.settle(wake, target, result, self._now_ms())
        log_failure(target, result, settled is Settled.RETRY)
        if settled is Settled.GONE:
            self._changes.pop(wake.client_id, None)
            await self._store.mark_gone(wake.client_id)
        elif settled is Settled.RETRY:
            self._changes[wake.client_id] = self.core.queue[wake.client_id]
        elif wake.client_id not in self.core.queue:
            self._changes.setdefault(wake.client_id, None)

    def queue_depth(self) -> dict[str, int]:
        """Queued wake-ups by platform (metrics)."""
        depth = dict.fromkeys(self.providers, 0)
        for client_id in self.core.queue:
            platform = self.core.targets[client_id].platform
            depth[platform] = depth.get(platform, 0) + 1
        return depth

    async def close(self) -> None:
        if self._loop is not None:
            await cancel([self._loop])
            self._loop = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(Exception):
            await self._write_changes()
        for provider in self.providers.values():
            await provider.close()


def unsupported_ops() -> dict[str, Op]:
    """The ``push.*`` ops where push is off (``push.enabled: false``, or cluster mode)."""

    async def unsupported(caller: Caller, args: dict[str, Any]) -> Any:
        raise OpError(ErrorCode.UNSUPPORTED, "this server sends no push notifications")

    return dict.fromkeys((OP_PUSH_REGISTER, OP_PUSH_UNREGISTER, OP_PUSH_PENDING), unsupported)
