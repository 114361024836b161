"""Every device's staging queue in a Redis Cluster: ``bridge.cluster.store.QueueStore``.

Keys (hash tag: the user, so one user's keys share a slot; see storage/redis/client.py). A device
is named by its id within the user (``phone``), ``*`` for the placeholder ``bob.*``:

- ``{prefix}q:{bob}:{device}``       sorted set, score = seq, member = the item as a JSON array
  ``[seq, expires_ms, "<sender>/<msg_id>" or "", payload]``; payload is null (a plain message: the
  body is on the record), the device's olm ciphertext, or a receipt's wire JSON (both as strings)
- ``{prefix}qe:{bob}:{device}``      sorted set, score = expires_ms, member = seq (what expires when)
- ``{prefix}qs:{bob}``               hash device -> its last seq (seqs go up by ``SEQ_STRIDE``)
- ``{prefix}qm:{bob}:{sender}/{id}`` hash: the message record, kept once per recipient user while
  ``refs`` items refer to it: ``wire`` (the MsgItem as sent, seq 0; body "" if olm), ``to``,
  ``refs``, ``track`` (staged with ``delivery``), ``delivered`` and ``expired`` (reported already)
- ``{prefix}qd:{bob}``               sorted set of the dedup marks of messages to bob: member
  ``<sender>/<id>``, score = until (ms, Redis's clock); at most ``max_dedup`` (the earliest to
  expire go first), expired ones dropped as stages pass; the key expires with its latest mark
- ``{prefix}qp:{bob}:{sender}/{id}`` pending mark of a message ``reserve`` admitted, kept
  ``hold_ms`` (PX): until its node stages (writes back) or settles it, a stage of it is ``PENDING``
- ``{prefix}qr:{bob}:{token}``       a script's reply, kept ``replay_ms`` (see "Retries")
- ``{prefix}qb:{bob}:{bucket}``      token bucket: ``tokens``, ``ts`` (ms, the caller's clock)
- ``{prefix}qx:{n}``                 the expiry index, n < EXPIRY_SHARDS: sorted set client id ->
  the earliest ``expires_ms`` of its queue. Not tagged: the shards spread over the slots.

Every queue operation is one Lua script on the user's slot (storage/redis/queue_scripts.py).
``stage`` with ``devices=None`` reads the user's devices from the users store's hash
(storage/redis/users.py) in the same script, so a device registering concurrently gets the item or
not, never half of a message.

Seqs: every seq given goes ``SEQ_STRIDE`` above the last (``seq_block`` takes a stride for the
node's own seqs, bridge/cluster/store.py). ``qs`` is never reset, not even by ``remove_device``: a
device id removed and installed again keeps counting up, so an install that still holds its old
"last seq" cannot skip new items.

Records: a record goes with its last item (refs 0). ``delivered`` and ``expired`` only need
answering while an item of it exists (an ack or an expiry needs one; ``mark_delivered`` of a
message gone answers nothing), so nothing outlives the items. Every delivery-tracked message that
expires is reported once, delivered or not (bridge/messaging/core.py rule 7 does the same).

Retries: ``call`` runs a script again when its reply was lost with a failed master. ``stage``,
``reserve``, ``ack``, ``mark_delivered`` and ``expire`` take a random token; the first run stores
its reply under it (``stage`` always, ``reserve`` when it admits, the others when they report
something), and a rerun with the token returns that reply: a retried stage neither stages twice
nor turns into ``DUPLICATE``, a retried reserve does not find its own pending mark, a retried ack
still reports ``delivered``. ``settle`` rerun writes the same mark again; ``adopt_placeholder``
and ``remove_device`` rerun find nothing to do and answer 0; ``allow`` rerun takes a second token
(only across a failover).

Write-back (bridge/cluster/store.py ``reserve``): a pending mark makes a stage of its message
``PENDING`` (its node delivers it from memory); the node's own stage (``writeback``) or ``settle``
replaces it by the dedup mark. A stage, a settle and an import of a mark all keep the recipient
user's marks within ``max_dedup``.

The expiry index only hints (a second command, on another slot, after the script): a stale entry
costs one empty ``expire``. ``expire`` and ``remove_device`` drop the entry *before* their script
and ``expire`` re-adds the queue's earliest expiry after it, so a stage racing them never loses its
entry. A node dying between a stage and its hint leaves that queue unindexed until its next stage
or ``expire`` (the service expires a device's queue when it connects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import zlib
from collections import OrderedDict
from dataclasses import replace
from typing import Any, ClassVar, Final

from redis.asyncio.cluster import RedisCluster

from bridge.background import cancel
from bridge.cluster.group_store import GroupAck, GroupExpiry, GroupFan, LogEntry, ends_membership
from bridge.cluster.store import (
    SEQ_STRIDE,
    MessageEntry,
    MessageRef,
    QueuedItem,
    Reservation,
    Stage,
    StageResult,
    StageStatus,
    Swept,
)
from bridge.directory import PLACEHOLDER_DEVICE
from bridge.store import NotReplicated, StoreError
from chatproto import GROUP_PREFIX, GroupItem, MsgItem, ReceiptItem, parse_downlink
from storage.redis.client import RETRY_S, RedisStore
from storage.redis.group_log import BODIES, UNHOLD, body_key
from storage.redis.queue_scripts import (
    ACK,
    ADOPT,
    ALLOW,
    EXPIRE,
    GW_GRACE_MS,
    IMPORT_DEDUP,
    MARK_DELIVERED,
    READ,
    REMOVE,
    RESERVE,
    SEQ_BLOCK,
    SEQ_FLOOR,
    SETTLE,
    STAGE,
    STAGE_GROUP,
    TAILS,
)
from storage.redis.users import devices_key

log = logging.getLogger(__name__)

EXPIRY_SHARDS: Final = 64
DUE_BATCH: Final = 8  # expiry shards read at once by ``due``
REPLAY_MARGIN_MS: Final = 10_000
UNHOLD_DELAY_S: Final = 0.1  # group bodies are counted down in batches this often
BODY_CACHE: Final = 4096  # group message bodies a node keeps (least recently read dropped first)
MAX_DEDUP: Final = 200_000  # dedup marks per recipient user: settings.dedup.max_entries's default


def split_client(client_id: str) -> tuple[str, str]:
    """(user, device) of ``user.device`` (``*`` for the placeholder)."""
    user, _, device = client_id.partition(".")
    return user, device


def message_wire(message: MessageEntry) -> str:
    """The record's copy of a message: the MsgItem every target gets, seq 0 (the item sets it);
    an olm body is on each item instead."""
    body = "" if message.bodies is not None else message.body or ""
    item = MsgItem(0, message.msg_id, message.sender, message.recipient, message.type, body, message.ts,
                   message.dev)
    return item.encode().decode()


def shared_payload(stage: Stage) -> str | None:
    """The payload JSON every target gets: null (a plain message, its body is on the record), the
    receipt's wire; None for an olm message (each target has its own ciphertext)."""
    message, receipt = stage.message, stage.receipt
    if receipt is not None and message is None:
        return json.dumps(replace(receipt, seq=None).encode().decode())
    if message is None or receipt is not None:
        raise ValueError("a stage carries exactly one of message and receipt")
    return None if message.bodies is not None else "null"


