"""Push previews in cluster mode (docs/PUSH.md "Cluster mode", docs/PROTOCOL.md section 12): two
broker nodes on the session's Redis Cluster and a UnifiedPush distributor on 127.0.0.1. The sender's
SDK on one node learns the phone's preview key from ``keys.list`` (read from Redis); the wake-up,
queued in Redis with the newest preview, reaches the distributor with a payload the phone's SDK on
the other node opens; with previews off nothing of a preview reaches Redis or a payload."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.push.cluster import ClusterPush
from bridge.push.core import PushRules
from bridge.push.provider import PushTarget
from client_sdk import PushPreview
from storage.redis.push import RedisPushStore
from testkit.redis_cluster import RedisCluster
from tests.deployment import ClusterDeployment
from tests.helpers import WAIT_S, Peer, eventually, online_peer
from tests.push_distributor import Distributor
from tests.test_cluster_push import record
from tests.test_push_preview import (
    PUSH,
    client,
    recipient_opens_the_preview,
    register_away,
    sent_by_alice,
    sent_with_a_preview_to_drop,
)


def deployment(tmp_path: Path, redis_cluster: RedisCluster, **push: Any) -> ClusterDeployment:
    started = ClusterDeployment(tmp_path / "cluster", redis_cluster, {**PUSH, **push}, nodes=2).start()
    try:
        started.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    except BaseException:
        started.stop()
        raise
    return started


@pytest.fixture
def previews(tmp_path: Path, redis_cluster: RedisCluster) -> Iterator[ClusterDeployment]:
    # An interval short enough to wait for: the second wake-up waits queued until it has passed.
    running = deployment(tmp_path, redis_cluster, **{"push.include_preview": True, "push.min_interval_s": 6.0})
    yield running
    running.stop()


def opened(port: int, tmp_path: Path, body: bytes) -> PushPreview | None:
    phone = client(port, tmp_path, "bob")
    try:
        return phone.decrypt_preview(body)
    finally:
        phone.close()


def stored(redis_cluster: RedisCluster, prefix: str) -> str:
    """Everything under ``prefix`` in the cluster, keys and values, as one text."""
    host, port = redis_cluster.startup_nodes[0]
    r = redis.RedisCluster(host=host, port=port, decode_responses=True)
    try:
        out: list[str] = []
        for key in r.scan_iter(match=f"{prefix}*", target_nodes=redis.RedisCluster.PRIMARIES):
            kind = r.type(key)
            value: Any = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                          "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
                          "stream": r.xrange}[kind](key)
            out.append(f"{key} {value!r}")
        return "\n".join(out)
    finally:
        r.close()


def test_the_phone_on_one_node_opens_the_preview_of_a_message_sent_on_the_other(
        previews: ClusterDeployment, tmp_path: Path, distributor: Distributor) -> None:
    a, b = previews.nodes
    recipient_opens_the_preview(b.port, a.port, tmp_path, distributor)


def test_a_newer_preview_replaces_the_older_while_the_wake_up_waits(
        previews: ClusterDeployment, tmp_path: Path, distributor: Distributor, redis_cluster: RedisCluster) -> None:
    a, b = previews.nodes
    register_away(b.port, tmp_path, distributor)
    sent_by_alice(a.port, tmp_path, "first")
    [first] = distributor.wait(1)  # sent at once: the next waits for the interval (rule 3)
    sent_by_alice(a.port, tmp_path, "second")
    phone: dict[str, str] = {}  # the phone's push record in Redis (the queue call follows the 'sent' receipt)

    def queued(before: str | None) -> bool:
        phone.update(record(redis_cluster, previews.prefix, "bob.phone"))
        return "wake" in phone and phone.get("preview") not in (None, before)

    eventually(lambda: queued(None), what="queued with a preview")
    older = dict(phone)
    [_, fourth] = sent_by_alice(b.port, tmp_path, "third", "fourth")  # through the other node this time
    eventually(lambda: queued(older["preview"]), what="the preview replaced")
    assert phone["wake"] == older["wake"] and len(distributor.requests) == 1
    _, second = distributor.wait(2, timeout=20)
    for request, text in ((first, "first"), (second, "fourth")):
        shown = opened(b.port, tmp_path, request.body)
        assert shown is not None and shown.text == text
    assert shown.message_id == fourth
    eventually(lambda: "preview" not in record(redis_cluster, previews.prefix, "bob.phone"), what="dropped when sent")


def test_with_previews_off_nothing_of_a_preview_reaches_redis_or_the_payload(
        tmp_path: Path, redis_cluster: RedisCluster, distributor: Distributor, made: list[Peer]) -> None:
    off = deployment(tmp_path, redis_cluster, **{"push.include_preview": False})
    try:
        a, b = off.nodes
        register_away(b.port, tmp_path, distributor)
        distributor.answer(429, Retry_After="60")  # the wake-up stays queued in Redis
        mark = sent_with_a_preview_to_drop(a.port, made)
        [request] = distributor.wait(1)
        assert json.loads(request.body) == {"wake": 1}
        eventually(lambda: "wake" in record(redis_cluster, off.prefix, "bob.phone"), what="queued again")
        assert "preview" not in record(redis_cluster, off.prefix, "bob.phone")
        everything = stored(redis_cluster, off.prefix)
        assert "Zm9v" in everything and mark not in everything  # the message is there, not its preview
        assert "previews" not in online_peer(a.port, made, "alice", "tablet").request(
            "keys.list", {"user": "bob"})["result"]
    finally:
        off.stop()


class Failures:
    """The ``Supervisor`` of a ``ClusterPush`` whose round is not started: only failures are told."""

    def __init__(self) -> None:
        self.failed_with: list[BaseException] = []

    def spawn(self, task: str, one_round: Any) -> asyncio.Task[None]:
        raise AssertionError("the round is not started here")

    def failed(self, task: str, exc: BaseException) -> None:
        self.failed_with.append(exc)

    def succeeded(self, task: str) -> None:
        pass


async def test_previews_staged_while_a_queue_call_is_in_flight_leave_the_newest(redis_cluster: RedisCluster) -> None:
    """One queue call per device at a time (ClusterPush.staged): the newest preview of the messages
    staged meanwhile follows it, so none is lost and the newest is the one kept."""
    prefix = f"p{uuid.uuid4().hex[:10]}:"
    store = await RedisPushStore.open(redis_cluster.startup_nodes, prefix)
    supervisor = Failures()
    rules = PushRules(grace_ms=5_000, min_interval_ms=60_000, max_queue=1_000, retry_min_ms=1_000,
                      retry_max_ms=10_000, max_attempts=3, wake_ttl_ms=600_000)

    async def nowhere(client_ids: list[str]) -> dict[str, str]:
        return {}

    async def nothing(client_id: str) -> int:
        return 0

    push = ClusterPush(rules, store, {}, LinkRegistry(), nowhere, nothing, allow_loopback=True, concurrency=1,
                       clock=Clock(), supervisor=supervisor, include_preview=True)
    try:
        await store.register(PushTarget("unifiedpush", "http://127.0.0.1:1/up", "bob.phone"))
        for preview in ("p1", "p2", "p3"):  # one after another, without waiting: the first call is in flight
            push.staged("bob.phone", preview)
        deadline = time.monotonic() + WAIT_S
        while record(redis_cluster, prefix, "bob.phone").get("preview") != "p3":
            assert time.monotonic() < deadline, record(redis_cluster, prefix, "bob.phone")
            await asyncio.sleep(0.02)
        [taken], _ = await store.take(store.shard("bob.phone"), int(time.time() * 1000), 10, 60_000, "t")
        assert taken.wake.preview == "p3" and supervisor.failed_with == []
    finally:
        await push.close()
        await store.close()
