"""The push store of cluster mode (``bridge.push.cluster_store.ClusterPushStore``), which only Redis
implements (one process keeps ``PushStore``, loaded whole at start): a record per device, wake-ups
queued once per device and no sooner than the interval, leased to one taker at a time, taken again
once a lease runs out (a node that died), settled only by their lease's holder."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import cast

import pytest

from bridge.push.cluster_store import Arrival, Queued, Settlement, Why
from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget
from storage.redis.push import RedisPushStore, decode, encode
from tests.stores.backends import Backend, RedisBackend

STORE_BACKENDS = ["redis"]
PHONE = PushTarget("unifiedpush", "https://ntfy.example/up1", "bob.phone")
TTL = 600_000
LEASE = 30_000


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[RedisPushStore]:
    redis = cast(RedisBackend, backend)
    opened = await RedisPushStore.open(redis.startup_nodes, redis.prefix)
    try:
        yield opened
    finally:
        await opened.close()


def wake(now: int, client_id: str = "bob.phone") -> QueuedWake:
    return QueuedWake(client_id, now, now + TTL)


async def take(store: RedisPushStore, client_id: str, now: int) -> list[QueuedWake]:
    taken, _ = await store.take(store.shard(client_id), now, 10, LEASE, f"lease-{now}")
    return [t.wake for t in taken]


async def test_a_registration_is_per_device_and_dropped_with_everything(store: RedisPushStore) -> None:
    assert await store.online("bob.phone") == Arrival(None, False, False)
    await store.register(PHONE)
    assert await store.online("bob.phone") == Arrival(PHONE, False, False)
    assert await store.queue(wake(1_000), Why.STAGED, 100) == (Queued.QUEUED, wake(1_000))
    assert await store.unregister("bob.phone") is True
    assert await store.unregister("bob.phone") is False
    assert await take(store, "bob.phone", 10_000) == []


async def test_one_wake_up_per_device_leased_to_one_taker_until_its_lease_runs_out(store: RedisPushStore) -> None:
    assert await store.queue(wake(1_000), Why.STAGED, 100) == (Queued.KEPT, None)  # not registered
    await store.register(PHONE)
    assert (await store.queue(wake(1_000), Why.STAGED, 100))[0] is Queued.QUEUED
    assert await store.queue(wake(1_001), Why.STAGED, 100) == (Queued.KEPT, None)  # rule 4
    shard = store.shard("bob.phone")
    [taken], count = await store.take(shard, 1_000, 10, LEASE, "node-a")
    assert (taken.wake, taken.target, taken.why, count) == (wake(1_000), PHONE, Why.STAGED, 1)
    assert await store.take(shard, 1_000 + LEASE - 1, 10, LEASE, "node-b") == ([], 1)  # leased to node-a
    [again], _ = await store.take(shard, 1_000 + LEASE, 10, LEASE, "node-b")  # node-a died: node-b sends it
    await store.settle(taken, Settlement(sent=True, hold_until_ms=99_000))  # node-a's lease is gone: nothing
    assert await take(store, "bob.phone", 1_000 + 3 * LEASE) == [wake(1_000)]
    await store.settle(again, Settlement(sent=True, hold_until_ms=99_000))  # (the lease taken just now is newer)
    assert await take(store, "bob.phone", 1_000 + 5 * LEASE) == [wake(1_000)]


async def test_a_sent_wake_up_holds_the_next_until_the_interval_or_an_ack(store: RedisPushStore) -> None:
    await store.register(PHONE)
    await store.queue(wake(1_000), Why.STAGED, 100)
    [taken], _ = await store.take(store.shard("bob.phone"), 1_000, 10, LEASE, "n")
    await store.settle(taken, Settlement(sent=True, hold_until_ms=61_000))
    assert await take(store, "bob.phone", 2_000) == []
    status, held = await store.queue(wake(2_000), Why.STAGED, 100)
    assert status is Queued.QUEUED and held == QueuedWake("bob.phone", 61_000, 61_000 + TTL)  # rule 3
    assert await take(store, "bob.phone", 60_999) == []
    assert (await store.online("bob.phone")).held  # it connected: the queued one goes (rule 4)
    assert await take(store, "bob.phone", 61_000) == []
    await store.acked("bob.phone")  # an ack ends the interval
    assert (await store.queue(wake(3_000), Why.STAGED, 100)) == (Queued.QUEUED, wake(3_000))


async def test_a_retry_is_due_later_and_a_grace_marks_the_queued_one(store: RedisPushStore) -> None:
    await store.register(PHONE)
    await store.queue(wake(1_000), Why.STAGED, 100)
    assert await store.queue(wake(1_500), Why.GRACE, 100) == (Queued.KEPT, None)
    [taken], _ = await store.take(store.shard("bob.phone"), 2_000, 10, LEASE, "n")
    assert taken.why is Why.GRACE
    later = dataclasses.replace(taken.wake, due_ms=5_000, attempts=1)
    await store.settle(taken, Settlement(again=later))
    assert await take(store, "bob.phone", 4_999) == []
    assert await take(store, "bob.phone", 5_000) == [later]


async def test_a_gone_token_drops_the_registration_and_is_told_once(store: RedisPushStore) -> None:
    await store.register(PHONE)
    await store.queue(wake(1_000), Why.STAGED, 100)
    [taken], _ = await store.take(store.shard("bob.phone"), 1_000, 10, LEASE, "n")
    await store.settle(taken, Settlement(gone=True))
    assert await store.queue(wake(2_000), Why.STAGED, 100) == (Queued.KEPT, None)
    assert await store.online("bob.phone") == Arrival(None, True, False)
    assert await store.online("bob.phone") == Arrival(None, False, False)


async def test_a_gone_token_of_a_device_that_registered_again_is_not_marked(store: RedisPushStore) -> None:
    await store.register(PHONE)
    await store.queue(wake(1_000), Why.STAGED, 100)
    [taken], _ = await store.take(store.shard("bob.phone"), 1_000, 10, LEASE, "n")
    fresh = dataclasses.replace(PHONE, token="https://ntfy.example/up2")
    await store.register(fresh)
    await store.settle(taken, Settlement(gone=True))
    assert await store.online("bob.phone") == Arrival(fresh, False, False)


async def test_a_full_shard_drops_the_wake_up(store: RedisPushStore) -> None:
    same = [f"bob.d{n}" for n in range(200) if store.shard(f"bob.d{n}") == store.shard("bob.phone")][:2]
    for client_id in same:
        await store.register(dataclasses.replace(PHONE, client_id=client_id))
    assert (await store.queue(wake(1_000, same[0]), Why.STAGED, 1))[0] is Queued.QUEUED
    assert await store.queue(wake(1_000, same[1]), Why.STAGED, 1) == (Queued.FULL, None)


async def test_a_queued_wake_up_carries_the_newest_preview_until_it_goes(store: RedisPushStore) -> None:
    """Rule 8: each newer preview replaces the queued one's, also while it is being sent (its retry
    carries the newest); it goes with the wake-up (sent, or the device connected)."""
    await store.register(PHONE)
    first = dataclasses.replace(wake(1_000), preview="p1")
    assert await store.queue(first, Why.STAGED, 100) == (Queued.QUEUED, wake(1_000))
    assert await store.queue(dataclasses.replace(wake(1_100), preview="p2"), Why.STAGED, 100) == (Queued.KEPT, None)
    assert await store.queue(wake(1_200), Why.STAGED, 100) == (Queued.KEPT, None)  # none: the newest stays
    [taken], _ = await store.take(store.shard("bob.phone"), 2_000, 10, LEASE, "n")
    assert taken.wake == dataclasses.replace(wake(1_000), preview="p2")
    await store.queue(dataclasses.replace(wake(2_100), preview="p3"), Why.STAGED, 100)  # while it is sent
    await store.settle(taken, Settlement(again=dataclasses.replace(taken.wake, due_ms=5_000, attempts=1)))
    [retry], _ = await store.take(store.shard("bob.phone"), 5_000, 10, LEASE, "n")
    assert retry.wake.preview == "p3"
    await store.settle(retry, Settlement(sent=True, hold_until_ms=5_000))
    assert await store.queue(wake(6_000), Why.STAGED, 100) == (Queued.QUEUED, wake(6_000))
    assert await take(store, "bob.phone", 6_000) == [wake(6_000)]  # the sent one's preview went with it
    await store.queue(dataclasses.replace(wake(7_000), preview="p4"), Why.STAGED, 100)
    await store.online("bob.phone")
    assert await store.queue(wake(8_000), Why.STAGED, 100) == (Queued.QUEUED, wake(8_000))
    assert await take(store, "bob.phone", 8_000 + LEASE) == [wake(8_000)]


async def test_registrations_are_read_for_many_devices_at_once(store: RedisPushStore) -> None:
    devices = [f"bob.d{n}" for n in range(40)]  # over every shard
    keyed = [dataclasses.replace(PHONE, client_id=c, preview_key=f"k{c}", preview_sig=f"s{c}") for c in devices[::2]]
    for target in keyed:
        await store.register(target)
    assert await store.registrations([*devices, "carol.phone"]) == {t.client_id: t for t in keyed}
    assert await store.registrations([]) == {}


def test_records_are_read_by_field_name() -> None:
    """A field a newer writer added is ignored; one an older writer lacked takes its default."""
    raw = '{"client_id":"a.b","due_ms":1.0,"expires_ms":2,"later_field":"x"}'
    assert decode(QueuedWake, raw) == QueuedWake("a.b", 1, 2)
    assert decode(QueuedWake, encode(QueuedWake("a.b", 1, 2, 3))) == QueuedWake("a.b", 1, 2, 3)
