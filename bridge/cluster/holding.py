"""The shell of write-back in cluster mode (the rules: bridge/cluster/writeback.py): holds items
for devices connected to this node, writes them to Redis in their lanes' order when due, settles
what every target acked, and answers each held message's ``sent``. ``ClusterMessaging``
(bridge/cluster/messaging.py) owns it and is its ``HoldHost``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from bridge.background import Supervisor
from bridge.clock import Clock
from bridge.cluster.store import MessageRef, QueuedItem, QueueStore, Stage, StageStatus
from bridge.cluster.window import Alias, WindowOutcome, Windows
from bridge.cluster.writeback import Held, WriteBack, item_for
from bridge.links import LinkRegistry
from bridge.messaging.admission import Holds, Refused
from bridge.messaging.store import UserLookup
from chatproto import RECEIPT_SENT, ErrorCode, ErrorItem, ReceiptItem

log = logging.getLogger(__name__)


def being_delivered(ref: str | None) -> ErrorItem:
    """A repeat of a message some node holds and has not written yet: not 'sent' yet."""
    return ErrorItem(ErrorCode.RATE_LIMITED, "this message is being delivered; send it again later", ref)


class HoldHost(Protocol):
    """What the shell needs of the messaging service that owns it."""

    windows: Windows

    def apply(self, out: WindowOutcome) -> None: ...

    async def wake(self, targets: list[tuple[str, int]]) -> None: ...

    async def retrying(self, what: str, step: Callable[[], Awaitable[object]]) -> None: ...

    def spawn(self, coro: Any) -> asyncio.Task[None]: ...


@dataclass(eq=False, slots=True)
class Ticket:
    """A held message's ``sent``: due when each of its held stages is written or settled."""

    origin: str
    msg_id: str
    to: str
    ts: int
    waiting: set[Held]


