"""Groups in cluster mode: the ``group.*`` requests, group messages, and the fanout of each group's log
into its members' device queues (docs/PROTOCOL.md sections 10 and 11; the store: bridge/cluster/group_store.py).

Decisions:
1. One write per change or message. A change is decided by the rules of bridge/groups/core.py on the
   group as stored and committed by compare-and-set on its gseq together with its events
   (``commit_logged``); a message is posted (membership, repeat and gseq checked in the same script).
   Either is answered once that write is replicated: nothing is written per member before the answer.
2. Fanout in gseq order. After a commit or a post, the node fans the group: under the group's lease it
   stages the log's entries, a batch at a time, in every target user's slot (all of a user's entries of
   the batch in one script, in gseq order), then drops them from the log. A user's high-water gseq
   makes a second fanout of an entry (a fanner that died or lost its lease) stage nothing, and no entry
   can be staged after a later one. The lease is given up only with the log empty, so an entry appended
   meanwhile is fanned by the fanner that is running, or by the node that appended it.
3. Nothing is stranded. A commit or post first hints the group (due ``lease_ms`` later); every node's
   sweep (``sweep_s``) fans the groups whose hint is due and clears the hint once the log is empty and
   the hint is ``HINT_KEEP_MS`` old (no write that hinted can still be in flight). A node that dies
   mid-fanout leaves its lease to run out and its hint to come due.
4. Not held (write-back): a group item is in Redis before any device gets it, as on one node.
5. Receipts (PROTOCOL section 11, "Receipts"): the post starts tracking the message in the group's slot.
   Member devices' acks (``acked``, from ``QueueStore.ack``), seen reports naming the group (``seen``) and
   members the fanout staged nothing for (every queue full: not waited for) are marked there, one script
   per group and call (``GroupLog.mark``); what that completes is staged as one ``delivered`` / ``seen``
   receipt per sender (``delivered`` first) to the sender's devices, through the one-to-one receipt path.
   Mark, stage and ``receipted`` run as one step retried until written; a completion stays pending in the
   group's slot until ``receipted``, reported again by any later mark of the message, and each receipt's
   stage token is its message's: staged once however often it is reported (within the replay time).
   An ack is marked before the queue ack (bridge/cluster/messaging.py): a node dying in between leaves
   the item, whose next ack marks again. A seen report hints its group first: a node dying before the
   receipts leaves the completion to the sweep, which stages a group's pending completions after fanning
   it. ``group.receipts`` reads the group's slot.
6. Expiry (section 6 rule 10): a member device's item that expires unacked (the queue sweep, ``expired``) is
   reported to the group's slot, hinted first, as a seen report is; the first report of a message forgets
   its tracking and keeps it expiring there until its ``expired`` receipt is staged (token
   ``<group>/<gseq>/expired``, after any ``delivered`` / ``seen`` still pending; then ``expired_done``), so
   the sender gets ``expired`` once, and no ``delivered`` or ``seen`` after it; a sweep stages what a dead
   node left expiring. A node dying between the queue's expiry and its report loses that report, as for a
   one-to-one ``expired`` (another device's expiry of the message still reports it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.cluster.group_store import (
    Completed,
    GroupAck,
    GroupExpiry,
    GroupFan,
    GroupLog,
    GroupPost,
    LogEntry,
    Mark,
    MarkKind,
    PostStatus,
)
from bridge.cluster.messaging import ClusterMessaging
from bridge.cluster.rules import SEND_BUCKET
from bridge.cluster.store import MessageRef, QueueStore
from bridge.groups import core
from bridge.groups.core import Decision, Group, GroupLimits
from bridge.groups.store import apply
from bridge.messaging.admission import Holds, Refused
from bridge.messaging.group_receipts import DEFAULT_MAX_PER_SENDER, DEFAULT_SEEN_MAX
from bridge.messaging.group_receipts import GroupReceipts as ReceiptBook
from bridge.messaging.store import UserLookup
from bridge.requests import Op, OpError
from bridge.store import NotReplicated, StoreError
from chatproto import (
    GROUP_OPS,
    MEGOLM_TYPE,
    RECEIPT_DELIVERED,
    RECEIPT_EXPIRED,
    RECEIPT_SEEN,
    RECEIPT_SENT,
    Caller,
    ChatMessage,
    DecodeError,
    ErrorCode,
    ErrorItem,
    GroupAdd,
    GroupCreate,
    GroupInfo,
    GroupList,
    GroupReceipts,
    MsgItem,
    ReceiptItem,
    Seen,
    parse_group_request,
)

log = logging.getLogger(__name__)

LEASE_MS: Final = 5000
SWEEP_S: Final = 5.0  # at most (staging.sweep_s is longer by default): a dead node's fanouts resume this soon
FAN_BATCH: Final = 64  # log entries staged per round of a fanout
PARALLEL: Final = 64  # member slots written at once
SWEEP_BATCH: Final = 256  # hinted groups looked at per sweep
HINT_KEEP_MS: Final = 30_000
"""A due hint is cleared only this long after it came due (its group fanned again at each sweep until
then): a post or commit that hinted may still be retrying its write through a failover (``retry_s``,
each attempt bounded by the socket and WAIT timeouts), and its entry must not be appended after the
last look at its hint."""


async def each_user(users: list[str], call: Callable[[str], Awaitable[GroupFan]]) -> list[GroupFan]:
    results: list[GroupFan] = []
    for start in range(0, len(users), PARALLEL):
        results += await asyncio.gather(*(call(user) for user in users[start:start + PARALLEL]))
    return results


class ClusterGroups:
    def __init__(self, messaging: ClusterMessaging, log_store: GroupLog, queues: QueueStore, users: UserLookup,
                 limits: GroupLimits, *, clock: Clock, supervisor: Supervisor, sweep_s: float,
                 lease_ms: int = LEASE_MS, seen_receipts: int = DEFAULT_SEEN_MAX,
                 max_tracked: int = DEFAULT_MAX_PER_SENDER) -> None:
        self._messaging = messaging
        self._rules = messaging.rules
        self._log = log_store
        self._queues = queues
        self._users = users
        self._limits = limits
        self._clock = clock
        self._supervisor = supervisor
        self._sweep_s = sweep_s
        self._lease_ms = lease_ms
        self._seen_max = seen_receipts  # groups.seen_receipts
        self._max_tracked = max_tracked  # groups.max_tracked_per_user (per sender and group here)
        self._fanning: dict[str, bool] = {}  # group -> asked to fan again (while this node fans it)
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._loops = [self._supervisor.spawn("group_sweep", self._sweep_round)]

    async def close(self) -> None:
        await cancel(self._loops)

    def ops(self) -> dict[str, Op]:
        return {op: functools.partial(self._request, op=op) for op in GROUP_OPS}

    # --- group messages (ClusterMessaging hands them over) -------------------------------------

    async def submit(self, origin: str, sender: str, message: ChatMessage, holds: Holds) -> None:
        """A message to a group: ``sent`` once it is in the group's log (on its replicas), then fanned."""
        links, rules, now = self._messaging.links, self._rules, self._clock.monotonic()
        try:
            holds.check(origin, message.id, now)
            if rules.require_encryption and message.type != MEGOLM_TYPE:
                raise Refused(ErrorItem(ErrorCode.ENCRYPTION_REQUIRED, "this server accepts only end-to-end "
                                        f"encrypted group messages (type {MEGOLM_TYPE!r})", message.id))
            if not await self._take_token(sender):
                holds.hold(origin, message.id, ErrorCode.RATE_LIMITED, now)
                raise Refused(ErrorItem(ErrorCode.RATE_LIMITED, "sending too fast; retry later", message.id))
            now_ms = self._clock.wall_ms()
            wire = MsgItem(0, message.id, sender, message.to, message.type, message.body or "", now_ms,
                           origin.partition(".")[2]).encode().decode()
            await self._log.hint(message.to, now_ms + self._lease_ms)  # decision 3: before the append
            status, _ = await self._log.post(GroupPost(message.to, sender, origin, message.id, wire,
                                                       now_ms + rules.ttl_ms, now_ms + rules.dedup_window_ms,
                                                       self._seen_max, self._max_tracked))
            if status == PostStatus.FORBIDDEN:
                await self._queues.refund(sender, SEND_BUCKET, rules.send_rate_per_s, rules.send_burst, now_ms)
                raise Refused(ErrorItem(ErrorCode.FORBIDDEN, "you are not a member of this group", message.id))
        except Refused as refused:
            links.send(origin, refused.item)
            return
        except StoreError as exc:
            log.error("group message %s/%s not posted: %s", sender, message.id, exc)
            if isinstance(exc, NotReplicated):  # in the log on the master: it goes out, in its place
                self.fan(message.to)
            else:
                holds.hold(origin, message.id, ErrorCode.INTERNAL, now)
            links.send(origin, ErrorItem(ErrorCode.INTERNAL, "the server cannot store messages right now; "
                                         "send it again", message.id))
            return
        holds.answered(origin, message.id, self._clock.monotonic())  # no hold waits for it now
        links.send(origin, ReceiptItem(RECEIPT_SENT, (message.id,), message.to, self._clock.wall_ms()))
        self.fan(message.to)

    async def _take_token(self, user: str) -> bool:
        rules = self._rules
        return await self._queues.allow(user, SEND_BUCKET, rules.send_rate_per_s, rules.send_burst,
                                        self._clock.wall_ms())

    # --- fanout (decisions 2 and 3) -----------------------------------------------------------------

    def fan(self, group: str) -> None:
        """Fan the group's log now (or once more after the fanout of it running here)."""
        if group in self._fanning:
            self._fanning[group] = True
            return
        self._fanning[group] = False
        self._messaging.spawn(self._fan_while_asked(group))

    async def _fan_while_asked(self, group: str) -> None:
        try:
            while True:
                self._fanning[group] = False
                try:
                    await self._fan_once(group)
                except StoreError as exc:  # its hint comes due: a sweep fans it
                    log.warning("fanout of group %s stopped: %s", group, exc)
                    return
                if not self._fanning[group]:
                    return
        finally:
            del self._fanning[group]

    async def _fan_once(self, group: str) -> bool:
        """Fan the log under the group's lease until it is empty; False if another fanner holds the lease
        (or took it over: this one was too slow to renew it)."""
        token = secrets.token_hex(8)
        if not await self._log.take_lease(group, token, self._lease_ms):
            return False
        while True:
            entries = await self._log.entries(group, FAN_BATCH)
            if not entries:
                if await self._log.release(group, token):
                    return True
                continue  # appended since the read: fan that too
            users, fans = await self._stage(entries)
            self._messaging.counters.group_skipped += sum(fan.skipped for fan in fans)
            # Members with no item of a message are not waited for: marked before the entries leave the log
            # (a fanout run again after a failure reports them again, until ``fanned`` drops the entries).
            await self._receipts_step(group, [Mark(MarkKind.GONE, user, gseq)
                                              for user, fan in zip(users, fans, strict=True) for gseq in fan.unheld])()
            await self._messaging.wake([target for fan in fans for target in fan.targets] +
                                       [(client_id, 0) for fan in fans for client_id in fan.again],
                                       messages=any(entry.event is None for entry in entries))
            unheld = [gseq for fan in fans for gseq in fan.unheld]
            if not await self._log.fanned(group, token, entries[-1].gseq, unheld, self._lease_ms):
                return False

    async def _stage(self, entries: list[LogEntry]) -> tuple[list[str], list[GroupFan]]:
        """Each entry for its users: one script per user with all of that user's entries, in gseq order.
        Returns the users and what was staged for each."""
        per_user: dict[str, list[LogEntry]] = {}
        for entry in entries:
            for user in entry.users:
                per_user.setdefault(user, []).append(entry)
        max_queue = self._rules.max_queue
        users = list(per_user)
        return users, await each_user(users, lambda user: self._queues.stage_group(user, per_user[user], max_queue))

    # --- receipts (decision 5) ----------------------------------------------------------------------

    async def acked(self, acks: list[GroupAck]) -> None:
        by_group: dict[str, list[Mark]] = {}
        for ack in acks:
            by_group.setdefault(ack.group, []).append(Mark(MarkKind.DELIVERED, ack.member, ack.gseq))
        for group, marks in by_group.items():
            await self._messaging.retrying("group receipts", self._receipts_step(group, marks))

    async def seen(self, caller: Caller, seen: Seen) -> None:
        """``caller.user`` displayed ``seen.ids`` of the group ``seen.to``: ids no tracked message of it waits
        for are ignored (a non-member's, a group that does not exist). Costs a send token."""
        if not await self._take_token(caller.user):
            self._messaging.links.send(caller.client_id, ErrorItem(ErrorCode.RATE_LIMITED,
                                                                   "sending too fast; retry later"))
            return
        marks = [Mark(MarkKind.SEEN, caller.user, msg_id=msg_id) for msg_id in dict.fromkeys(seen.ids)]
        # Hinted first: if this node dies between the mark and its receipts, a sweep stages what it completed.
        await self._messaging.retrying("group receipts", functools.partial(
            self._log.hint, seen.to, self._clock.wall_ms() + self._lease_ms))
        await self._messaging.retrying("group receipts", self._receipts_step(seen.to, marks))

    def _receipts_step(self, group: str, marks: list[Mark]) -> Callable[[], Awaitable[None]]:
        """Mark; stage what that completed, ``delivered`` before ``seen``; then say so (``receipted``). The mark's
        token is drawn once (a retry by ``retrying`` answers the first run); each receipt's stage token is
        its message's and status's, so a completion reported again (a retry, another member's mark before
        ``receipted``, a node that died before it) is staged once, in the sender's slot's replay time:
        through Redis, never held in memory (a held receipt has no token)."""
        token = secrets.token_hex(8)

        async def step() -> None:
            done = await self._log.mark(group, marks, token)
            await self._stage_receipts(group, done)
            await self._log.receipted(group, done)

        return step

    async def _stage_receipts(self, group: str, done: list[Completed]) -> None:
        """The receipts of ``done``: ``delivered``, then ``seen``, then ``expired`` (decision 6), each with its
        message's and status's stage token."""
        for status, ready in ((RECEIPT_DELIVERED, [c for c in done if c.delivered]),
                              (RECEIPT_SEEN, [c for c in done if c.seen]),
                              (RECEIPT_EXPIRED, [c for c in done if c.expired])):
            for c in ready:
                await self._messaging.stage_receipts(status, [MessageRef(c.sender, c.msg_id, group)],
                                                     f"{group}/{c.gseq}/{status}", hold=False)

    async def expired(self, expiries: list[GroupExpiry]) -> None:
        """Device items of group messages expired unacked (``QueueStore.expire``): their senders' ``expired``."""
        by_group: dict[str, list[GroupExpiry]] = {}
        for expiry in expiries:
            by_group.setdefault(expiry.group, []).append(expiry)
        for group, listed in by_group.items():
            # Hinted first: if this node dies before the receipts, a sweep stages what is expiring.
            await self._messaging.retrying("group receipts", functools.partial(
                self._log.hint, group, self._clock.wall_ms() + self._lease_ms))
            await self._messaging.retrying("group receipts", self._expiry_step(group, listed))

    def _expiry_step(self, group: str, expiries: list[GroupExpiry]) -> Callable[[], Awaitable[None]]:
        """Report the expiries (the token drawn once, as ``_receipts_step``); stage the ``expired`` receipts
        of what is expiring, after any ``delivered`` / ``seen`` it had pending; then say so."""
        token = secrets.token_hex(8)

        async def step() -> None:
            done = await self._log.expire(group, expiries, token)
            await self._stage_receipts(group, done)
            await self._log.expired_done(group, [c.gseq for c in done])

        return step

    async def _sweep_round(self) -> None:
        await asyncio.sleep(self._sweep_s)
        await self.sweep_once()

    async def sweep_once(self) -> int:
        """Fan the groups whose hint is due (a node died mid-fanout, or one just finished); returns how many
        were fanned to the end."""
        done = 0
        now_ms = self._clock.wall_ms()
        for group, at_ms in await self._log.due(now_ms, SWEEP_BATCH):
            if group in self._fanning:
                continue
            self._fanning[group] = False
            try:
                finished = await self._fan_once(group)
            finally:
                again = self._fanning.pop(group)
            if again:
                self.fan(group)
            if finished:
                done += 1
                pending = await self._log.pending(group)  # completions a node may have died before staging
                await self._receipts_step(group, [Mark(MarkKind.PENDING, "", gseq) for gseq in pending])()
                expiring = await self._log.expiring(group)  # ... and expiries
                await self._expiry_step(group, [GroupExpiry(group, gseq, False) for gseq in expiring])()
                if at_ms <= now_ms - HINT_KEEP_MS:
                    await self._log.clear_hint(group, at_ms)
        return done

    # --- requests -----------------------------------------------------------------------------------

    async def _request(self, caller: Caller, args: dict[str, Any], op: str) -> Any:
        try:
            request = parse_group_request(op, args)
        except DecodeError as exc:
            raise OpError(exc.code, exc.detail) from None
        actor = caller.user
        match request:
            case GroupList():
                found = [await self._log.load(gid) for gid in await self._log.groups_of(actor)]
                return {"groups": [group.summary(actor) for group in found if group is not None]}
            case GroupInfo():
                return core.info(await self._log.load(request.group), actor)
            case GroupReceipts():
                book = ReceiptBook()
                book.restore(await self._log.tracked(request.group, request.id))
                return core.receipts(await self._log.load(request.group), actor, request,
                                     book.find(request.group, request.id))
            case GroupCreate():
                await self._check_users(request.members)
                gid = core.new_group_id()
                decision = await self._apply(gid, actor, lambda _: core.create(
                    gid, actor, request, self._limits, self._clock.wall_ms()))
            case _:
                if isinstance(request, GroupAdd):
                    await self._check_users(request.members)
                change = request
                decision = await self._apply(change.group, actor, lambda before: core.decide(
                    before, actor, change, self._limits, self._clock.wall_ms()))
        return decision.result

    async def _apply(self, group: str, actor: str, decide: Callable[[Group | None], Decision]) -> Decision:
        charged = False

        async def commit(before: Group | None, decision: Decision) -> bool:
            nonlocal charged
            if not charged:  # a change costs a send token (once, however many compare-and-sets it takes)
                if not await self._take_token(actor):
                    raise OpError(ErrorCode.RATE_LIMITED, "changing groups too fast; retry later")
                charged = True
            now_ms = self._clock.wall_ms()
            await self._log.hint(group, now_ms + self._lease_ms)
            return await self._log.commit_logged(before, decision, self._limits.max_groups_per_user,
                                                 now_ms + self._rules.ttl_ms)

        try:
            decision = await apply(self._log, group, decide, self._limits.max_groups_per_user, commit)
        except NotReplicated:  # committed on the master: its events go out; the caller retries (idempotent)
            self.fan(group)
            raise
        if decision.events:
            self.fan(group)
        return decision

    async def _check_users(self, users: tuple[str, ...]) -> None:
        """``unknown_recipient`` naming the users that do not exist (section 7, "Which users exist")."""
        found = await asyncio.gather(*(self._users.user_devices(user) for user in users))
        unknown = [user for user, devices in zip(users, found, strict=True) if devices is None]
        if unknown:
            raise OpError(ErrorCode.UNKNOWN_RECIPIENT, f"no user(s) {', '.join(unknown)}")
