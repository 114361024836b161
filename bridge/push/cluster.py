"""Push in cluster mode: the shell over the shared push store (bridge/push/cluster_store.py).

Who learns what (docs/PUSH.md, "Cluster mode"):
- the node that stages a message learns which of its target devices are connected nowhere (the
  node directory, ``ClusterMessaging.wake``) and queues their wake-ups in the store (rule 1), which
  decides atomically whether one is due and when (rules 3 to 5), whichever node asks;
- the node a device is connected to follows its deliveries and acks in a ``PushCore`` of its own,
  holding only its connected registered devices (rule 2: a delivery not acked within the grace
  queues a wake-up in the store); the device's connection drops its queued wake-up and brings the
  ``push_gone`` mark (rule 7) from the store, wherever it connects;
- every node sweeps the due index's shards (``SWEEP_S``, and at once a shard where it queued a
  wake-up itself): what it takes is leased to it, sent, and settled with the core's rule 6
  (``retried``). A node that dies with a wake-up leased leaves it to the sweep after the lease; one
  that dies with it queued or backing off leaves it due in the index: another node sends it.
A wake-up queued because the device was away (or had left when its grace ran out) is dropped, not
sent, if the device is connected somewhere when it is taken (it connected meanwhile: rule 4); one
queued for a connection that did not ack is sent (the connection is dead, or the app frozen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.push.cluster_store import ClusterPushStore, Queued, Settlement, Taken, Why
from bridge.push.common import ProviderCounters, attempt, gone_error, log_failure, preview_key, registration
from bridge.push.core import PushCore, PushRules, QueuedWake, retried
from bridge.push.provider import Outcome, PushProvider
from bridge.requests import Op, check_args
from bridge.store import StoreError
from chatproto import OP_PUSH_PENDING, OP_PUSH_REGISTER, OP_PUSH_UNREGISTER, Caller

log = logging.getLogger(__name__)

TICK_S: Final = 1.0
SWEEP_S: Final = 5.0  # every shard is looked at this often by every node: a dead node's wake-ups go this soon
LEASE_MS: Final = 60_000  # longer than any provider's request: a wake-up is sent by one node at a time


class ClusterPush:
    """``DeliveryWatch`` of ``ClusterMessaging``, the ``push.*`` requests, and the sending round."""

    def __init__(self, rules: PushRules, store: ClusterPushStore, providers: Mapping[str, PushProvider],
                 links: LinkRegistry, locate: Callable[[list[str]], Awaitable[dict[str, str]]],
                 pending: Callable[[str], Awaitable[int]], *, allow_loopback: bool, concurrency: int, clock: Clock,
                 supervisor: Supervisor, include_preview: bool = False, sweep_s: float = SWEEP_S,
                 lease_ms: int = LEASE_MS) -> None:
        self.rules = rules
        # This node's connected (and lately connected) registered devices, for rule 2 only: its own
        # queue is never used (wake-ups are queued in the store), so it is not bounded here.
        self.core = PushCore(replace(rules, max_queue=2**62))
        self.providers = providers
        self.counters = {platform: ProviderCounters() for platform in providers}
        self._store = store
        self._links = links
        self._locate = locate
        self._pending = pending
        self._allow_loopback = allow_loopback
        self.include_preview = include_preview
        self._concurrency = concurrency
        self._per_shard = max(1, -(-rules.max_queue // store.shards))
        self._now_ms = clock.wall_ms
        self._supervisor = supervisor
        self._sweep_ms = int(sweep_s * 1000)
        self._lease_ms = lease_ms
        self._next_sweep_ms = 0
        self._soon: dict[int, int] = {}  # shard -> when a wake-up this node queued there is due
        self._depths: dict[int, int] = {}  # shard -> wake-ups it held at its last sweep
        self._held: set[str] = set()  # connected here, woken since their last ack: that ack is told (rule 3)
        self._left: dict[str, int] = {}  # registered devices that left: forgotten once their grace has passed
        # A queue call in flight answers for a message staged meanwhile; the newest preview of those
        # (if any) follows it in a queue call of its own (rule 8).
        self._queueing: dict[str, str | None] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._loop = self._supervisor.spawn("push", self._round)

    # --- DeliveryWatch: what messaging reports (never waits) -----------------------------------

    def staged(self, client_id: str, preview: str | None = None) -> None:
        """A message was staged for the device while it was connected nowhere (rule 1), with the
        preview its sender encrypted for it (dropped here unless ``include_preview``)."""
        if not self.include_preview:
            preview = None
        if client_id in self._queueing:
            if preview is not None:
                self._queueing[client_id] = preview
            return
        self._queueing[client_id] = None
        self._spawn(self._queue_staged(client_id, preview))

    def delivered(self, client_id: str) -> None:
        if client_id in self.core.targets:
            self.core.delivered(client_id, self._now_ms())
            self._wake.set()  # its grace deadline may be the next thing due

    def acked(self, client_id: str) -> None:
        self.core.acked(client_id)
        if client_id in self._held:
            self._held.discard(client_id)
            self._spawn(self._store.acked(client_id))

    def online(self, client_id: str) -> None:
        self._left.pop(client_id, None)
        self._spawn(self._arrive(client_id))

    def offline(self, client_id: str) -> None:
        self.core.offline(client_id)
        self._held.discard(client_id)
        if client_id in self.core.targets:  # a delivery not acked still wakes it after the grace (rule 2)
            self._left[client_id] = self._now_ms()

    def removed(self, client_id: str) -> None:
        """``devices.remove``: the registration goes with the device."""
        self._forget(client_id)
        self._spawn(self._store.unregister(client_id))

    def _forget(self, client_id: str) -> None:
        self.core.unregister(client_id)
        self._held.discard(client_id)
        self._left.pop(client_id, None)

    async def _arrive(self, client_id: str) -> None:
        arrival = await self._store.online(client_id)
        if self._links.get(client_id) is None:  # gone again meanwhile
            return
        if arrival.gone:  # rule 7: told once, on its next connection, wherever
            self._links.send(client_id, gone_error())
        if arrival.target is not None:
            self.core.register(arrival.target)
            self.core.online(client_id)
            if arrival.held:
                self._held.add(client_id)

    async def _queue_staged(self, client_id: str, preview: str | None) -> None:
        try:
            await self._queue(client_id, Why.STAGED, preview)
        finally:
            if (newer := self._queueing.pop(client_id, None)) is not None:
                self.staged(client_id, newer)

    async def _queue(self, client_id: str, why: Why, preview: str | None = None) -> None:
        now = self._now_ms()
        status, wake = await self._store.queue(
            QueuedWake(client_id, now, now + self.rules.wake_ttl_ms, preview=preview), why, self._per_shard)
        if status is Queued.FULL:
            self.core.dropped += 1
        elif wake is not None:
            self._expect(self._store.shard(client_id), wake.due_ms)

    def _expect(self, shard: int, due_ms: int) -> None:
        self._soon[shard] = min(due_ms, self._soon.get(shard, due_ms))
        self._wake.set()

    def _spawn(self, work: Awaitable[object]) -> None:
        self._tasks.add(task := asyncio.ensure_future(self._report(work)))
        task.add_done_callback(self._tasks.discard)

    async def _report(self, work: Awaitable[object]) -> None:
        try:
            await work
        except StoreError as exc:  # the store rode out a failover first: this one is lost (logged, counted)
            self._supervisor.failed("push", exc)

    # --- requests ---------------------------------------------------------------------------

    async def preview_keys(self, client_ids: list[str]) -> dict[str, dict[str, str]]:
        """The key directory's ``PreviewKeys``: read from the store (one round trip per shard)."""
        return {client_id: key for client_id, target in (await self._store.registrations(client_ids)).items()
                if (key := preview_key(target)) is not None}

    def ops(self) -> dict[str, Op]:
        return {OP_PUSH_REGISTER: self._register, OP_PUSH_UNREGISTER: self._unregister, OP_PUSH_PENDING: self._count}

    async def _register(self, caller: Caller, args: dict[str, Any]) -> Any:
        target = registration(caller, args, self.providers, self._allow_loopback)
        await self._store.register(target)
        if self._links.get(caller.client_id) is not None:
            self._left.pop(caller.client_id, None)
            self.core.register(target)
            self.core.online(caller.client_id)
        return {"platform": target.platform}

    async def _unregister(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        self._forget(caller.client_id)
        return {"removed": await self._store.unregister(caller.client_id)}

    async def _count(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        return {"items": await self._pending(caller.client_id)}

    # --- the round ----------------------------------------------------------------------------

    async def _round(self) -> None:
        """Queue the overdue (rule 2), take and send what is due in the shards to look at; else wait."""
        now = self._now_ms()
        for wake in self.core.overdue(now):
            self.core.queue.pop(wake.client_id, None)  # queued in the store instead
            here = self._links.get(wake.client_id) is not None
            if here:
                self._held.add(wake.client_id)
            # One that left may be connected elsewhere by the time it is taken: then it is not woken.
            self._spawn(self._queue(wake.client_id, Why.GRACE if here else Why.STAGED))
        shards = [shard for shard, due in self._soon.items() if due <= now]
        if now >= self._next_sweep_ms:
            shards, self._next_sweep_ms = list(range(self._store.shards)), now + self._sweep_ms
            for client_id, left_ms in list(self._left.items()):
                if left_ms + self.rules.grace_ms < now:  # its deadline, if any, has passed (overdue above)
                    del self._left[client_id]
                    self.core.unregister(client_id)
        for shard in shards:
            self._soon.pop(shard, None)
            taken, self._depths[shard] = await self._store.take(shard, now, self._concurrency, self._lease_ms,
                                                                secrets.token_hex(8))
            if len(taken) == self._concurrency:  # more may be due: look again at once
                self._soon[shard] = now
            await self._send_all(taken)
        self._wake.clear()
        due = [self._next_sweep_ms, *self._soon.values()]
        if (deadline := self.core.next_due_ms()) is not None:
            due.append(deadline)
        timeout = min(TICK_S, max(0.0, (min(due) - self._now_ms()) / 1000))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _send_all(self, taken: list[Taken]) -> None:
        away = [t.wake.client_id for t in taken if t.why is Why.STAGED]
        try:
            connected = set(await self._locate(away)) if away else set()
        except StoreError as exc:  # sent all the same: a device that connected meanwhile gets one wake-up too many
            log.warning("push: cannot locate %d device(s) before waking them: %s", len(away), exc)
            connected = set()
        results = await asyncio.gather(*(self._send(t, t.why is Why.STAGED and t.wake.client_id in connected)
                                         for t in taken), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:  # a settle not written: its lease runs out and another sweep sends it again
            raise failed

    async def _send(self, taken: Taken, connected: bool) -> None:
        wake, target = taken.wake, taken.target
        if connected or self._now_ms() >= wake.expires_ms:  # rule 4 (it connected meanwhile); rule 6 (expired)
            await self._store.settle(taken, Settlement())
            return
        result = await attempt(self.providers, self.counters, wake, target)
        now = self._now_ms()
        if result.outcome is Outcome.SENT:
            settlement = Settlement(sent=True, hold_until_ms=now + self.rules.min_interval_ms)
        else:
            settlement = Settlement(gone=result.outcome is Outcome.GONE, again=retried(self.rules, wake, result, now))
        log_failure(target, result, settlement.again is not None)
        await self._store.settle(taken, settlement)
        if settlement.again is not None:
            self._expect(self._store.shard(wake.client_id), settlement.again.due_ms)
        if settlement.gone:
            self._forget(wake.client_id)

    def queue_depth(self) -> dict[str, int]:
        """Wake-ups queued in the whole cluster, as this node's sweeps last counted them (metrics):
        the store does not count them by platform."""
        return {"all": sum(self._depths.values())}

    async def close(self) -> None:
        if self._loop is not None:
            await cancel([self._loop])
            self._loop = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for provider in self.providers.values():
            await provider.close()
