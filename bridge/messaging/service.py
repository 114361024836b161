"""Messaging, one-to-one and to groups: the thin shell around the staging core.

It feeds ``GroupStaging`` (the staging core with groups) with uplinks and the time (from
the ``Clock`` passed in), carries out each ``StagingOutcome`` (items to devices, notices,
body reads), and runs its background jobs under the ``Supervisor`` passed in
(``bridge/background.py``): the group-commit flusher, redelivery, the TTL sweep, WAL
checkpoints, and body reads.
Uplinks are handled synchronously; when a recipient is not in the in-memory
directory yet, or a group message's group is not in memory or is being changed
(``GroupRouting``: bridge/groups/service.py), that device's later uplinks wait in a
lane behind the lookup so its messages keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from bridge.background import Backoff, Supervisor, cancel
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.messaging.groups import GroupStaging
from bridge.messaging.records import FlushBatch, StagingOutcome
from bridge.messaging.store import MessageStore, UserLookup
from bridge.store import StoreError
from chatproto import (
    DEFAULT_MAX_DEVICES_PER_MESSAGE,
    RECEIPT_SENT,
    Ack,
    Caller,
    ChatMessage,
    DecodeError,
    ErrorCode,
    ErrorItem,
    MsgItem,
    ReceiptItem,
    Seen,
    is_group_id,
)

log = logging.getLogger(__name__)

TICK_S = 1.0
CHECKPOINT_MAX_DELAY_S = 30.0
CLOSE_TRIES = 3  # writes of what is left at shutdown before it is given up (and logged)


class GroupRouting(Protocol):
    """Who is in a group, for a group message (bridge/groups/service.py)."""

    def members_now(self, group: str) -> tuple[str, ...] | None:
        """The members of ``group`` if that can be said without waiting (None: use ``settled``)."""

    def settled(self, group: str) -> AbstractAsyncContextManager[tuple[str, ...]]:
        """Hold changes of ``group`` off while the message is staged; gives its members (none: no such group)."""


class DeliveryWatch(Protocol):
    """Who follows what happens to devices' items (push: bridge/push/service.py); never waits."""

    def staged(self, client_id: str, preview: str | None = None) -> None:
        """A message item was staged for the device (with the push preview its sender encrypted for it)."""

    def delivered(self, client_id: str) -> None:
        """A message item was sent to the device's connection."""

    def acked(self, client_id: str) -> None: ...

    def online(self, client_id: str) -> None: ...

    def offline(self, client_id: str) -> None: ...

    def removed(self, client_id: str) -> None:
        """``devices.remove``."""


