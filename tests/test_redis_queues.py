"""The cluster's device queues (storage/redis/queues.py) against a real Redis Cluster: staging,
reading, acking, delivery and expiry reports, dedup (bounded per user), the placeholder, rate
buckets, concurrency, a script retried across a master failover, and write-back's seam (seq
blocks, reserve, settle, pending marks). Each test has its own key prefix."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from bridge.cluster.store import SEQ_STRIDE, MessageEntry, MessageRef, Stage, StageResult, StageStatus
from chatproto import MsgItem, ReceiptItem
from storage.redis.queues import RedisQueueStore
from storage.redis.users import RedisUserStore
from testkit.redis_cluster import RedisCluster
from tests.test_redis_nodes import eventually

FAR = 10**13  # an expiry no test reaches
S = SEQ_STRIDE  # a device's n-th seq is n * S


@dataclass
class Stores:
    queues: RedisQueueStore
    users: RedisUserStore
    prefix: str

    async def devices(self, user: str, *devices: str) -> None:
        await self.users.add_users([(user, "x")])
        for device in devices:
            await self.users.record_login(user, device)

    async def keys(self, pattern: str) -> list[str]:
        """The keys of this test matching ``pattern`` (after the prefix), from every master."""
        client = self.queues._client  # the store's own connection: nothing else to set up
        return sorted([str(key) async for key in client.scan_iter(match=self.prefix + pattern, count=1000)])


@pytest.fixture
async def stores(redis_cluster: RedisCluster) -> AsyncIterator[Stores]:
    prefix = f"q{uuid.uuid4().hex[:12]}:"
    queues = await RedisQueueStore.open(redis_cluster.startup_nodes, prefix)
    users = await RedisUserStore.open(redis_cluster.startup_nodes, prefix)
    try:
        yield Stores(queues, users, prefix)
    finally:
        await queues.close()
        await users.close()


def plain(msg_id: str, body: str = "hello", sender: str = "alice", to: str = "bob") -> MessageEntry:
    return MessageEntry(sender, msg_id, to, "text", 1_700_000_000_000, "phone", body=body)


def message_stage(entry: MessageEntry, user: str = "bob", expires_ms: int = FAR, max_queue: int = 100,
                  devices: tuple[str, ...] | None = None, delivery: bool = True, dedup: bool = True) -> Stage:
    return Stage(user, expires_ms, max_queue, devices, message=entry, dedup_until_ms=FAR if dedup else 0,
                 delivery=delivery)


def receipt_stage(ids: tuple[str, ...], user: str = "alice", expires_ms: int = FAR) -> Stage:
    return Stage(user, expires_ms, 10_000, receipt=ReceiptItem("delivered", ids, "bob", 1_700_000_000_001))


async def test_a_plain_message_is_stored_once_read_by_each_device_and_gone_after_the_last_ack(
        stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop", "tablet")
    result = await q.stage(message_stage(plain("m1", "hi bob")))
    assert result == StageResult(StageStatus.STAGED, (("bob.laptop", S), ("bob.phone", S), ("bob.tablet", S)))
    expected = MsgItem(S, "m1", "alice", "bob", "text", "hi bob", 1_700_000_000_000, "phone")
    for device in ("phone", "laptop", "tablet"):
        [queued] = await q.read(f"bob.{device}", 0, 10)
        assert queued.item == expected and queued.expires_ms == FAR
    assert await stores.keys("qm:*") == [f"{stores.prefix}qm:{{bob}}:alice/m1"], "one body for three devices"
    record = await q.command("test", "HGETALL", f"{stores.prefix}qm:{{bob}}:alice/m1")
    assert record["refs"] == "3" and record["wire"].count("hi bob") == 1
    assert await q.read("bob.phone", S, 10) == []
    assert await q.ack("bob.phone", [S]) == [MessageRef("alice", "m1", "bob")]
    assert await q.ack("bob.phone", [S]) == [], "a repeated ack finds nothing"
    assert await q.ack("bob.laptop", [S, 7]) == []
    assert await stores.keys("qm:*") != []
    assert await q.ack("bob.tablet", [S]) == []
    assert await stores.keys("qm:*") == [], "the record went with the last item"
    assert [await q.depth(f"bob.{d}") for d in ("phone", "laptop", "tablet")] == [0, 0, 0]


async def test_an_olm_message_gives_each_current_device_its_own_ciphertext(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    entry = MessageEntry("alice", "o1", "bob", "olm", 5, "phone",
                         bodies={"bob.phone": "c-phone", "bob.laptop": "c-laptop", "bob.gone": "c-gone"})
    result = await q.stage(message_stage(entry))
    assert result.targets == (("bob.laptop", S), ("bob.phone", S)), "bob.gone is no device of bob's"
    [phone] = await q.read("bob.phone", 0, 10)
    [laptop] = await q.read("bob.laptop", 0, 10)
    assert phone.item == MsgItem(S, "o1", "alice", "bob", "olm", "c-phone", 5, "phone")
    assert isinstance(laptop.item, MsgItem) and laptop.item.body == "c-laptop"
    record = await q.command("test", "HGET", f"{stores.prefix}qm:{{bob}}:alice/o1", "wire")
    assert "c-phone" not in record and "c-laptop" not in record, "ciphertexts live on the items only"
    # Explicit devices: only those named, and only current ones.
    again = MessageEntry("alice", "o2", "bob", "olm", 6, "phone", bodies={"bob.phone": "x", "bob.laptop": "y"})
    result = await q.stage(message_stage(again, devices=("bob.phone", "bob.gone")))
    assert result.targets == (("bob.phone", 2 * S),)
    assert await q.ack("bob.phone", [S, 2 * S]) == [MessageRef("alice", "o1", "bob"), MessageRef("alice", "o2", "bob")]


async def test_receipts_round_trip_and_explicit_devices_skip_unknown_ones(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("alice", "phone", "laptop")
    ids = tuple(f"id-{n}" for n in range(1000))
    result = await q.stage(receipt_stage(ids))
    assert [t for t, _ in result.targets] == ["alice.laptop", "alice.phone"]
    [queued] = await q.read("alice.phone", 0, 5)
    assert queued.item == ReceiptItem("delivered", ids, "bob", 1_700_000_000_001, S)
    only = Stage("alice", FAR, 10, ("alice.laptop", "alice.old", "bob.phone"),
                 receipt=ReceiptItem("seen", ("m",), "bob", 9))
    assert (await q.stage(only)).targets == (("alice.laptop", 2 * S),)
    assert await q.ack("alice.laptop", [S, 2 * S]) == [], "receipts report nothing"
    assert await q.depth("alice.laptop") == 0 and await q.depth("alice.phone") == 1


async def test_seqs_increase_per_device_across_stages_and_after_removal(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    for n in range(3):
        await q.stage(message_stage(plain(f"m{n}"), devices=("bob.phone",)))
    assert [i.item.seq for i in await q.read("bob.phone", 0, 10)] == [S, 2 * S, 3 * S]
    assert [i.item.seq for i in await q.read("bob.phone", S, 1)] == [2 * S]
    assert await q.remove_device("bob.phone") == 3
    assert await q.depth("bob.phone") == 0 and await stores.keys("qm:*") == [], "records released"
    result = await q.stage(message_stage(plain("m9")))
    assert result.targets == (("bob.laptop", S), ("bob.phone", 4 * S)), "a removed device's id keeps counting"
    assert await q.remove_device("bob.phone") == 1 and await q.remove_device("bob.phone") == 0


async def test_delivered_is_reported_once_across_devices_acking_at_once(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    for n in range(20):
        await q.stage(message_stage(plain(f"m{n}")))
    seqs = [n * S for n in range(1, 21)]
    phone, laptop = await asyncio.gather(q.ack("bob.phone", seqs), q.ack("bob.laptop", seqs))
    assert sorted(r.msg_id for r in phone + laptop) == sorted(f"m{n}" for n in range(20))
    # A 'seen' before any ack marks it delivered: the ack then reports nothing.
    await q.stage(message_stage(plain("s1")))
    await q.stage(message_stage(plain("s2")))
    assert await q.mark_delivered("bob", "alice", ["s2", "nope", "s1"]) == ["s2", "s1"]
    assert await q.mark_delivered("bob", "alice", ["s1", "s2"]) == []
    assert await q.ack("bob.phone", [21 * S, 22 * S]) == []
    # The sender's own copy (no delivery record) is not reported by any ack.
    await stores.devices("alice", "laptop")
    await q.stage(message_stage(plain("s3"), user="alice", devices=("alice.laptop",), delivery=False, dedup=False))
    assert await q.ack("alice.laptop", [S]) == []
    assert await q.mark_delivered("alice", "alice", ["s3"]) == []


async def test_a_repeated_message_is_a_duplicate_and_a_full_queue_stages_nothing(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    assert (await q.stage(message_stage(plain("d1")))).status == StageStatus.STAGED
    assert await q.stage(message_stage(plain("d1"))) == StageResult(StageStatus.DUPLICATE)
    assert await q.depth("bob.phone") == 1
    await q.stage(message_stage(plain("p1"), devices=("bob.phone",), max_queue=2))
    full = await q.stage(message_stage(plain("f1"), max_queue=2))
    assert full == StageResult(StageStatus.QUEUE_FULL)
    assert await q.depth("bob.laptop") == 1, "laptop had room but got nothing"
    assert f"{stores.prefix}qm:{{bob}}:alice/f1" not in await stores.keys("qm:*")
    assert await q.command("test", "ZSCORE", q.key("qd", "bob"), "alice/f1") is None, "a refused one is not marked"
    await q.ack("bob.phone", [S])
    assert (await q.stage(message_stage(plain("f1"), max_queue=2))).status == StageStatus.STAGED
    past = replace(message_stage(plain("old")), dedup_until_ms=1)  # a mark that has already expired
    assert (await q.stage(past)).status == (await q.stage(past)).status == StageStatus.STAGED


async def test_the_placeholder_holds_items_until_the_first_device_adopts_them(stores: Stores) -> None:
    q = stores.queues
    await stores.users.add_users([("carol", "x")])
    assert (await q.stage(message_stage(plain("c1", to="carol"), user="carol"))).targets == (("carol.*", S),)
    await q.stage(receipt_stage(("x",), user="carol"))
    await q.stage(message_stage(plain("c2", to="carol"), user="carol", expires_ms=5000))
    assert await q.ack("carol.*", [S]) == [], "the placeholder is no device: no delivered"
    await stores.users.record_login("carol", "phone")
    await q.stage(message_stage(plain("c3", to="carol"), user="carol"))  # the device's seq 1
    assert await q.adopt_placeholder("carol", "carol.phone") == 2
    assert await q.adopt_placeholder("carol", "carol.phone") == 0
    items = await q.read("carol.phone", 0, 10)
    assert [(i.item.seq, type(i.item).__name__) for i in items] == [(S, "MsgItem"), (2 * S, "ReceiptItem"),
                                                                     (3 * S, "MsgItem")]
    assert isinstance(items[2].item, MsgItem) and items[2].item.id == "c2" and items[2].expires_ms == 5000
    assert await q.depth("carol.*") == 0
    assert await q.due(5000, 10) == ["carol.phone"], "the adopted expiry is indexed under the device"
    assert await q.ack("carol.phone", [S, 3 * S]) == [MessageRef("alice", "c3", "carol"),
                                                  MessageRef("alice", "c2", "carol")]


async def test_expiry_reports_each_message_once_and_the_index_finds_the_queues(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    await q.stage(message_stage(plain("e1"), expires_ms=1000))
    await q.stage(message_stage(plain("e2"), expires_ms=3000, devices=("bob.phone",)))
    await q.stage(receipt_stage(("r",), user="bob", expires_ms=1500))
    assert sorted(await q.due(999, 10)) == []
    assert sorted(await q.due(2000, 10)) == ["bob.laptop", "bob.phone"]
    assert len(await q.due(2000, 1)) == 1
    phone, laptop = await asyncio.gather(q.expire("bob.phone", 2000), q.expire("bob.laptop", 2000))
    assert phone.items == 2 and laptop.items == 2
    assert phone.expired + laptop.expired == [MessageRef("alice", "e1", "bob")], "once across both devices"
    assert await q.due(2000, 10) == [], "laptop is empty; phone waits for e2"
    assert await q.due(3000, 10) == ["bob.phone"]
    swept = await q.expire("bob.phone", 3000)
    assert swept.expired == [MessageRef("alice", "e2", "bob")] and await q.due(FAR, 10) == []
    assert await stores.keys("qm:*") == []
    # A stale hint (the items were acked) costs one empty expire.
    staged = dict((await q.stage(message_stage(plain("e3"), expires_ms=4000))).targets)
    await q.ack("bob.phone", [staged["bob.phone"]])
    assert "bob.phone" in await q.due(4000, 10)
    assert (await q.expire("bob.phone", 4000)).items == 0
    assert await q.due(4000, 10) == ["bob.laptop"]


async def test_a_bucket_never_grants_more_than_its_burst_to_concurrent_callers(stores: Stores) -> None:
    q = stores.queues
    granted = await asyncio.gather(*(q.allow("bob", "send", 2.0, 10, 1_000_000) for _ in range(50)))
    assert granted.count(True) == 10
    assert not await q.allow("bob", "send", 2.0, 10, 1_000_400), "0.8 of a token is not one"
    assert await q.allow("bob", "send", 2.0, 10, 1_000_500)
    later = await asyncio.gather(*(q.allow("bob", "send", 2.0, 10, 1_002_500) for _ in range(50)))
    assert later.count(True) == 4
    assert await q.allow("bob", "other", 2.0, 10, 1_000_000), "buckets are separate"
    assert await q.allow("carol", "send", 2.0, 10, 1_000_000), "users are separate"


async def test_concurrent_stages_for_one_device_get_distinct_seqs_a_stride_apart(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone")
    results = await asyncio.gather(*(q.stage(message_stage(plain(f"c{n}"))) for n in range(100)))
    assert sorted(r.targets[0][1] for r in results) == [n * S for n in range(1, 101)]
    items = await q.read("bob.phone", 0, 1000)
    assert sorted(i.item.id for i in items if isinstance(i.item, MsgItem)) == sorted(f"c{n}" for n in range(100))


async def test_a_script_run_twice_stages_and_reports_once(stores: Stores) -> None:
    """What ``call`` does after a reply lost with its master: the same script, the same token."""
    q = stores.queues
    await stores.devices("bob", "phone")
    token = q.key("qr", "bob", "fixed")
    q._replay_key = lambda user, _token="": token  # type: ignore[method-assign]  # every call reuses one token
    first = await q.stage(receipt_stage(("x",), user="bob"))
    assert await q.stage(receipt_stage(("x",), user="bob")) == first
    assert await q.depth("bob.phone") == 1, "staged once"
    await q.command("test", "DEL", token)
    await q.stage(message_stage(plain("m1")))
    assert (await q.stage(message_stage(plain("m1")))).status == StageStatus.STAGED, "not DUPLICATE"
    await q.command("test", "DEL", token)
    assert await q.ack("bob.phone", [S, 2 * S]) == [MessageRef("alice", "m1", "bob")]
    assert await q.ack("bob.phone", [S, 2 * S]) == [MessageRef("alice", "m1", "bob")], "the report is not lost"


async def test_stages_across_a_master_failover_neither_lose_nor_duplicate_items(
        stores: Stores, redis_cluster: RedisCluster) -> None:
    q = stores.queues
    await stores.devices("dave", "phone")
    results: list[StageResult] = []
    some_done = asyncio.Event()

    async def writer(w: int) -> None:
        for n in range(15):  # receipts: no dedup mark would hide a second copy
            results.append(await q.stage(receipt_stage((f"{w}-{n}",), user="dave")))
            if len(results) >= 20:
                some_done.set()

    tasks = [asyncio.create_task(writer(w)) for w in range(8)]
    await asyncio.wait_for(some_done.wait(), 30)
    killed = await asyncio.to_thread(redis_cluster.kill_master, "{dave}")  # while the writers run
    at_kill = len(results)
    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        waited = time.monotonic() - started
        # Every node's view, not one node's: the writers may finish on the new master before gossip
        # has reached the node a single query would ask (CI, stop 27).
        promoted = await asyncio.to_thread(redis_cluster.wait_promoted, "{dave}", killed)
        assert promoted.port != killed.port, "a replica took over"
    finally:
        await asyncio.to_thread(redis_cluster.restart, killed)
    assert at_kill < 120 and waited > 1.0, f"{at_kill} of 120 staged at the kill, the rest waited {waited:.1f} s"
    items = await q.read("dave.phone", 0, 1000)
    ids = [i.item.ids[0] for i in items if isinstance(i.item, ReceiptItem)]
    assert sorted(ids) == sorted(f"{w}-{n}" for w in range(8) for n in range(15)), "each exactly once"
    assert sorted(seq for r in results for _, seq in r.targets) == [i.item.seq for i in items]


@pytest.mark.parametrize("body", ["", "é😀\u200d👩‍👩‍👧", "\u202eevil\u2028line", "nul\x00inside", '"], "x":[1]',
                                  "\\u0000 not an escape", "\U0001d54f" * 3000])
async def test_odd_bodies_come_back_as_sent(stores: Stores, body: str) -> None:
    q = stores.queues
    await stores.devices("bob", "phone")
    await q.stage(message_stage(plain("b1", body)))
    olm = MessageEntry("alice", "b2", "bob", "olm", 1, "phone", bodies={"bob.phone": body})
    await q.stage(message_stage(olm))
    first, second = await q.read("bob.phone", 0, 10)
    assert isinstance(first.item, MsgItem) and first.item.body == body
    assert second.item == replace(first.item, seq=2 * S, id="b2", type="olm", ts=1)


async def test_seq_block_lies_between_the_seqs_staged_before_and_after(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone")
    assert await q.seq_block("bob.laptop") == S, "a device with no seq yet"
    before = (await q.stage(message_stage(plain("b1")))).targets[0][1]
    base = await q.seq_block("bob.phone")
    after = (await q.stage(message_stage(plain("b2")))).targets[0][1]
    assert before < base and after >= base + S
    assert await q.seq_block("bob.phone") >= after + S


async def until_gone(q: RedisQueueStore, key: str) -> None:
    async def gone() -> bool:
        return not await q.command("test", "EXISTS", key)

    await eventually(gone, f"{key} expires")


async def reserve(q: RedisQueueStore, stage: Stage, whole_user: bool) -> StageStatus:
    return (await q.reserve(stage, 60_000, whole_user=whole_user)).status


def reserved(entry: MessageEntry, devices: tuple[str, ...], **changes: int) -> Stage:
    return replace(message_stage(entry, devices=devices), **changes)


async def test_reserve_admits_a_message_once_and_its_write_back_or_settle_marks_it(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    both = ("bob.laptop", "bob.phone")
    assert await reserve(q, reserved(plain("w1"), both), True) == StageStatus.STAGED
    assert await stores.keys("q:*") == [], "a reservation writes no item"
    assert 0 < await q.command("test", "PTTL", q.key("qp", "bob", "alice/w1")) <= 60_000
    assert await reserve(q, reserved(plain("w1"), both), True) == StageStatus.PENDING
    assert await q.stage(message_stage(plain("w1"))) == StageResult(StageStatus.PENDING), "a repeat meanwhile"
    assert await q.depth("bob.phone") == 0
    # Its node writes it back: staged, marked; a repeat is a duplicate.
    written = await q.stage(replace(reserved(plain("w1"), both), writeback=True))
    assert written.status == StageStatus.STAGED and len(written.targets) == 2
    assert await q.command("test", "EXISTS", q.key("qp", "bob", "alice/w1")) == 0, "the pending mark is replaced"
    assert (await q.stage(message_stage(plain("w1")))).status == StageStatus.DUPLICATE
    assert await reserve(q, reserved(plain("w1"), both), True) == StageStatus.DUPLICATE
    assert (await q.stage(replace(reserved(plain("w1"), both), writeback=True))).status == StageStatus.DUPLICATE
    # Or every target acked it first: settled, never written. The reservation names each target's
    # tail (its highest queued seq): the node hands w2 over only once it read w1's items.
    second = await q.reserve(reserved(plain("w2"), both), 60_000, whole_user=True)
    assert second.status == StageStatus.STAGED
    assert second.tails == {client_id: seq for client_id, seq in written.targets}
    assert await q.tails("bob", [*both, "bob.tablet"]) == {**second.tails, "bob.tablet": 0}
    await q.settle(reserved(plain("w2"), both))
    await q.settle(reserved(plain("w2"), both))  # idempotent
    assert (await q.stage(message_stage(plain("w2")))).status == StageStatus.DUPLICATE
    assert await reserve(q, reserved(plain("w2"), both), True) == StageStatus.DUPLICATE
    assert await q.depth("bob.phone") == 1 and await stores.keys("qp:*") == []
    assert await q.command("test", "ZCARD", q.key("qd", "bob")) == 2


async def test_reserve_answers_changed_for_other_devices_and_queue_full_without_a_mark(stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone", "laptop")
    await stores.users.add_users([("carol", "x")])
    both = ("bob.laptop", "bob.phone")
    assert await reserve(q, reserved(plain("c1"), ("bob.phone",)), True) == StageStatus.CHANGED
    assert await reserve(q, reserved(plain("c1"), (*both, "bob.old")), True) == StageStatus.CHANGED
    assert (await q.reserve(reserved(plain("c1", to="carol"), ("carol.phone",)), 60_000,
                           whole_user=True)).status == StageStatus.CHANGED, "a user with no device"
    await stores.users.record_login("bob", "tablet")
    assert await reserve(q, reserved(plain("c1"), both), True) == StageStatus.CHANGED, "one more"
    assert await stores.keys("qp:*") == []
    assert await reserve(q, reserved(plain("c1"), ("bob.phone",)), False) == StageStatus.STAGED
    await q.stage(message_stage(plain("f0"), devices=("bob.laptop",)))
    full = reserved(plain("f1"), ("bob.laptop", "bob.phone", "bob.tablet"), max_queue=1)
    assert await reserve(q, full, True) == StageStatus.QUEUE_FULL
    assert (await q.reserve(reserved(plain("f1"), ("bob.phone",), max_queue=1), 60_000,
                           whole_user=False)).status == StageStatus.STAGED, "the full queue is not a target"
    assert (await q.stage(message_stage(plain("f2"), max_queue=1))).status == StageStatus.QUEUE_FULL


async def test_a_retried_reserve_answers_the_same_and_an_expired_reservation_lets_a_stage_through(
        stores: Stores) -> None:
    q = stores.queues
    await stores.devices("bob", "phone")
    real = q._replay_key
    token = q.key("qr", "bob", "fixed")
    q._replay_key = lambda user: token  # type: ignore[method-assign]  # what a retry after a lost reply does
    assert (await q.reserve(reserved(plain("r1"), ("bob.phone",)), 300, whole_user=True)).status == StageStatus.STAGED
    assert (await q.reserve(reserved(plain("r1"), ("bob.phone",)), 300, whole_user=True)).status == StageStatus.STAGED
    q._replay_key = real  # type: ignore[method-assign]
    assert await q.stage(message_stage(plain("r1"))) == StageResult(StageStatus.PENDING)
    await until_gone(q, q.key("qp", "bob", "alice/r1"))  # its node never wrote it back (it died)
    assert (await q.stage(message_stage(plain("r1")))).status == StageStatus.STAGED


async def bounded(stores: Stores, max_dedup: int) -> RedisQueueStore:
    """A second store on the same client and keys, keeping ``max_dedup`` marks per user."""
    return RedisQueueStore(stores.queues._client, stores.prefix, max_dedup=max_dedup)


async def test_a_flooded_user_keeps_only_the_newest_marks(stores: Stores) -> None:
    q = await bounded(stores, 50)
    marks = q.key("qd", "bob")
    await stores.devices("bob", "phone")
    for n in range(200):
        stage = replace(message_stage(plain(f"m{n}"), max_queue=10_000), dedup_until_ms=FAR + n)
        assert (await q.stage(stage)).status == StageStatus.STAGED
    assert await q.command("test", "ZRANGE", marks, "0", "-1") == [f"alice/m{n}" for n in range(150, 200)]
    assert await q.command("test", "PEXPIRETIME", marks) == FAR + 199, "the set goes with its latest mark"
    assert (await q.stage(message_stage(plain("m199"), max_queue=10_000))).status == StageStatus.DUPLICATE
    assert (await q.stage(message_stage(plain("m0"), max_queue=10_000))).status == StageStatus.STAGED, \
        "older than the newest 50: delivered again"
    # Many senders at once: the bound holds all the same.
    senders = [f"s{n}" for n in range(20)]

    async def sender(name: str) -> None:
        for n in range(20):
            assert (await q.stage(message_stage(plain(f"x{n}", sender=name), max_queue=10_000))).status == \
                StageStatus.STAGED

    await asyncio.gather(*(sender(name) for name in senders))
    assert await q.command("test", "ZCARD", marks) == 50
    await q.settle(reserved(plain("late"), ("bob.phone",)))
    await q.import_dedup_mark("bob", "eve", "e1", FAR)
    assert await q.command("test", "ZCARD", marks) == 50, "a settle and an import count too"


async def test_marks_expire_and_expired_ones_are_dropped_as_stages_pass(stores: Stores) -> None:
    q = stores.queues
    marks = q.key("qd", "bob")
    await stores.devices("bob", "phone")
    soon = int(time.time() * 1000) + 300
    assert (await q.stage(replace(message_stage(plain("e1")), dedup_until_ms=soon))).status == StageStatus.STAGED
    assert (await q.stage(replace(message_stage(plain("e1")), dedup_until_ms=soon))).status == StageStatus.DUPLICATE
    await until_gone(q, marks)
    assert (await q.stage(replace(message_stage(plain("e1")), dedup_until_ms=soon + 300))).status == \
        StageStatus.STAGED
    await q.stage(message_stage(plain("e2")))  # until FAR: the set now lasts that long

    async def past() -> bool:  # e1's mark has expired (Redis's clock is this machine's)
        return time.time() * 1000 > soon + 350

    await eventually(past, "e1's mark expires")
    await q.stage(message_stage(plain("e3")))
    assert await q.command("test", "ZRANGE", marks, "0", "-1") == ["alice/e2", "alice/e3"], "e1 dropped"


async def test_a_stage_retried_with_its_token_answers_the_first_run(stores: Stores) -> None:
    """A receipt has no dedup mark: a retry after a failed WAIT must not stage it twice."""
    q = stores.queues
    await stores.devices("alice", "phone")
    stage = replace(receipt_stage(("m1",)), token="retry-1")
    first = await q.stage(stage)
    assert await q.stage(stage) == first, "the same reply, nothing staged again"
    assert await q.depth("alice.phone") == 1
    assert (await q.stage(replace(stage, token=""))).targets != first.targets, "a fresh token stages again"