def stage_candidates(stage: Stage, shared: str | None) -> list[tuple[str, str]] | None:
    """(device, payload JSON) pairs for the script to stage to those that are current devices of
    the user; None: every current device (or the placeholder), each with ``shared``."""
    if shared is None:  # olm: the devices that have a ciphertext
        assert stage.message is not None and stage.message.bodies is not None
        pairs = [(client_id, json.dumps(body)) for client_id, body in sorted(stage.message.bodies.items())]
    elif stage.devices is None:
        return None
    else:
        pairs = [(client_id, shared) for client_id in dict.fromkeys(stage.devices)]
    out = []
    for client_id, payload in pairs:
        user, device = split_client(client_id)
        if user == stage.user and (stage.devices is None or client_id in stage.devices):
            out.append((device, payload))
    return out


def decode_item(row: list[Any], wire: str) -> QueuedItem | None:
    """The item of a queue member (decoded JSON) and its record's wire (for a group message: its body's,
    "" if that is gone, and then None: the item is past its TTL)."""
    seq, expires_ms, ref, payload = row
    item: MsgItem | ReceiptItem | GroupItem
    if ref.startswith(GROUP_PREFIX):
        if not wire:
            log.warning("redis queues.read: the body of %s is gone (expired): item %d not delivered", ref, seq)
            return None
        item = replace(MsgItem.decode(wire.encode()), seq=seq, gseq=int(ref.rpartition("/")[2]))
    elif ref:
        if not wire:
            raise StoreError(f"redis queues.read: the record of {ref} is missing")
        message = MsgItem.decode(wire.encode())
        item = replace(message, seq=seq, body=message.body if payload is None else payload)
    else:
        notice = parse_downlink(payload.encode())
        if not isinstance(notice, ReceiptItem | GroupItem):
            raise StoreError(f"redis queues.read: a queued {notice.KIND} item")
        item = replace(notice, seq=seq)
    return QueuedItem(item, expires_ms)


