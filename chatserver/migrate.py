"""``chat-broker migrate``: move a SQLite data folder (the embedded default) into a Redis Cluster,
nothing lost: the device-token key, users with their devices and token digests, the key directory,
every staged item in its device's order with the delivered flags, the dedup marks, and the push
registrations and gone marks of the devices it moves (a queued wake-up is not moved: the device's
next message queues one).

The data folder's broker must be stopped: its ``BrokerLock`` is held for the whole run, so it
cannot start meanwhile. Each phase is safe to run again, so a second run, or one resumed after a
failure, ends in the same state:
- the key: set only if the cluster has none; the same key again is a no-op, another one refuses;
- users and keys: the import scripts add what is missing and keep what is there (one script per
  user or device, so each is all or nothing);
- items: each device's queue in the cluster is compared with its items in the data folder; what
  is there must be the first of them, in order (each stage is atomic, so a failure leaves such a
  prefix), and only the rest is staged. Anything else refuses that device: a cluster broker
  already took items from it;
- delivered flags, dedup marks, push registrations and gone marks: setting them again changes nothing.

Seqs are renumbered: a device's cluster seqs start above every seq the SQLite broker gave it
(``(last boot + 1) * SEQ_SPAN``), because the SDK drops as a repeat any item whose seq is not
above the highest it handed over. Devices must reconnect (they do: the brokers restart in cluster
mode), and acks of old seqs mean nothing afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from bridge.cluster.store import MessageEntry, QueuedItem, Stage, StageStatus
from bridge.directory import PLACEHOLDER_DEVICE, is_placeholder
from bridge.messaging.records import SEQ_SPAN, Item
from bridge.store import StoreError
from chatproto import MsgItem, ReceiptItem
from chatserver.binds import parse_bind
from chatserver.config import parse_redis_nodes
from chatserver.data_dir import BrokerLock
from storage.redis.client import PREFIX_RE
from storage.redis.keys import RedisKeyStore
from storage.redis.presence import RedisPresenceStore
from storage.redis.push import RedisPushStore
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore
from storage.sqlite.db import SqliteFile
from storage.sqlite.groups import GROUPS_DB, SqliteGroupStore
from storage.sqlite.keys import KEYS_DB, SqliteKeyStore
from storage.sqlite.messages import STAGING_DB, SqliteMessageStore
from storage.sqlite.presence import PRESENCE_DB, SqlitePresenceStore
from storage.sqlite.push import PUSH_DB, SqlitePushStore
from storage.sqlite.users import SECRET_FILE, USERS_DB, SqliteUserStore

NO_LIMIT = 2**31  # a migrated queue is never refused as full: it held these items already
READ_PAGE = 1000
CONCURRENCY = 32  # devices (or marks) written at once; a device's own items always go one by one, in order

S = TypeVar("S", bound=SqliteFile)


class MigrateError(StoreError):
    """The migration cannot go on; the message says what to do."""


def parse_cluster(text: str) -> list[tuple[str, int]]:
    """``redis://HOST:PORT[,HOST:PORT...]`` (``redis://`` optional on each) -> (host, port) pairs."""
    try:
        return [parse_bind(node) for node in parse_redis_nodes(text)]
    except ValueError as exc:
        raise MigrateError(f"--cluster: {text!r} is not redis://HOST:PORT[,HOST:PORT...] ({exc})") from None


# --- the plan: pure ----------------------------------------------------------------------------


Wire = tuple[MsgItem | ReceiptItem, int]
"""An item as its queue returns it, seq 0, with its expiry: what a resumed run compares."""


@dataclass(frozen=True, slots=True)
class Planned:
    stage: Stage
    wire: Wire


