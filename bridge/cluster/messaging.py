"""One-to-one messaging in cluster mode: the shell over the shared queues (bridge/cluster/store.py),
the node bus (bridge/cluster/nodes.py) and the per-device windows (bridge/cluster/window.py).

The same public face as ``bridge.messaging.service.Messaging``, the same wire behaviour, with
these differences (docs/PROTOCOL.md, "Cluster mode"):
- an item for devices all connected to this node and caught up is delivered from memory and
  written to Redis only if not acked within ``staging.flush_ms`` (write-back,
  bridge/cluster/writeback.py); everything else is written to the Redis Cluster first. The
  sender's ``sent`` means the items are in Redis or every target acked them;
- ``delivered`` and ``seen`` are staged once the message is in Redis, so they never overtake
  ``sent`` on the sender's devices except when another node delivers and acks faster than this
  node sends ``sent`` (under a millisecond apart; the SDK keeps the highest status anyway);
- ``seen`` receipts are not merged in the queue (rule 9's coalescing is single-node only).
Each device's uplinks run in order in a lane of their own (every step awaits Redis:
bridge/cluster/uplinks.py); acks, reads and the background rounds (redelivery, the TTL sweep, the
periodic look at every local queue, which bounds what a lost nudge can delay) run beside them.
Devices linking and leaving, and the node directory, are bridge/cluster/devices.py; the rules and
the limits the nodes share, bridge/cluster/rules.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from bridge.background import Supervisor, cancel, raise_if_cancelled
from bridge.clock import Clock
from bridge.cluster.devices import Devices
from bridge.cluster.group_store import GroupAck, GroupExpiry, group_acks
from bridge.cluster.holding import Holding, being_delivered
from bridge.cluster.lanes import Lane
from bridge.cluster.nodes import NodeBus, Nudge, NudgeKind
from bridge.cluster.poll import PollCycle
from bridge.cluster.round_health import RoundHealth
from bridge.cluster.rules import SEND_BUCKET, ClusterRules, SharedClaimLimit
from bridge.cluster.store import MessageEntry, MessageRef, QueueStore, Stage, StageResult, StageStatus
from bridge.cluster.uplinks import Uplinks
from bridge.cluster.window import WindowOutcome, Windows
from bridge.counters import BridgeCounters
from bridge.keys.core import KeyedDevices
from bridge.keys.store import KeyStore
from bridge.links import LinkRegistry
from bridge.messaging.admission import Holds, Refused, olm_targets
from bridge.messaging.records import Figures
from bridge.messaging.service import DeliveryWatch
from bridge.messaging.store import UserLookup
from bridge.store import NotReplicated, StoreError
from chatproto import (
    RECEIPT_DELIVERED,
    RECEIPT_EXPIRED,
    RECEIPT_SEEN,
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
SWEEP_BATCH = 1000  # queues expired per sweep step


class GroupRoute(Protocol):
    async def submit(self, origin: str, sender: str, message: ChatMessage, holds: Holds) -> None:
        """A message to a group (bridge/cluster/groups.py), answered by it."""

    async def acked(self, acks: list[GroupAck]) -> None:
        """Member devices acked these group items (their receipts; retried until written)."""

    async def seen(self, caller: Caller, seen: Seen) -> None:
        """A seen report naming a group, answered by it."""

    async def expired(self, expiries: list[GroupExpiry]) -> None:
        """Member devices' group items expired unacked (their senders' ``expired``; retried until written)."""


class ClusterMessaging:
    def __init__(self, rules: ClusterRules, queues: QueueStore, bus: NodeBus, users: UserLookup, keys: KeyStore,
                 links: LinkRegistry, close_session: Callable[[str], Awaitable[None]], *, clock: Clock,
                 supervisor: Supervisor) -> None:
        self.rules = rules
        self.links = links
        self.counters: BridgeCounters = links.counters
        self._queues = queues
        self._bus = bus
        self._users = users
        self._keys = keys
        self._close_session = close_session
        self._now_ms = clock.wall_ms
        self._now = clock.monotonic
        self.supervisor = supervisor
        self.windows = Windows(rules.window, rules.redeliver_after_s)
        self._holds = Holds()
        self.groups: GroupRoute | None = None  # set by the wiring: group messages are refused without it
        self.watch: DeliveryWatch | None = None  # push (bridge/push/cluster.py), set by the wiring when on
        self._lanes: dict[str, Lane] = {}  # per device: its uplinks waiting for Redis (bridge/cluster/uplinks.py)
        self._held = Holding(self, queues, users, links, self._holds, flush_ms=rules.flush_ms,
                             pending_hold_ms=rules.pending_hold_ms, clock=clock, supervisor=supervisor)
        self._acking: dict[str, set[asyncio.Task[None]]] = {}  # per device: acks still being handled
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._uplinks = Uplinks(self._lanes, links, self._holds, rules, self._submit, self._seen, self.spawn,
                                clock=clock)
        self._health = RoundHealth(supervisor, self.windows)
        self._devices = Devices(self, bus, queues, links, self._holds, self._held, self._health, close_session,
                                flush_ms=rules.flush_ms, clock=clock)
        self._poll_tick_s = min(TICK_S, self.rules.poll_s)  # the periodic look, a slice each tick
        self._poll = PollCycle(self.rules.poll_s, self._poll_tick_s)

    @property
    def staging(self) -> ClusterMessaging:
        """What the metrics read (``counters``, ``figures()``): this node's part."""
        return self

    async def start(self) -> None:
        spawn = self.supervisor.spawn
        self._loops = [spawn("redeliver", self._redeliver_round), spawn("sweep", self._sweep_round),
                       spawn("queue_poll", self._poll_round)]
        if self.rules.flush_ms > 0:
            self._loops.append(spawn("flush", self._held.flush_round))

    # --- uplinks ---------------------------------------------------------------------

    def on_out(self, caller: Caller, payload: bytes) -> None:
        self._uplinks.enter("out", caller, payload)

    def on_seen(self, caller: Caller, payload: bytes) -> None:
        self._uplinks.enter("seen", caller, payload)

    def on_ack(self, caller: Caller, payload: bytes) -> None:
        try:
            ack = Ack.decode(payload)
        except DecodeError as exc:
            self.links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        if self.watch is not None:
            self.watch.acked(caller.client_id)
        task = self.spawn(self._ack(caller.client_id, list(ack.seqs)))
        acking = self._acking.setdefault(caller.client_id, set())
        acking.add(task)
        task.add_done_callback(functools.partial(self._ack_done, caller.client_id))

    def _ack_done(self, client_id: str, task: asyncio.Task[None]) -> None:
        acking = self._acking.get(client_id)
        if acking is not None:
            acking.discard(task)
            if not acking:
                del self._acking[client_id]

    async def _submit(self, caller: Caller, payload: bytes) -> None:
        origin, sender = caller.client_id, caller.user
        try:
            message = ChatMessage.decode(payload, self.rules.max_body_bytes, self.rules.max_devices_per_message)
        except DecodeError as exc:
            self.links.send(origin, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        if is_group_id(message.to) and self.groups is not None:
            await self.groups.submit(origin, sender, message, self._holds)
            return
        now = self._now()
        try:
            stages = await self._admit(origin, sender, message, now)
            stages, held = await self._held.hold_message(origin, stages)
            if held:  # 'sent' follows once it is written or every target acked it
                return
            await self._held.write_lane(origin)  # what this device sent before goes to Redis first
            staged = await self._stage_charged(origin, sender, stages, message.to, message.id)
        except Refused as refused:
            self.links.send(origin, refused.item)
            return
        except StoreError as exc:
            log.error("message %s/%s not staged: %s", sender, message.id, exc)
            if not isinstance(exc, NotReplicated):
                # Not staged: later messages wait for its re-send (rule 9). A message staged without
                # its replicas' word is in order already; holding behind it would wait for a re-send
                # that may never come (a 'delivered' for it ends the client's retries).
                self._holds.hold(origin, message.id, ErrorCode.INTERNAL, now)
            self.links.send(origin, ErrorItem(ErrorCode.INTERNAL, "the server cannot store messages right now; "
                                              "send it again", message.id))
            return
        ts = self._now_ms()
        message_ts = stages[-1].message.ts if stages[-1].message is not None else ts
        self.counters.sent_latency.observe(max(0, ts - message_ts) / 1000)
        self._holds.answered(origin, message.id, self._now())
        self.links.send(origin, ReceiptItem(RECEIPT_SENT, (message.id,), message.to, ts))
        await self.wake(staged, messages=True, previews=message.previews)

    async def _admit(self, origin: str, sender: str, message: ChatMessage, now: float) -> list[Stage]:
        """The stages of a new message (the sender's other devices first, then the recipient's);
        raises ``Refused``."""
        if is_group_id(message.to):  # no ClusterGroups (a node built without them)
            raise Refused(ErrorItem(ErrorCode.UNSUPPORTED, "groups are not served here", message.id))
        if await self._users.user_devices(message.to) is None:
            raise Refused(ErrorItem(ErrorCode.UNKNOWN_RECIPIENT, f"no user {message.to!r}", message.id))
        self._holds.check(origin, message.id, now)
        if message.bodies is None and self.rules.require_encryption:
            raise Refused(ErrorItem(ErrorCode.ENCRYPTION_REQUIRED,
                                    "this server accepts only end-to-end encrypted messages ('bodies')", message.id))
        now_ms = self._now_ms()
        entry = MessageEntry(sender, message.id, message.to, message.type, now_ms, origin.partition(".")[2],
                             body=message.body if message.bodies is None else None, bodies=message.bodies)
        to_them = Stage(message.to, now_ms + self.rules.ttl_ms, self.rules.max_queue, message=entry,
                        dedup_until_ms=now_ms + self.rules.dedup_window_ms, delivery=True)
        stages = [to_them]
        if message.bodies is not None:
            keyed = await self._keyed(sender, message.to)
            targets = olm_targets(keyed, self._holds, origin, sender, message, now)
            mine = tuple(t for t in targets if t.partition(".")[0] == sender and sender != message.to)
            stages = [replace(to_them, devices=tuple(t for t in targets if t not in mine))]
            if mine:  # history copies first: once the recipient has it, the sender's devices have it too
                stages.insert(0, replace(to_them, user=sender, devices=mine, delivery=False))
        if not await self._queues.allow(sender, SEND_BUCKET, self.rules.send_rate_per_s, self.rules.send_burst,
                                        now_ms):
            self._holds.hold(origin, message.id, ErrorCode.RATE_LIMITED, now)
            raise Refused(ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later", message.id))
        return stages

    async def _stage_all(self, stages: list[Stage], to: str, ref: str | None) -> list[tuple[str, int]]:
        """Stage each in turn; raises ``Refused`` (queue full) -- what was staged before stays, and a
        re-send finds it by its dedup mark."""
        staged: list[tuple[str, int]] = []
        unconfirmed: NotReplicated | None = None
        for stage in stages:
            try:
                result = await self._queues.stage(stage)
            except NotReplicated as exc:  # staged all the same: the rest follows it, then not 'sent'
                unconfirmed = exc
                result = exc.result if isinstance(exc.result, StageResult) else StageResult(StageStatus.STAGED)
            if result.status == StageStatus.QUEUE_FULL:
                await self.wake(staged)
                raise Refused(ErrorItem(ErrorCode.QUEUE_FULL, f"{to} has too many undelivered items", ref))
            if result.status == StageStatus.PENDING:  # a node holds its first copy (write-back): not 'sent' yet
                await self.wake(staged)
                raise Refused(being_delivered(ref))
            staged.extend(result.targets)
        if unconfirmed is not None:
            await self.wake(staged)
            raise unconfirmed
        return staged

    async def _stage_charged(self, origin: str, sender: str, stages: list[Stage], to: str,
                             ref: str | None) -> list[tuple[str, int]]:
        """``_stage_all`` for an uplink that took a send token: a full queue gives the token back (as
        on one node, where the queue is checked before the rate) and holds the device's later messages."""
        try:
            return await self._stage_all(stages, to, ref)
        except Refused as refused:
            await self._queues.refund(sender, SEND_BUCKET, self.rules.send_rate_per_s, self.rules.send_burst,
                                      self._now_ms())
            if ref is not None:
                self._holds.hold(origin, ref, refused.item.code, self._now())
            raise

    async def _keyed(self, *users: str) -> KeyedDevices:
        """The devices with published keys of ``users``, as the key store has them now."""
        rows = []
        for user in dict.fromkeys(users):
            for device, keys in (await self._keys.device_keys(user)).items():
                rows.append((user, device, str(keys["curve25519"])))
        return KeyedDevices(rows)

    async def _seen(self, caller: Caller, payload: bytes) -> None:
        """``caller.user`` displayed messages from ``seen.to``: ``delivered`` first for those no device
        acked yet (seen implies delivered, once), then ``seen``. Costs a send token."""
        try:
            seen = Seen.decode(payload)
        except DecodeError as exc:
            self.links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        by_user, to_user = caller.user, seen.to
        acking = self._acking.get(caller.client_id)
        if acking:  # acks sent before this report first: their 'delivered' goes before its 'seen' (rule 11)
            await asyncio.wait(set(acking))
        if is_group_id(to_user) and self.groups is not None:
            await self.groups.seen(caller, seen)
            return
        try:
            if await self._users.user_devices(to_user) is None:
                raise Refused(ErrorItem(ErrorCode.UNKNOWN_RECIPIENT, f"no user {to_user!r}"))
            if not await self._queues.allow(by_user, SEND_BUCKET, self.rules.send_rate_per_s, self.rules.send_burst,
                                            self._now_ms()):
                raise Refused(ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later"))
            ids = list(dict.fromkeys(seen.ids))
            delivered = self._held.report_seen(by_user, to_user, ids)
            delivered += await self._queues.mark_delivered(by_user, to_user, ids)
            # An ack sent after this report may have marked some of them delivered first: its
            # 'delivered' is staged before this 'seen' (rule 11; tests/test_receipts.py, cluster).
            in_flight = {task for client_id, tasks in self._acking.items()
                         if client_id.partition(".")[0] == by_user for task in tasks}
            if in_flight:
                await asyncio.wait(in_flight)
            stages = [self._receipt_stage(to_user, RECEIPT_DELIVERED, delivered, by_user)] if delivered else []
            stages.append(self._receipt_stage(to_user, RECEIPT_SEEN, ids, by_user))
            if await self._held.hold_receipts(stages):
                return
            await self._held.write_lane(self._held.receipt_lane(to_user))
            staged = await self._stage_charged(caller.client_id, by_user, stages, to_user, None)
        except Refused as refused:
            self.links.send(caller.client_id, refused.item)
            return
        except StoreError as exc:
            log.error("seen from %s not staged: %s", caller.client_id, exc)
            self.links.send(caller.client_id, ErrorItem(ErrorCode.INTERNAL, "the server cannot store this right now; "
                                                        "send it again"))
            return
        await self.wake(staged)

    def _receipt_stage(self, user: str, status: str, ids: list[str], peer: str) -> Stage:
        now_ms = self._now_ms()
        return Stage(user, now_ms + self.rules.ttl_ms, self.rules.max_queue,
                     receipt=ReceiptItem(status, tuple(ids), peer, now_ms))

    def _receipts_step(self, status: str, refs: Iterable[MessageRef]) -> Callable[[], Awaitable[None]]:
        """``stage_receipts`` with its replay tokens drawn once, for ``retrying``: a retry after a
        failed WAIT answers the first run instead of staging each receipt again."""
        return functools.partial(self.stage_receipts, status, list(refs), secrets.token_hex(8))

    async def stage_receipts(self, status: str, refs: Iterable[MessageRef], token: str, *, hold: bool = True) -> None:
        """A receipt per (sender, recipient) for ``refs``, to every device of the sender. Receipts are
        not refused for a full queue (the sender's own devices are behind, not the sender). ``hold``
        False: always through Redis, where a second stage with ``token`` answers the first."""
        by_pair: dict[tuple[str, str], list[str]] = {}
        for ref in refs:
            by_pair.setdefault((ref.sender, ref.recipient), []).append(ref.msg_id)
        for n, ((sender, recipient), ids) in enumerate(by_pair.items()):
            stage = replace(self._receipt_stage(sender, status, ids, recipient), max_queue=2**31, token=f"{token}-{n}")
            if hold and await self._held.hold_receipts([stage]):
                continue
            await self._held.write_lane(self._held.receipt_lane(sender))
            result = await self._queues.stage(stage)
            await self.wake(list(result.targets))

    # --- acks, reads and nudges ---------------------------------------------------------

    async def _ack(self, client_id: str, seqs: list[int]) -> None:
        local, stored = self.windows.split_ack(client_id, seqs)  # (window rules 4 and 5)
        delivered = self._held.held_acked(client_id, local) if local else []
        marked = group_acks(client_id.partition(".")[0],
                            [queued.item for queued in self.windows.sent_items(client_id, stored)])
        late: list[GroupAck] = []
        if marked and self.groups is not None:  # before the queue ack: a node dying in between leaves the items
            await self.groups.acked(marked)
        if local:
            self.apply(self.windows.acked(client_id, local, self._now()))
        if stored:
            try:
                acked = await self._queues.ack(client_id, stored)
                delivered += [ref for ref in acked if isinstance(ref, MessageRef)]
                late = [ref for ref in acked if isinstance(ref, GroupAck) and ref not in marked]
            except StoreError as exc:  # the items stay; the device gets them again and acks again
                self._health.failed("ack", client_id, exc)
            else:
                self._health.succeeded("ack")
                self.apply(self.windows.acked(client_id, [s for s in seqs if s not in local], self._now()))
        if delivered:
            await self.retrying("delivered receipts", self._receipts_step(RECEIPT_DELIVERED, delivered))
        if late and self.groups is not None:  # acked items this link had not sent (an earlier link's)
            await self.groups.acked(late)

    async def retrying(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        """A step that must happen once its cause is gone from Redis (an ack, an expiry): retried
        until it is written (the store already rode out a failover before raising)."""
        while True:
            try:
                await step()
                return
            except StoreError as exc:
                raise_if_cancelled(exc)
                log.error("%s not staged yet (%s); retrying", what, exc)
                await asyncio.sleep(TICK_S)

    async def wake(self, targets: list[tuple[str, int]], *, messages: bool = False,
                   previews: dict[str, str] | None = None) -> None:
        """Devices with new items: read now if connected here, else nudge the node that holds them.
        ``messages``: the items are messages, and push is told of the devices connected nowhere
        (with the push preview of each in ``previews``: push decides whether to keep it)."""
        clients = list(dict.fromkeys(client_id for client_id, _ in targets))
        local = [c for c in clients if c in self.windows]
        if local:
            self.apply(self.windows.behind(local, self._now()))
        remote = [c for c in clients if c not in self.windows]
        if not remote:
            return
        try:
            where = await self._bus.locate(remote)
        except StoreError as exc:  # the periodic look at each node's queues delivers them
            log.warning("cannot locate %d device(s) to nudge: %s", len(remote), exc)
            return
        if messages and self.watch is not None:
            for client_id in remote:
                if client_id not in where:
                    self.watch.staged(client_id, previews.get(client_id) if previews else None)
        # At once: a group's fanout wakes every member device on the other nodes.
        await asyncio.gather(*(self._bus.send(node, Nudge(NudgeKind.ITEMS, client_id, self._bus.node_id))
                               for client_id, node in where.items() if node != self._bus.node_id))

    def on_nudge(self, nudge: Nudge) -> None:
        if nudge.kind == NudgeKind.ITEMS:
            if self.watch is not None and nudge.target not in self.windows:  # it left before the directory said so
                self.watch.staged(nudge.target)
            self.apply(self.windows.behind([nudge.target], self._now()))
        elif nudge.kind == NudgeKind.RESYNC:  # nudges may have been lost while the channel was down
            self.apply(self.windows.behind(self.windows.clients(), self._now()))
        elif nudge.kind == NudgeKind.TAKEOVER:
            self.spawn(self._devices.taken_over(nudge))
        elif nudge.kind == NudgeKind.CLOSE and self.links.get(nudge.target) is not None:
            self.spawn(self._close_session(nudge.target))

    def apply(self, out: WindowOutcome) -> None:
        for client_id, item in out.sends:
            if self.links.send(client_id, item) and self.watch is not None and isinstance(item, MsgItem):
                self.watch.delivered(client_id)
        for client_id, after in out.reads:
            self.spawn(self._read(client_id, after))

    async def _read(self, client_id: str, after: int) -> None:
        limit = self.rules.window
        try:
            items = await self._queues.read(client_id, after, limit)
        except StoreError as exc:
            self._health.failed("queue_read", client_id, exc)
            self.windows.read_failed(client_id)
            return
        self._health.succeeded("queue_read")
        self.apply(self.windows.read_done(client_id, after, items, limit, self._now()))

    # --- devices (bridge/cluster/devices.py) -----------------------------------------------------

    def device_online(self, client_id: str) -> None:
        self._devices.online(client_id)

    def device_offline(self, client_id: str) -> None:
        self._devices.offline(client_id)

    def remove_device(self, user: str, device: str) -> None:
        self._devices.removed(user, device)

    def device_registered(self, user: str, device: str) -> None:
        """A device logged in for the first time: a user's first device takes what was held for them."""
        self._devices.registered(user, device)

    async def close_device(self, client_id: str) -> None:
        """Close the device's connection on whichever node holds it (``devices.remove``)."""
        await self._devices.close(client_id)

    # --- background rounds -------------------------------------------------------------------

    async def _redeliver_round(self) -> None:
        await asyncio.sleep(TICK_S)
        out = self.windows.redeliver(self._now())
        self.counters.redeliveries += len(out.sends)
        self.apply(out)

    async def _poll_round(self) -> None:
        await asyncio.sleep(self._poll_tick_s)
        self.apply(self.windows.behind(self._poll.due(self.windows.clients), self._now()))

    async def _sweep_round(self) -> None:
        await asyncio.sleep(self.rules.sweep_s)
        self._holds.prune(self._now())
        await self.sweep_once()

    async def sweep_once(self) -> int:
        """Drop what expired in queues the expiry index names (any node may; each message's
        ``expired`` receipt is staged once); returns the items dropped."""
        now_ms = self._now_ms()
        return await self.expire_queues(await self._queues.due(now_ms, SWEEP_BATCH), now_ms)

    async def expire_queues(self, client_ids: list[str], now_ms: int) -> int:
        dropped = 0
        for client_id in client_ids:
            swept = await self._queues.expire(client_id, now_ms)
            dropped += swept.items
            if swept.expired:
                await self.retrying("expired receipts", self._receipts_step(RECEIPT_EXPIRED, swept.expired))
            if swept.groups and self.groups is not None:
                await self.groups.expired(swept.groups)
        return dropped

    # --- limits shared by the nodes ----------------------------------------------------------------

    def claim_limit(self, rate_per_s: float, burst: int) -> SharedClaimLimit:
        return SharedClaimLimit(self._queues, rate_per_s, burst, self._now_ms)

    # --- figures and shutdown ------------------------------------------------------------------

    def figures(self) -> Figures:
        """This node's part: items read for its connected devices and not acked yet (the queues
        themselves are in Redis: ``chat-broker cluster status``)."""
        depths = self.windows.depths()
        return Figures(sum(depths), 0, 0, None, depths, self.windows.linked())

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop the rounds; write what is held; let running uplinks finish (each answers its sender)."""
        await cancel(self._loops)
        self._held.write_everything()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
