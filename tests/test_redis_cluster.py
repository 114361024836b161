"""The Redis Cluster fixture (testkit/redis_cluster.py) does what fault tests rely on: writes acknowledged
by a replica (``WAIT 1``) survive SIGKILL of their master, whose replica takes over its slots, and the
killed node comes back as a replica (so the session's cluster is whole for the next test)."""

from __future__ import annotations

import asyncio

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from testkit.redis_cluster import RedisCluster


async def set_acknowledged(client: ClusterClient, key: str, value: str) -> int:
    """SET, then WAIT on the key's master: how many replicas have it. WAIT counts the writes of its
    own connection; one task writing in turn uses one connection per node, so that is this SET's."""
    await client.set(key, value)
    return int(await client.execute_command("WAIT", 1, 2000, target_nodes=client.get_node_from_key(key)))


async def test_acknowledged_writes_survive_a_master_killed(redis_cluster: RedisCluster) -> None:
    client = ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.startup_nodes],
                           decode_responses=True)
    try:
        keys = [f"{{user{n}}}:k" for n in range(30)]
        assert len({redis_cluster.master_of(redis_cluster.slot(k)).port for k in keys}) == 3, "every master"
        for key in keys:
            assert await set_acknowledged(client, key, f"v-{key}") == 1
        victim = keys[0]
        killed = redis_cluster.kill_master(victim)
        try:
            promoted = await asyncio.to_thread(redis_cluster.wait_promoted, victim, killed)
            assert promoted.port != killed.port and promoted.alive
            assert [await client.get(key) for key in keys] == [f"v-{key}" for key in keys]
        finally:
            await asyncio.to_thread(redis_cluster.restart, killed)
        assert redis_cluster.master_of(redis_cluster.slot(victim)).port == promoted.port, "back as a replica"
        assert await set_acknowledged(client, victim, "after") == 1, "the promoted master has its replica again"
    finally:
        await client.aclose()