def target_queues(items: Iterable[Item], devices: dict[str, list[str]]) -> dict[str, list[Item]]:
    """Client id -> its items in seq order. A placeholder's items go to the user's first device if
    the user has one (what adoption does at its first login), else stay on the placeholder."""
    queues: dict[str, list[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda i: (is_placeholder(i.device), i.device, i.seq)):
        target = item.device
        if is_placeholder(target):
            user = target.partition(".")[0]
            if devices.get(user):
                target = f"{user}.{devices[user][0]}"
        queues[target].append(item)
    return dict(queues)


def plan_item(client_id: str, item: Item, body: str | None) -> Planned:
    """The stage putting ``item`` at the end of ``client_id``'s queue; ``body`` is the message's
    body (plain) or this item's ciphertext (olm)."""
    user, _, device = client_id.partition(".")
    only = None if device == PLACEHOLDER_DEVICE else (client_id,)
    message = item.message
    if item.event is not None or (message is not None and message.gseq is not None):
        raise MigrateError(f"{client_id} has group items staged: migrate does not move groups yet "
                           "(groups.db and their items), so they cannot be migrated")
    if message is None:
        receipt = item.receipt or {}
        wire = ReceiptItem(receipt["status"], tuple(receipt["ids"]), receipt["peer"], receipt["ts"])
        return Planned(Stage(user, item.expires_ms, NO_LIMIT, only, receipt=wire), (replace(wire, seq=0),
                                                                                        item.expires_ms))
    if body is None:
        raise MigrateError(f"the body of message {message.sender}/{message.msg_id} (for {client_id}) is missing "
                           "from staging.db: the data folder is damaged")
    entry = MessageEntry(message.sender, message.msg_id, message.recipient, message.type, message.ts, message.dev,
                         body=None if message.olm else body, bodies={client_id: body} if message.olm else None)
    stage = Stage(user, item.expires_ms, NO_LIMIT, only, message=entry, delivery=user == message.recipient)
    return Planned(stage, (MsgItem(0, message.msg_id, message.sender, message.recipient, message.type, body,
                                   message.ts, message.dev), item.expires_ms))


def resume_point(client_id: str, present: Sequence[QueuedItem], planned: Sequence[Planned]) -> int:
    """How many of ``planned`` the cluster's queue holds already (they must be its first ones)."""
    there = [(replace(q.item, seq=0), q.expires_ms) for q in present]
    if there != [p.wire for p in planned[:len(there)]]:
        raise MigrateError(f"the queue of {client_id} in the cluster is not a start of its queue in the data folder "
                           "(a cluster broker delivered from it already?): its items were not migrated")
    return len(there)


def dedup_marks(items: Iterable[Item], remembered: Iterable[tuple[str, str, int]]
                ) -> tuple[dict[tuple[str, str, str], int], int]:
    """(user, sender, id) -> until, for each user holding an item of a message (the recipient, and
    the sender for its other devices' copies, as a cluster stage marks them), lasting as long as the
    message and the data folder's mark; plus how many remembered marks name no staged message (their
    recipient, whose slot the mark belongs in, is not recorded)."""
    until = {(sender, msg_id): ms for sender, msg_id, ms in remembered}
    marks: dict[tuple[str, str, str], int] = {}
    for item in items:
        if (message := item.message) is not None:
            key = (item.device.partition(".")[0], message.sender, message.msg_id)
            marks[key] = max(marks.get(key, 0), message.expires_ms, until.get((message.sender, message.msg_id), 0))
    placed = {(sender, msg_id) for _, sender, msg_id in marks}
    return marks, sum(1 for key in until if key not in placed)


def delivered_flags(items: Iterable[Item]) -> dict[tuple[str, str], list[str]]:
    """(recipient, sender) -> ids of delivered messages the recipient's devices still hold."""
    found: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)
    for item in items:
        message = item.message
        if message is not None and message.delivered and item.device.partition(".")[0] == message.recipient:
            found[(message.recipient, message.sender)][message.msg_id] = None
    return {key: list(ids) for key, ids in found.items()}


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass
class Target:
    users: RedisUserStore
    keys: RedisKeyStore
    queues: RedisQueueStore
    presence: RedisPresenceStore
    push: RedisPushStore

    @classmethod
    async def open(cls, nodes: Sequence[tuple[str, int]], prefix: str) -> Target:
        users = await RedisUserStore.open(nodes, prefix)
        try:  # one client each: the stores register their own scripts
            return cls(users, await RedisKeyStore.open(nodes, prefix), await RedisQueueStore.open(nodes, prefix),
                       await RedisPresenceStore.open(nodes, prefix), await RedisPushStore.open(nodes, prefix))
        except BaseException:
            await users.close()
            raise

    async def close(self) -> None:
        for store in (self.users, self.keys, self.queues, self.presence, self.push):
            await store.close()