class Holding:
    def __init__(self, host: HoldHost, queues: QueueStore, users: UserLookup, links: LinkRegistry, holds: Holds,
                 *, flush_ms: int, pending_hold_ms: int, clock: Clock, supervisor: Supervisor) -> None:
        self._host = host
        self._queues = queues
        self._users = users
        self.links = links
        self.counters = links.counters
        self._holds = holds
        self._flush_ms = flush_ms
        self._pending_hold_ms = pending_hold_ms
        self._now = clock.monotonic
        self._now_ms = clock.wall_ms
        self.supervisor = supervisor
        self._writeback = WriteBack(flush_ms / 1000)
        self._tickets: dict[Held, Ticket] = {}
        self._lane_tails: dict[str, asyncio.Task[None]] = {}  # per lane: its last write queued
        self._flush_wake = asyncio.Event()

    def report_seen(self, recipient: str, sender: str, msg_ids: list[str]) -> list[str]:
        return self._writeback.report_seen(recipient, sender, msg_ids)

    def gone(self, client_id: str) -> None:
        """Rule 2: a device left; its held items go to Redis now."""
        self.write_all(self._writeback.gone(client_id))

    def write_everything(self) -> None:
        """At shutdown: write all that is held."""
        self.write_all(self._writeback.due(float("inf")))

    async def _targets_here(self, stage: Stage) -> tuple[str, ...] | None:
        """Rule 1: the stage's target devices if each is connected here and can get a held item."""
        if self._flush_ms <= 0 or not self._host.windows.has_user(stage.user):
            return None  # (no Redis call for a user with no device here: the common cross-node case)
        devices = stage.devices
        if devices is None:
            names = await self._users.user_devices(stage.user)
            devices = tuple(f"{stage.user}.{name}" for name in names or ())
        if not devices or not all(self._host.windows.can_hold(client_id) for client_id in devices):
            return None
        return devices

    async def hold_message(self, origin: str, stages: list[Stage]) -> tuple[list[Stage], bool]:
        """Rule 1 for a new message: reserve it in Redis and hand it to its devices from memory.
        Returns whether it is held, else the stages to write (those reserved marked ``writeback``)."""
        if self._writeback.busy(origin):
            return stages, False
        plans = [await self._targets_here(stage) for stage in stages]
        if any(devices is None for devices in plans):
            return stages, False
        reserved: list[Stage] = []
        tails: dict[str, int] = {}
        for stage, devices in zip(stages, plans, strict=True):
            planned = replace(stage, devices=devices)
            reservation = await self._queues.reserve(planned, self._flush_ms + self._pending_hold_ms,
                                                     whole_user=stage.devices is None)
            status = reservation.status
            if status == StageStatus.STAGED:
                reserved.append(planned)
                tails.update(reservation.tails)
                continue
            message = stage.message
            if status == StageStatus.PENDING and message is not None:
                if self._writeback.holds(message.sender, message.msg_id):  # a repeat: the first one's 'sent' answers it
                    return [], True
                self._holds.hold(origin, message.msg_id, ErrorCode.RATE_LIMITED, self._now())
                raise Refused(being_delivered(message.msg_id))
            return [replace(r, writeback=True) for r in reserved] + stages[len(reserved):], False
        allocated = [self._local_seqs(planned, tails) for planned in reserved]
        if any(seqs is None for seqs in allocated) or self._writeback.busy(origin):
            return [replace(r, writeback=True) for r in reserved], False
        first = reserved[-1].message
        if first is None:
            raise ValueError("a message stage carries its message")
        ticket = Ticket(origin, first.msg_id, first.recipient, first.ts, set())
        for planned, seqs in zip(reserved, allocated, strict=True):
            if seqs is not None:
                held = self._hold(planned, origin, seqs)
                ticket.waiting.add(held)
                self._tickets[held] = ticket
        return [], True

    def _local_seqs(self, stage: Stage, tails: dict[str, int]) -> dict[str, int] | None:
        """A local seq for each target, or None: a device left or cannot take one, or has not read
        everything queued for it yet (an earlier item, maybe an earlier message of this sender
        through Redis, would reach it after this one: found by `bench chaos --cluster`)."""
        devices = stage.devices or ()
        windows = self._host.windows
        if not all(windows.can_hold(c) and windows.read_past(c, tails.get(c, 0)) for c in devices):
            return None
        seqs = {client_id: self._host.windows.local_seq(client_id) for client_id in devices}
        return {client_id: seq for client_id, seq in seqs.items() if seq is not None}

    def _hold(self, stage: Stage, lane: str, seqs: dict[str, int]) -> Held:
        now = self._now()
        links = {client_id: self._host.windows.link(client_id) or 0 for client_id in seqs}
        held = self._writeback.hold(stage, lane, seqs, links, now)
        self.counters.count_writeback("held", stage.message is not None)
        for client_id, seq in seqs.items():
            item = item_for(stage, client_id, seq)
            if item is not None:  # (an olm target always has its ciphertext)
                self._host.apply(self._host.windows.push_local(client_id, QueuedItem(item, stage.expires_ms), now))
        self._flush_wake.set()
        return held

    async def hold_receipts(self, stages: list[Stage]) -> bool:
        """Rule 1 for receipts to one user: held if every target is here (no reservation: a receipt
        has no dedup mark)."""
        lane = self.receipt_lane(stages[0].user)
        if self._writeback.busy(lane):
            return False
        plans = [await self._targets_here(stage) for stage in stages]
        if any(devices is None for devices in plans):
            return False
        planned = [replace(stage, devices=devices) for stage, devices in zip(stages, plans, strict=True)]
        tails: dict[str, int] = {}
        for stage in planned:
            tails.update(await self._queues.tails(stage.user, list(stage.devices or ())))
        allocated = [self._local_seqs(stage, tails) for stage in planned]
        if any(seqs is None for seqs in allocated) or self._writeback.busy(lane):
            return False
        for stage, seqs in zip(planned, allocated, strict=True):
            if seqs is not None:
                self._hold(stage, lane, seqs)
        return True

    @staticmethod
    def receipt_lane(user: str) -> str:
        return f"receipts to {user}"  # not a client id: those have no space

    async def flush_round(self) -> None:
        due = self._writeback.next_due()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_wake.wait(), None if due is None else max(0.0, due - self._now()))
        self._flush_wake.clear()
        self.write_all(self._writeback.due(self._now()))

    def write_all(self, helds: list[Held]) -> None:
        by_lane: dict[str, list[Held]] = {}
        for held in helds:
            by_lane.setdefault(held.lane, []).append(held)
        for lane, in_lane in by_lane.items():
            self._queue_write(lane, in_lane)

    async def write_lane(self, lane: str) -> None:
        """Rule 2: the lane's held items are written (and those being written are done) first."""
        helds = self._writeback.lane(lane)
        if helds or lane in self._lane_tails:
            await asyncio.wait({self._queue_write(lane, helds)})  # (not cancelled with the caller)

    def _queue_write(self, lane: str, helds: list[Held]) -> asyncio.Task[None]:
        """A lane's writes run one after another in the order their items were taken, which is the
        lane's order. (A lock taken when each write's task started let a direct stage, whose
        write_lane found nothing left to take, go to Redis before the items a flush had just taken:
        a later message below earlier ones in the queue, found by ``bench chaos --cluster``.)"""
        task = self._host.spawn(self._write(lane, helds, self._lane_tails.get(lane)))
        self._lane_tails[lane] = task
        task.add_done_callback(functools.partial(self._write_done, lane))
        return task

    def _write_done(self, lane: str, task: asyncio.Task[None]) -> None:
        if self._lane_tails.get(lane) is task:
            del self._lane_tails[lane]

    async def _write(self, lane: str, helds: list[Held], after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait({after})
        for held in helds:
            try:
                await self._write_held(held)
            except Exception as exc:  # a bug: the sender must not wait for 'sent' for ever
                log.exception("a held item of %s was not written", lane)
                self.supervisor.failed("flush", exc)
                self._writeback.written(held)
                self._held_failed(held)

    async def _write_held(self, held: Held) -> None:
        """Write what is unacked of a held stage; its devices still here take the written copy as an
        alias of what they got (window rule 5); those that acked meanwhile ack the copy."""
        stage = replace(held.write_stage(), max_queue=2**31, token=secrets.token_hex(8))  # retries answer the same
        staged: list[tuple[str, int]] = []

        async def write() -> None:
            staged[:] = (await self._queues.stage(stage)).targets

        await self._host.retrying("a held item", write)
        self._writeback.written(held)
        self.counters.count_writeback("written", held.stage.message is not None)
        message = stage.message
        if message is not None and stage.delivery and held.reported:  # reported while being written: not again
            await self._host.retrying("its delivery record", functools.partial(
                self._queues.mark_delivered, stage.user, message.sender, [message.msg_id]))
        for client_id, seq in staged:
            aliased = self._host.windows.alias(client_id, held.links.get(client_id, 0), held.seqs[client_id], seq)
            if client_id in held.acked_while_writing or aliased == Alias.ACKED:
                ack = functools.partial(self._queues.ack, client_id, [seq])
                await self._host.retrying("an ack of a held item", ack)
        await self._host.wake(staged)  # a device that left reads it wherever it is now
        self._held_done(held)

    async def _settle(self, held: Held) -> None:
        """Rule 3: every target acked a held message; its dedup mark is all that is written."""
        if held.stage.message is not None:
            await self._host.retrying("a dedup mark", functools.partial(self._queues.settle, held.stage))
        self.counters.count_writeback("settled", held.stage.message is not None)
        self._held_done(held)

    def _held_done(self, held: Held) -> None:
        ticket = self._tickets.pop(held, None)
        if ticket is None:
            return
        ticket.waiting.discard(held)
        if not ticket.waiting:
            ts = self._now_ms()
            self.counters.sent_latency.observe(max(0, ts - ticket.ts) / 1000)
            self._holds.answered(ticket.origin, ticket.msg_id, self._now())
            self.links.send(ticket.origin, ReceiptItem(RECEIPT_SENT, (ticket.msg_id,), ticket.to, ts))

    def _held_failed(self, held: Held) -> None:
        ticket = self._tickets.pop(held, None)
        if ticket is not None:
            for other in ticket.waiting:
                self._tickets.pop(other, None)
            self.links.send(ticket.origin, ErrorItem(ErrorCode.INTERNAL, "the server failed to store this message; "
                                                     "send it again", ticket.msg_id))

    def held_acked(self, client_id: str, local: list[int]) -> list[MessageRef]:
        """Local seqs acked: settle what every target has; the messages this delivers (rule 4)."""
        out = self._writeback.acked(client_id, local)
        for held in out.settled:
            self._host.spawn(self._settle(held))
        return [MessageRef(m.sender, m.msg_id, m.recipient) for h in out.delivered if (m := h.stage.message)]