class Messaging:
    def __init__(
        self,
        staging: GroupStaging,
        store: MessageStore,
        links: LinkRegistry,
        users: UserLookup,
        max_body_bytes: int,
        checkpoint_idle_s: float,
        sweep_s: float = 60.0,
        max_devices_per_message: int = DEFAULT_MAX_DEVICES_PER_MESSAGE,
        *,
        clock: Clock,
        supervisor: Supervisor,
    ) -> None:
        self.staging = staging
        self.links = links
        self._store = store
        self._users = users
        self._max_body = max_body_bytes
        self._max_devices = max_devices_per_message
        self._checkpoint_idle = checkpoint_idle_s
        self._sweep_s = sweep_s
        self._now_ms = clock.wall_ms
        self._now = clock.monotonic
        self._wake = asyncio.Event()
        self._lanes: dict[str, deque[tuple[str, Caller, bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._flushing = False
        self._deleted_since_checkpoint = False
        self._last_write = 0.0
        self._last_checkpoint = 0.0
        self.supervisor = supervisor
        self._body_backoff = Backoff()
        self.groups: GroupRouting | None = None  # set by the wiring: group messages are refused without it
        self.watch: DeliveryWatch | None = None  # set by the wiring when push is on

    async def start(self) -> None:
        spawn = self.supervisor.spawn
        self._loops = [spawn("flush", self._flush_round), spawn("redeliver", self._redeliver_round),
                       spawn("sweep", self._sweep_round), spawn("checkpoint", self._checkpoint_round)]

    # --- uplinks ---------------------------------------------------------------------

    def on_out(self, caller: Caller, payload: bytes) -> None:
        self._enter_lane("out", caller, payload)

    def on_seen(self, caller: Caller, payload: bytes) -> None:
        self._enter_lane("seen", caller, payload)

    def on_ack(self, caller: Caller, payload: bytes) -> None:
        try:
            ack = Ack.decode(payload)
        except DecodeError as exc:
            self.links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        if self.watch is not None:
            self.watch.acked(caller.client_id)
        self._apply(self.staging.ack(caller.client_id, ack.seqs, self._now_ms(), self._now()))

    def _enter_lane(self, kind: str, caller: Caller, payload: bytes) -> None:
        lane = self._lanes.get(caller.client_id)
        if lane is not None:
            lane.append((kind, caller, payload))
            return
        peer = self._handle_now(kind, caller, payload)
        if peer is not None:  # unknown recipient: look it up, keep later uplinks of this device behind it
            self._lanes[caller.client_id] = deque([(kind, caller, payload)])
            self._spawn(self._run_lane(caller.client_id))

    def _handle_now(self, kind: str, caller: Caller, payload: bytes, looked_up: bool = False,
                    members: tuple[str, ...] | None = None) -> str | None:
        """Handle an out/seen uplink; returns the peer to look up first, if it is not in the directory
        (a group: whose members are not known now; ``members`` are the group's, once they are)."""
        item: ChatMessage | Seen
        try:
            if kind == "out":
                item = ChatMessage.decode(payload, self._max_body, self._max_devices)
            else:
                item = Seen.decode(payload)
        except DecodeError as exc:
            self.links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return None
        peer = item.to
        if isinstance(item, ChatMessage) and is_group_id(peer):
            return self._to_group(caller, item, members)
        if isinstance(item, Seen) and is_group_id(peer):  # their tracking says who may report it
            if self.groups is None:
                self.links.send(caller.client_id, ErrorItem(ErrorCode.UNSUPPORTED, "groups are not served here"))
            else:
                self._apply(self.staging.seen_group(caller.user, peer, item.ids, caller.client_id, self._now_ms(),
                                                    self._now()))
            return None
        if not looked_up and not self.staging.directory.exists(peer):
            return peer
        if isinstance(item, ChatMessage):
            self._apply(self.staging.submit(caller.client_id, caller.user, item, self._now_ms(), self._now()),
                        item.previews)
        else:
            self._apply(self.staging.seen(caller.user, peer, item.ids, caller.client_id, self._now_ms(), self._now()))
        return None

    def _to_group(self, caller: Caller, message: ChatMessage, members: tuple[str, ...] | None) -> str | None:
        if self.groups is None:
            self.links.send(caller.client_id, ErrorItem(ErrorCode.UNSUPPORTED, "groups are not served here",
                                                        message.id))
            return None
        members = members if members is not None else self.groups.members_now(message.to)
        if members is None:
            return message.to
        self._apply(self.staging.submit_group(caller.client_id, caller.user, message,
                                              members if caller.user in members else None, self._now_ms(),
                                              self._now()))
        return None

    async def _run_lane(self, client_id: str) -> None:
        lane = self._lanes[client_id]
        try:
            while lane:
                kind, caller, payload = lane[0]
                peer = self._handle_now(kind, caller, payload)
                if peer is not None and is_group_id(peer) and self.groups is not None:
                    async with self.groups.settled(peer) as members:
                        self._handle_now(kind, caller, payload, members=members)
                elif peer is not None:
                    devices = await self._users.user_devices(peer)
                    if devices is not None:
                        self.staging.directory.add_user(peer, devices)
                    self._handle_now(kind, caller, payload, looked_up=True)
                lane.popleft()
        except Exception:
            log.exception("lane of %s failed", client_id)
            for _, caller, _payload in lane:
                self.links.send(caller.client_id,
                                ErrorItem(ErrorCode.INTERNAL, "the server failed to handle this item"))
        finally:
            del self._lanes[client_id]

    # --- devices --------------------------------------------------------------------------

    def device_online(self, client_id: str) -> None:
        if self.watch is not None:
            self.watch.online(client_id)
        self._apply(self.staging.device_online(client_id, self._now()))

    def device_offline(self, client_id: str) -> None:
        if self.watch is not None:
            self.watch.offline(client_id)
        self.staging.device_offline(client_id)

    def remove_device(self, user: str, device: str) -> None:
        """``devices.remove``: drop what is staged for the device; it is no target any more."""
        if self.watch is not None:
            self.watch.removed(f"{user}.{device}")
        self._apply(self.staging.remove_device(f"{user}.{device}"))

    def device_registered(self, user: str, device: str) -> None:
        """A device logged in for the first time: known from now on; a first device takes held items."""
        directory = self.staging.directory
        if not directory.exists(user):
            directory.add_user(user)
        if directory.add_device(user, device):
            self._apply(self.staging.adopt_placeholder(user, f"{user}.{device}", self._now()))

    # --- carrying out outcomes -----------------------------------------------------------

    def carry_out(self, out: StagingOutcome) -> None:
        """Send what ``out`` says and wake the commit (for the group service's staged events)."""
        self._apply(out)

    def _apply(self, out: StagingOutcome, previews: dict[str, str] | None = None) -> None:
        # Notices first: one outcome can hold both 'sent' (a notice) and 'delivered'
        # (a delivery) for the sender, who must see them in that order (found by
        # tests/sdk); when the 'delivered' goes out now, the core folds 'sent' into it.
        for client_id, notice in out.notices:
            if isinstance(notice, ReceiptItem) and notice.status == RECEIPT_SENT:
                self._sent(notice)
            self.links.send(client_id, notice)
        for folded in out.folded:  # 'sent' all the same, told by the 'delivered' among the deliveries
            self._sent(folded)
        watch = self.watch
        for device, delivery in out.deliveries:
            # not connected: it waits, staged, for the next connection
            if self.links.send(device, delivery) and watch is not None and isinstance(delivery, MsgItem):
                watch.delivered(device)
        if watch is not None:
            for device in out.staged:  # previews: of the message just submitted (push decides whether to keep them)
                watch.staged(device, previews.get(device) if previews else None)
        if out.need_bodies or out.need_item_bodies:
            self._spawn(self._load_bodies(out.need_bodies, out.need_item_bodies))
        if out.flush_due:
            self._wake.set()

    def _sent(self, notice: ReceiptItem) -> None:
        """Metrics: staged (the notice's ts) -> 'sent'."""
        self.staging.counters.sent_latency.observe(max(0, self._now_ms() - notice.ts) / 1000)

    async def _load_bodies(self, mids: list[int], keys: list[tuple[str, int]]) -> None:
        try:
            bodies = await self._store.bodies(mids) if mids else {}
            item_bodies = await self._store.item_bodies(keys) if keys else {}
        except Exception as exc:
            self.supervisor.failed("body_read", exc)
            await asyncio.sleep(self._body_backoff.failed())  # the retry below asks again at once
            self._apply(self.staging.bodies_loaded({}, self._now()))  # clears the waiting marks: asked again
            return
        self.supervisor.succeeded("body_read")
        self._body_backoff.succeeded()
        for mid in set(mids) - set(bodies):
            log.error("staged message %d has no body on disk: dropping its items", mid)
            self._apply(self.staging.body_missing(mid, self._now_ms(), self._now()))
        for device, seq in set(keys) - set(item_bodies):
            log.error("staged olm item %s/%d has no ciphertext on disk: dropping it", device, seq)
            self._apply(self.staging.item_body_missing(device, seq, self._now()))
        self._apply(self.staging.bodies_loaded(bodies, self._now(), item_bodies))

    # --- background jobs (rounds run by the supervisor) ------------------------------------

    async def _flush_round(self) -> None:
        """Wait until a commit is due (at most a tick: a failed task is seen working again), then write."""
        due = self.staging.next_flush_at(self._now())
        if due is None or due > self._now():
            self._wake.clear()
            timeout = TICK_S if due is None else min(TICK_S, max(0.0, due - self._now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            return
        await self._flush_once(self._now())

    async def _flush_once(self, now: float) -> None:
        """Write what is due; raises (after putting back what was not written) if any of it failed."""
        batch = self.staging.take_flush(now)
        if batch is None:
            return
        try:
            await self._commit(batch)
        except StoreError:
            self.staging.counters.commit_failures += 1
            self._apply(self.staging.flush_failed(batch))  # the disk: all of it again later
            raise
        except Exception:
            # Not the disk: what is written (text it cannot encode) or a bug. Part by part,
            # so that one part that can never be written does not hold back the others.
            self.staging.counters.commit_failures += 1
            await self._commit_parts(batch)
            raise
        except BaseException:  # cancelled (shutdown) mid-commit: rolled back, so all of it is pending again
            self._apply(self.staging.flush_failed(batch))
            raise

    async def _commit(self, batch: FlushBatch) -> None:
        self._flushing = True
        started = time.perf_counter()
        try:
            await self._store.commit(batch)
        finally:
            self._flushing = False
        counters = self.staging.counters
        counters.commit_seconds.observe(time.perf_counter() - started)
        counters.commit_rows.observe(len(batch.items) + len(batch.deleted_items))
        self._last_write = self._now()
        if batch.deleted_items or batch.deleted_bodies:
            self._deleted_since_checkpoint = True
        self._apply(self.staging.flush_done(batch, self._now()))

    async def _commit_parts(self, batch: FlushBatch) -> None:
        """Write ``batch`` part by part. A message or receipt that fails on its own while other
        parts are written is what cannot be written: it is dropped and its sender told. If
        nothing can be written, the fault is not in the items: all of them are kept."""
        failed: list[tuple[FlushBatch, Exception]] = []
        wrote = False
        parts = batch.parts()
        for n, part in enumerate(parts):
            try:
                await self._commit(part)
            except StoreError:
                self._apply(self.staging.flush_failed(part))
            except Exception as exc:
                failed.append((part, exc))
            except BaseException:  # cancelled: what is not written is pending again
                for left in [*(p for p, _ in failed), *parts[n:]]:
                    self._apply(self.staging.flush_failed(left))
                raise
            else:
                wrote = True
        for part, error in failed:
            if wrote and (part.bodies or any(item.message is None for item in part.items)):
                log.error("cannot write %s (%r): dropped, its sender is told", _describe(part), error)
                self._apply(self.staging.drop_unwritable(part))
            else:  # the rest (deletions, marks) is never dropped
                self._apply(self.staging.flush_failed(part))

    async def _redeliver_round(self) -> None:
        await asyncio.sleep(TICK_S)
        self._apply(self.staging.redeliver(self._now()))

    async def _sweep_round(self) -> None:
        await asyncio.sleep(self._sweep_s)
        self._apply(self.staging.expire(self._now_ms(), self._now()))
        await self._store.prune(self._now_ms())

    async def _checkpoint_round(self) -> None:
        await asyncio.sleep(min(TICK_S, self._sweep_s))
        await self._maybe_checkpoint(self._now())

    async def _maybe_checkpoint(self, now: float) -> None:
        if not self._deleted_since_checkpoint or self._flushing:
            return
        idle = now - self._last_write >= self._checkpoint_idle
        overdue = now - self._last_checkpoint >= CHECKPOINT_MAX_DELAY_S
        if idle or overdue:
            self._deleted_since_checkpoint = False
            self._last_checkpoint = now
            await self._store.checkpoint()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the jobs and write everything still only in memory (graceful shutdown); always ends."""
        await cancel(self._loops)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        failures = 0  # a write can leave deletions for one more: go on until nothing waits
        while failures < CLOSE_TRIES and self.staging.next_flush_at(float("inf")) is not None:
            try:
                await self._flush_once(float("inf"))
            except Exception as exc:
                failures += 1
                self.supervisor.failed("flush", exc)
        left = self.staging.take_flush(float("inf"))
        if left is not None:
            log.error("shutdown: could not write %s; lost", _describe(left))
        with contextlib.suppress(Exception):
            await self._store.checkpoint()


def _describe(batch: FlushBatch) -> str:
    """For the log: counts, and the first message ids (sender/id), never bodies."""
    ids = ", ".join(f"{m.sender}/{m.msg_id}" for m in batch.bodies[:10])
    return (f"{len(batch.bodies)} message(s) [{ids}], {len(batch.items)} item(s), "
            f"{len(batch.deleted_items) + len(batch.deleted_bodies)} deletion(s)")