async def migrate(data_dir: Path, nodes: Sequence[tuple[str, int]], prefix: str = "", *, dry_run: bool = False,
                  say: Callable[[str], None] = print) -> Report:
    """Move everything of ``data_dir`` into the cluster; ``say`` gets one line per phase. With
    ``dry_run`` the data folder is read and counted and the cluster only read (its key checked).
    Problems that leave something behind are in the report (the caller exits non-zero); one that
    stops the run raises MigrateError (or StoreError)."""
    if PREFIX_RE.fullmatch(prefix) is None:
        raise MigrateError(f"--key-prefix: letters, digits and _.:- only, not {prefix!r}")
    if not (data_dir / USERS_DB).is_file():
        raise MigrateError(f"{data_dir} is not a chat-broker data folder (no {USERS_DB}): give the --data-dir "
                           "the SQLite broker ran with")
    lock = BrokerLock.acquire(data_dir)  # DataDirInUseError names the running broker's pid
    try:
        try:
            target = await Target.open(nodes, prefix)
        except StoreError as exc:
            raise MigrateError(f"{exc}: check --cluster and that the cluster is up") from exc
        try:
            return await _run(data_dir, target, dry_run, say)
        finally:
            await target.close()
    finally:
        lock.release()


async def _run(data_dir: Path, target: Target, dry_run: bool, say: Callable[[str], None]) -> Report:
    report = Report()
    if (data_dir / GROUPS_DB).is_file():  # refused before anything is written: nothing half moved
        async with _opened(SqliteGroupStore, data_dir) as groups:
            count = await groups.count()
        if count:
            raise MigrateError(f"{data_dir} has {count} group(s) in {GROUPS_DB}: migrate does not move groups yet, "
                               "and moving the rest would leave their members without them. Keep this folder on "
                               "one SQLite broker for now")
    await _secret(data_dir, target.users, dry_run, say)
    async with _opened(SqliteUserStore, data_dir) as users:
        devices = await _users(users, target.users, dry_run, report)
    say(f"users: {report.counts['users']} users, {report.counts['devices']} devices, "
        f"{report.counts['tokens']} token digests")
    if (data_dir / KEYS_DB).is_file():
        async with _opened(SqliteKeyStore, data_dir) as keys:
            await _keys(keys, target.keys, dry_run, report)
    say(f"keys: {report.counts['keyed']} devices with keys, {report.counts['otks']} unclaimed one-time keys, "
        f"{report.counts['claimed']} claimed ids, {report.counts['fallbacks']} fallback keys")
    if (data_dir / STAGING_DB).is_file():
        async with _opened(SqliteMessageStore, data_dir) as staging:
            await _queues(staging, target.queues, devices, dry_run, report, say)
    else:
        say("queues: no staging.db: nothing staged")
    if (data_dir / PRESENCE_DB).is_file():
        async with _opened(SqlitePresenceStore, data_dir) as presence:
            await _presence(presence, target.presence, dry_run, report)
        say(f"presence: {report.counts['last_seen']} last-seen times, {report.counts['settings']} privacy settings, "
            f"{report.counts['contacts']} contacts")
    if (data_dir / PUSH_DB).is_file():
        async with _opened(SqlitePushStore, data_dir) as push:
            await _push(push, target.push, devices, dry_run, report)
        say(f"push: {report.counts['registrations']} device registration(s), {report.counts['gone']} gone mark(s)")
    counts = report.counts
    verb = "would move" if dry_run else "moved"
    say(f"summary: {verb} {counts['users']} users, {counts['devices']} devices, {counts['keyed']} key sets, "
        f"{counts['items']} items, {counts['marks']} dedup marks; {len(report.problems)} problem(s)"
        + (" (dry run: nothing written)" if dry_run else ""))
    for problem in report.problems:
        say(f"problem: {problem}")
    return report