def message_key(stage: Stage) -> str:
    """``<sender>/<id>`` of a stage's message ("" for a receipt): its record's and marks' name."""
    message = stage.message
    return "" if message is None else f"{message.sender}/{message.msg_id}"


def message_ref(ref: str, recipient: str) -> MessageRef:
    sender, _, msg_id = ref.partition("/")
    return MessageRef(sender, msg_id, recipient)


def group_gseq(ref: str) -> tuple[str, int]:
    """(group, gseq) of a group message's ref ``g:Ab3/7``."""
    group, _, gseq = ref.rpartition("/")
    return group, int(gseq)


def expiry_shard(client_id: str) -> int:
    """The expiry index shard of a device (stable across processes, unlike ``hash``)."""
    return zlib.crc32(client_id.encode()) % EXPIRY_SHARDS


class RedisQueueStore(RedisStore):
    SCRIPTS: ClassVar[dict[str, str]] = {
        "queues.stage": STAGE, "queues.read": READ, "queues.ack": ACK, "queues.mark_delivered": MARK_DELIVERED,
        "queues.expire": EXPIRE, "queues.adopt": ADOPT, "devices.remove": REMOVE, "queues.allow": ALLOW,
        "queues.import_dedup": IMPORT_DEDUP, "queues.seq_floor": SEQ_FLOOR, "queues.seq_block": SEQ_BLOCK,
        "queues.reserve": RESERVE, "queues.settle": SETTLE, "queues.tails": TAILS, "queues.stage_group": STAGE_GROUP,
        "queues.unhold": UNHOLD, "queues.group_bodies": BODIES}

    def __init__(self, client: RedisCluster, prefix: str = "", retry_s: float = RETRY_S, *,
                 min_replicas_ack: int = 0, wait_timeout_ms: int = 1000, max_dedup: int = MAX_DEDUP,
                 gw_grace_ms: int = GW_GRACE_MS) -> None:
        super().__init__(client, prefix, retry_s)
        self._max_dedup = max_dedup  # settings.dedup.max_entries: dedup marks kept per recipient user
        self._gw_grace_ms = gw_grace_ms  # a left group's high-water mark is kept this long (STAGE_GROUP)
        # cluster.min_replicas_ack: a stage is answered once that many replicas hold it (Redis WAIT).
        # Every stage writes (its reply key, even a duplicate's), so the WAIT after a duplicate
        # also covers the first stage of that message, which a failed WAIT may have left unconfirmed.
        self._replicas = min_replicas_ack
        self._wait_ms = wait_timeout_ms
        # A reply must outlive every retry of its script.
        self._replay_ms = int(2 * retry_s * 1000) + REPLAY_MARGIN_MS
        self._due_from = secrets.randbelow(EXPIRY_SHARDS)  # nodes start their sweeps on different shards
        self._bodies: OrderedDict[str, str] = OrderedDict()  # group message ref -> its wire
        self._unholding: dict[str, int] = {}  # group message ref -> users counted off, not written yet
        self._unhold_task: asyncio.Future[None] | None = None

    def _queue_keys(self, user: str, device: str) -> list[str]:
        return [self.key("q", user, device), self.key("qe", user, device)]

    def _replay_key(self, user: str, token: str = "") -> str:
        return self.key("qr", user, token or secrets.token_hex(8))

    def _records(self, user: str) -> str:
        return self.key("qm", user, "")

    def _shard_key(self, n: int) -> str:
        return f"{self._prefix}qx:{n}"

    def _marks(self, user: str, ref: str) -> list[str]:
        """The user's dedup marks and the pending mark of ``ref``."""
        return [self.key("qd", user), self.key("qp", user, ref)]

    async def stage(self, stage: Stage) -> StageResult:
        user, message = stage.user, stage.message
        shared = shared_payload(stage)
        candidates = stage_candidates(stage, shared)
        ref = message_key(stage)
        keys = [devices_key(self, user), self.key("qs", user), self.key("qm", user, ref), *self._marks(user, ref),
                self._replay_key(user, stage.token)]
        # A receipt has no record and no dedup mark (its ref is "").
        wire, recipient, dedup = ("", "", 0) if message is None else (
            message_wire(message), message.recipient, stage.dedup_until_ms)
        args: list[str | int] = [
            self.key("q", user, ""), self.key("qe", user, ""), stage.expires_ms, stage.max_queue, dedup,
            int(stage.delivery), wire, recipient, json.dumps(ref), self._replay_ms, ref, self._max_dedup,
            int(stage.writeback)]
        if candidates is None:
            assert shared is not None  # stage_candidates returns None only for a shared payload
            args += ["all", shared, PLACEHOLDER_DEVICE]
        else:
            args.append("some")
            for device, payload in candidates:
                args += [device, payload]
        try:
            reply = await self.run_replicated("queues.stage", keys, args, self._replicas, self._wait_ms)
        except NotReplicated as exc:  # staged on the master all the same: say what was staged
            raise NotReplicated(str(exc), await self._staged(user, stage, exc.result)) from exc
        return await self._staged(user, stage, reply)

    async def _staged(self, user: str, stage: Stage, reply: Any) -> StageResult:
        status, *flat = json.loads(reply)
        targets = tuple((f"{user}.{device}", int(seq)) for device, seq in zip(flat[::2], flat[1::2], strict=True))
        await asyncio.gather(*(self._hint(client_id, stage.expires_ms) for client_id, _ in targets))
        return StageResult(StageStatus(status), targets)

    async def reserve(self, stage: Stage, hold_ms: int, *, whole_user: bool) -> Reservation:
        if stage.message is None or stage.devices is None:
            raise ValueError("reserve: a write-back is a message to devices it names")
        user, ref = stage.user, message_key(stage)
        devices = [device for user_of, device in map(split_client, stage.devices) if user_of == user]
        keys = [devices_key(self, user), *self._marks(user, ref), self._replay_key(user)]
        args: list[str | int] = [self.key("q", user, ""), stage.max_queue, hold_ms, int(whole_user), ref,
                                 self._replay_ms, *dict.fromkeys(devices)]
        status, *tails = json.loads(await self.run("queues.reserve", keys, args))
        return Reservation(StageStatus(status), {f"{user}.{device}": int(seq)
                                                 for device, seq in zip(tails[::2], tails[1::2], strict=True)})

    async def tails(self, user: str, client_ids: list[str]) -> dict[str, int]:
        devices = [device for user_of, device in map(split_client, client_ids) if user_of == user]
        if not devices:
            return {}
        found = await self.run("queues.tails", [self.key("q", user, device) for device in devices], [])
        return {f"{user}.{device}": int(seq) for device, seq in zip(devices, found, strict=True)}

    async def settle(self, stage: Stage) -> None:
        ref = message_key(stage)
        await self.run_replicated("queues.settle", self._marks(stage.user, ref),
                                  [ref, stage.dedup_until_ms, self._max_dedup], self._replicas, self._wait_ms)

    async def seq_block(self, client_id: str) -> int:
        user, device = split_client(client_id)
        # A retry after a lost reply takes a second block: the seqs only skip further. Replicated like a
        # stage: the device gets seqs of the block, which no later stage may give again.
        return int(await self.run_replicated("queues.seq_block", [self.key("qs", user)], [device, SEQ_STRIDE],
                                             self._replicas, self._wait_ms))

    async def read(self, client_id: str, after_seq: int, limit: int) -> list[QueuedItem]:
        if limit <= 0:
            return []
        user, device = split_client(client_id)
        rows = await self.run("queues.read", [self.key("q", user, device)], [after_seq, limit, self._records(user)])
        members = [json.loads(member) for member in rows[::2]]
        bodies = await self._group_bodies({row[2] for row in members if row[2].startswith(GROUP_PREFIX)})
        found = [decode_item(row, bodies.get(row[2], wire)) for row, wire in zip(members, rows[1::2], strict=True)]
        return [queued for queued in found if queued is not None]

    async def _group_bodies(self, refs: set[str]) -> dict[str, str]:
        """The wire of each group message ``g:Ab3/<gseq>`` ("" if gone): from the node's cache, else read from
        its group's slot, one script per group. A body never changes, and every member device reads the
        same ones: without the cache a message to 100 members read its body 100 times."""
        found: dict[str, str] = {}
        missing: dict[str, list[str]] = {}
        for ref in sorted(refs):
            wire = self._bodies.get(ref)
            if wire is None:
                missing.setdefault(ref.rpartition("/")[0], []).append(ref)
            else:
                self._bodies.move_to_end(ref)
                found[ref] = wire
        groups = list(missing.values())
        wires = await asyncio.gather(*(self.run("queues.group_bodies",
                                                [body_key(self, *ref.rsplit("/", 1)) for ref in listed], [])
                                       for listed in groups))
        for listed, read in zip(groups, wires, strict=True):
            for ref, wire in zip(listed, read, strict=True):
                found[ref] = wire
                if wire:
                    self._bodies[ref] = wire
        while len(self._bodies) > BODY_CACHE:
            self._bodies.popitem(last=False)
        return found

    def _unhold(self, refs: list[str]) -> None:
        """This user holds no item of these group messages any more: count the user off each body,
        ``UNHOLD_DELAY_S`` later, with what other acks count off meanwhile (one script per group instead
        of one per member and message). A node dying before that, or a failure (logged), leaves the body
        until its TTL; nothing counts a body off early."""
        for ref in refs:
            self._unholding[ref] = self._unholding.get(ref, 0) + 1
        if refs and self._unhold_task is None:
            self._unhold_task = asyncio.ensure_future(self._write_unholds(UNHOLD_DELAY_S))

    async def _write_unholds(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        pending, self._unholding, self._unhold_task = self._unholding, {}, None
        by_group: dict[str, list[tuple[str, int]]] = {}
        for ref, count in pending.items():
            group, _, gseq = ref.rpartition("/")
            by_group.setdefault(group, []).append((body_key(self, group, gseq), count))
        results = await asyncio.gather(*(self.run("queues.unhold", [key for key, _ in bodies],
                                                  [count for _, count in bodies])
                                          for bodies in by_group.values()), return_exceptions=True)
        for group, result in zip(by_group, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("bodies of group %s not counted down (kept until their TTL): %s", group, result)

    async def flush(self) -> None:
        """Write now what is counted off group bodies (before the client closes)."""
        task, self._unhold_task = self._unhold_task, None
        if task is not None:
            await cancel([task])
        if self._unholding:
            await self._write_unholds(0)

    async def close(self) -> None:
        await self.flush()
        await super().close()

    async def stage_group(self, user: str, entries: list[LogEntry], max_queue: int) -> GroupFan:
        if not entries:
            return GroupFan((), (), 0, ())
        args: list[str | int] = [self.key("q", user, ""), self.key("qe", user, ""), self._records(user),
                                 entries[0].group, max_queue, self._gw_grace_ms]
        for entry in entries:
            origin_user, origin_device = split_client(entry.origin)
            payload = "null" if entry.event is None else json.dumps(entry.event.encode().decode())
            kind = "m" if entry.event is None else "r" if ends_membership(entry.event, user) else "e"
            args += [entry.gseq, entry.expires_ms, payload, origin_device if origin_user == user else "", kind]
        keys = [devices_key(self, user), self.key("qs", user), self.key("gw", user), self.key("gwx", user)]
        # Replicated like a stage: the fanner drops the entries from the group's log after this.
        staged, unheld, skipped, again = await self.run_replicated("queues.stage_group", keys, args,
                                                                   self._replicas, self._wait_ms)
        targets = tuple((f"{user}.{device}", int(seq)) for device, seq in zip(staged[::2], staged[1::2], strict=True))
        earliest = min(entry.expires_ms for entry in entries)
        await asyncio.gather(*(self._hint(client_id, earliest)
                               for client_id in dict.fromkeys(client_id for client_id, _ in targets)))
        return GroupFan(targets, tuple(int(gseq) for gseq in unheld), int(skipped),
                        tuple(f"{user}.{device}" for device in again))

    async def ack(self, client_id: str, seqs: list[int]) -> list[MessageRef | GroupAck]:
        if not seqs:
            return []
        user, device = split_client(client_id)
        keys = [*self._queue_keys(user, device), self._replay_key(user)]
        _, *refs = json.loads(await self.run("queues.ack", keys,
                                             [user, device, self._records(user), self._replay_ms, *seqs]))
        self._unhold([ref[1:] for ref in refs if ref.startswith("~")])
        return [GroupAck(*group_gseq(ref[1:]), user) if ref.startswith("+") else message_ref(ref, user)
                for ref in refs if not ref.startswith("~")]

    async def mark_delivered(self, recipient: str, sender: str, msg_ids: list[str]) -> list[str]:
        if not msg_ids:
            return []
        keys = [*(self.key("qm", recipient, f"{sender}/{msg_id}") for msg_id in msg_ids), self._replay_key(recipient)]
        _, *marked = json.loads(await self.run("queues.mark_delivered", keys,
                                               [recipient, self._replay_ms, *msg_ids]))
        return [str(msg_id) for msg_id in marked]

    async def remove_device(self, client_id: str) -> int:
        user, device = split_client(client_id)
        await self._unhint(client_id)
        dropped, *released = await self.run("devices.remove", self._queue_keys(user, device), [self._records(user)])
        self._unhold([str(ref) for ref in released])
        return int(dropped)

    async def adopt_placeholder(self, user: str, client_id: str) -> int:
        _, device = split_client(client_id)
        held = f"{user}.{PLACEHOLDER_DEVICE}"
        await self._unhint(held)
        keys = [*self._queue_keys(user, PLACEHOLDER_DEVICE), *self._queue_keys(user, device), self.key("qs", user)]
        moved, first = await self.run("queues.adopt", keys, [device])
        if first is not None:
            await self._hint(client_id, int(float(first)))
        return int(moved)

    async def expire(self, client_id: str, now_ms: int) -> Swept:
        user, device = split_client(client_id)
        await self._unhint(client_id)  # before the script: a stage racing it re-adds its own entry after
        keys = [*self._queue_keys(user, device), self._replay_key(user)]
        try:
            reply = await self.run("queues.expire", keys, [now_ms, self._records(user), self._replay_ms])
        except StoreError:
            await self._hint(client_id, now_ms)  # the queue is as it was: the next sweep tries again
            raise
        dropped, first, *flat = json.loads(reply)
        if first is not False:
            await self._hint(client_id, int(float(first)))
        pairs = list(zip(flat[::2], flat[1::2], strict=True))
        return Swept([message_ref(ref, to) for ref, to in pairs if not ref.startswith("!")], int(dropped),
                     [GroupExpiry(*group_gseq(ref[1:]), last == "1") for ref, last in pairs if ref.startswith("!")])

    async def due(self, now_ms: int, limit: int) -> list[str]:
        found: dict[str, None] = {}  # in order, once each
        start = self._due_from
        for offset in range(0, EXPIRY_SHARDS, DUE_BATCH):
            if len(found) >= limit:
                break
            shards = [(start + offset + i) % EXPIRY_SHARDS for i in range(DUE_BATCH)]
            batches = await asyncio.gather(*(
                self.command("queues.due", "ZRANGE", self._shard_key(n), "-inf", str(now_ms), "BYSCORE",
                             "LIMIT", "0", str(limit)) for n in shards))
            for batch in batches:
                found.update(dict.fromkeys(str(client_id) for client_id in batch))
        # The next sweep starts one batch further on, so a shard full of due queues starves none.
        self._due_from = (start + DUE_BATCH) % EXPIRY_SHARDS
        return list(found)[:limit]

    async def waiting(self) -> int:
        """Queues holding items, cluster-wide, from the expiry index (64 ``ZCARD``s): a queue is in it
        while it holds an item; an entry can outlive its items until the next sweep looks at it."""
        counts = await asyncio.gather(*(self.command("queues.waiting", "ZCARD", self._shard_key(n))
                                        for n in range(EXPIRY_SHARDS)))
        return sum(int(count) for count in counts)

    async def depth(self, client_id: str) -> int:
        user, device = split_client(client_id)
        return int(await self.command("queues.depth", "ZCARD", self.key("q", user, device)))

    async def allow(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> bool:
        return await self._take(user, bucket, rate_per_s, burst, now_ms, 1)

    async def refund(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int) -> None:
        await self._take(user, bucket, rate_per_s, burst, now_ms, -1)

    async def _take(self, user: str, bucket: str, rate_per_s: float, burst: int, now_ms: int, cost: int) -> bool:
        args: list[str | int] = [repr(rate_per_s), burst, now_ms, cost]
        return bool(await self.run("queues.allow", [self.key("qb", user, bucket)], args))

    async def import_dedup_mark(self, user: str, sender: str, msg_id: str, until_ms: int) -> None:
        """Remember (``sender``, ``msg_id``) in ``user``'s slot until ``until_ms``, as a stage with
        ``dedup_until_ms`` does (``chat-broker migrate``): a stage of it there is a DUPLICATE until then.
        A mark lasting longer stays; the user's ``max_dedup`` bound holds as for a stage."""
        await self.run("queues.import_dedup", [self.key("qd", user)], [f"{sender}/{msg_id}", until_ms, self._max_dedup])

    async def import_seq_floor(self, client_id: str, floor: int) -> None:
        """Make the device's next seqs exceed ``floor`` (``chat-broker migrate``: above every seq another
        store gave it, which its client remembers as handed over). A counter past it stays."""
        user, device = split_client(client_id)
        await self.run("queues.seq_floor", [self.key("qs", user)], [device, floor])

    async def _hint(self, client_id: str, expires_ms: int) -> None:
        """Index the queue at ``expires_ms`` unless it is indexed earlier already (ZADD LT). A failure
        is logged, not raised: the queue itself is written, only its expiry may come late."""
        try:
            await self.command("queues.hint", "ZADD", self._shard_key(expiry_shard(client_id)), "LT",
                               str(expires_ms), client_id)
        except StoreError as exc:
            log.warning("expiry index: %s not indexed at %d: %s", client_id, expires_ms, exc)

    async def _unhint(self, client_id: str) -> None:
        await self.command("queues.unhint", "ZREM", self._shard_key(expiry_shard(client_id)), client_id)