async def _pool(jobs: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run ``jobs`` CONCURRENCY at a time (a failure cancels the rest and is raised)."""
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:
            await job()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


@contextlib.asynccontextmanager
async def _opened(kind: type[S], data_dir: Path) -> AsyncIterator[S]:
    store = await kind.open(data_dir)
    try:
        yield store
    finally:
        await store.close()


async def _secret(data_dir: Path, users: RedisUserStore, dry_run: bool, say: Callable[[str], None]) -> None:
    path = data_dir / SECRET_FILE
    if not path.is_file():
        say(f"secret: no {SECRET_FILE} (no device token was issued): the cluster makes its own")
        return
    secret = path.read_bytes()
    if dry_run:
        stored = await users.stored_secret()
        if stored is not None and stored != secret:
            raise MigrateError("the cluster already holds another device-token key: migrate into a fresh --key-prefix")
        say(f"secret: {SECRET_FILE} would be imported" + (" (there already)" if stored else ""))
        return
    await users.import_secret(secret)  # SecretMismatchError says what to do
    say(f"secret: {SECRET_FILE} imported (device tokens stay valid)")


async def _users(source: SqliteUserStore, target: RedisUserStore, dry_run: bool,
                 report: Report) -> dict[str, list[str]]:
    """Imports every user; returns user -> device ids (sorted)."""
    devices: dict[str, list[str]] = {}
    for info in await source.list_users():
        pw_hash = await source.password_hash(info.name)
        if pw_hash is None:  # deleted since the listing (a `chat-broker user del` meanwhile)
            continue
        rows = await source.devices(info.name)
        devices[info.name] = [row.device for row in rows]
        report.counts.update(users=1, devices=len(rows), tokens=sum(1 for row in rows if row.token_digest))
        if not dry_run and not await target.import_user(info.name, pw_hash, info.created_ms, rows):
            report.problems.append(f"user {info.name} exists in the cluster with another password: not migrated "
                                   "(delete it there, or migrate into a fresh --key-prefix)")
    return devices


async def _push(source: SqlitePushStore, target: RedisPushStore, devices: dict[str, list[str]], dry_run: bool,
                report: Report) -> None:
    """The registrations and gone marks of devices moved (one of a device removed is dropped, as a
    restart of the SQLite broker would)."""
    targets, _, gone = await source.load()
    known = {f"{user}.{device}" for user, ids in devices.items() for device in ids}
    for push_target in targets:
        if push_target.client_id in known:
            report.counts.update(registrations=1)
            if not dry_run:
                await target.register(push_target)
    for client_id in gone:
        if client_id in known:
            report.counts.update(gone=1)
            if not dry_run:
                await target.import_gone(client_id)


async def _presence(source: SqlitePresenceStore, target: RedisPresenceStore, dry_run: bool, report: Report) -> None:
    """Last-seen times, privacy settings and contacts: a privacy setting left behind would show a user
    who chose ``nobody`` to their contacts. Each write is idempotent (a time never moves back, a setting
    is set, contacts are a set)."""
    snapshot = await source.load()
    report.counts.update(last_seen=len(snapshot.last_seen), settings=len(snapshot.settings),
                         contacts=len(snapshot.contacts))
    if dry_run:
        return
    await target.save_last_seen(snapshot.last_seen)
    await _pool(functools.partial(target.set_privacy, user, setting) for user, setting in snapshot.settings)
    by_owner: dict[str, list[str]] = defaultdict(list)
    for owner, contact in snapshot.contacts:
        by_owner[owner].append(contact)
    await _pool(functools.partial(target.add_contacts, owner, users) for owner, users in by_owner.items())


async def _keys(source: SqliteKeyStore, target: RedisKeyStore, dry_run: bool, report: Report) -> None:
    for keys in await source.export():
        report.counts.update(keyed=1, otks=len(keys.one_time_keys), claimed=len(keys.claimed),
                             fallbacks=int(keys.fallback is not None))
        if dry_run:
            continue
        stored = await target.import_device(keys.user, keys.device, (keys.curve25519, keys.ed25519), keys.signed,
                                            keys.one_time_keys, keys.fallback, keys.claimed)
        if stored < 0:
            report.problems.append(f"device {keys.user}.{keys.device} has other identity keys in the cluster: "
                                   "its keys were not migrated")


async def _queues(source: SqliteMessageStore, target: RedisQueueStore, devices: dict[str, list[str]], dry_run: bool,
                  report: Report, say: Callable[[str], None]) -> None:
    messages, items, remembered = await source.load(int(time.time() * 1000))  # marks still in force
    floor = (await source.last_boot() + 1) * SEQ_SPAN
    queues = target_queues(items, devices)
    counts = report.counts
    if not dry_run:
        clients = sorted({f"{u}.{d}" for u, ds in devices.items() for d in ds} | set(queues))
        await _pool(functools.partial(target.import_seq_floor, client_id, floor) for client_id in clients)
    for queue in queues.values():
        counts.update(queues=1, items=len(queue), receipts=sum(1 for item in queue if item.message is None))
    if not dry_run:
        await _pool(functools.partial(_queue, source, target, client_id, queue, report)
                    for client_id, queue in queues.items())
    flags = delivered_flags(items)
    marks, unplaced = dedup_marks(items, remembered)
    counts.update(delivered=sum(len(ids) for ids in flags.values()), marks=len(marks))
    if not dry_run:
        await _pool(functools.partial(target.mark_delivered, recipient, sender, ids)
                    for (recipient, sender), ids in flags.items())
        await _pool(functools.partial(target.import_dedup_mark, user, sender, msg_id, until)
                    for (user, sender, msg_id), until in marks.items())
    say(f"queues: {counts['queues']} queues, {counts['items']} items ({counts['items'] - counts['receipts']} "
        f"messages, {counts['receipts']} receipts; {counts['present']} in the cluster already), "
        f"{counts['delivered']} delivered flags; seqs start above {floor}")
    say(f"dedup: {counts['marks']} marks of {len(messages)} staged messages"
        + (f"; {unplaced} marks of messages delivered already not moved (their recipient is not recorded: "
           "a re-send of one is delivered again, and the recipient's SDK drops it as a repeat)" if unplaced else ""))


async def _queue(source: SqliteMessageStore, target: RedisQueueStore, client_id: str, queue: list[Item],
                 report: Report) -> None:
    plain = await source.bodies(sorted({i.message.mid for i in queue if i.message and not i.message.olm}))
    olm = await source.item_bodies([(i.device, i.seq) for i in queue if i.message and i.message.olm])
    try:
        planned = [plan_item(client_id, item, _body(item, plain, olm)) for item in queue]
        present = await _read_all(target, client_id)
        done = resume_point(client_id, present, planned)
    except MigrateError as exc:
        report.problems.append(str(exc))
        return
    report.counts.update(present=done)
    for step in planned[done:]:
        result = await target.stage(step.stage)
        if result.status != StageStatus.STAGED or not result.targets:
            report.problems.append(f"an item of {client_id} was not staged ({result.status}, "
                                   f"{len(result.targets)} targets): is the device in the cluster?")
            return
    # The queue's entry in the expiry index is a hint written after each stage, so a run cut short
    # between the two leaves it out; an expiry at 0 drops nothing and indexes the queue afresh.
    await target.expire(client_id, 0)


def _body(item: Item, plain: dict[int, str], olm: dict[tuple[str, int], str]) -> str | None:
    message = item.message
    if message is None:
        return None
    return olm.get((item.device, item.seq)) if message.olm else plain.get(message.mid)


async def _read_all(target: RedisQueueStore, client_id: str) -> list[QueuedItem]:
    found: list[QueuedItem] = []
    while page := await target.read(client_id, found[-1].seq if found else 0, READ_PAGE):
        found += page
    return found
