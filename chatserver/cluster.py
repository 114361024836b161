"""Cluster mode's stores: one Redis Cluster client shared by every Redis store of a node, and the
node's bus (its lease, its device directory entries, its nudge channel).

``BrokerApp`` (chatserver/app.py) opens a ``ClusterStores`` instead of the SQLite files when the
config has a ``cluster:`` section, and builds the cluster services over it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from chatserver.binds import parse_bind
from chatserver.config import ClusterSettings
from storage.redis.client import RedisStore, cluster_client
from storage.redis.group_log import RedisGroupLog
from storage.redis.keys import RedisKeyStore
from storage.redis.media import RedisMediaStore
from storage.redis.nodes import RedisNodeBus
from storage.redis.presence import RedisPresenceStore
from storage.redis.push import RedisPushStore
from storage.redis.queues import MAX_DEDUP, RedisQueueStore
from storage.redis.users import RedisUserStore

log = logging.getLogger(__name__)


def startup_nodes(cluster: ClusterSettings) -> list[tuple[str, int]]:
    return [parse_bind(node) for node in cluster.redis]


@dataclass
class ClusterStores:
    client: RedisCluster
    users: RedisUserStore
    keys: RedisKeyStore
    queues: RedisQueueStore
    presence: RedisPresenceStore
    bus: RedisNodeBus
    groups: RedisGroupLog
    push: RedisPushStore
    media: RedisMediaStore

    @classmethod
    async def open(cls, cluster: ClusterSettings, node_id: str, max_dedup: int = MAX_DEDUP) -> ClusterStores:
        """``max_dedup``: dedup marks kept per recipient user (``dedup.max_entries``)."""
        nodes = startup_nodes(cluster)
        client = cluster_client(nodes, cluster.wait_timeout_ms)
        try:
            users = RedisUserStore(client, cluster.key_prefix, cluster.retry_s)
            await users.call("connect", client.initialize)
            bus = await RedisNodeBus.connect(nodes, cluster.key_prefix, node_id, cluster.lease_s, cluster.retry_s)
        except BaseException:
            await client.aclose()
            raise
        stores = cls(client, users, RedisKeyStore(client, cluster.key_prefix, cluster.retry_s,
                                                   min_replicas_ack=cluster.min_replicas_ack,
                                                   wait_timeout_ms=cluster.wait_timeout_ms),
                     RedisQueueStore(client, cluster.key_prefix, cluster.retry_s,
                                     min_replicas_ack=cluster.min_replicas_ack,
                                     wait_timeout_ms=cluster.wait_timeout_ms, max_dedup=max_dedup),
                     RedisPresenceStore(client, cluster.key_prefix, cluster.retry_s), bus,
                     RedisGroupLog(client, cluster.key_prefix, cluster.retry_s,
                                   min_replicas_ack=cluster.min_replicas_ack,
                                   wait_timeout_ms=cluster.wait_timeout_ms, max_dedup=max_dedup),
                     RedisPushStore(client, cluster.key_prefix, cluster.retry_s),
                     RedisMediaStore(client, cluster.key_prefix, cluster.retry_s))
        log.info("cluster: node %s on the Redis Cluster at %s", node_id, ", ".join(cluster.redis))
        return stores

    @property
    def probe_store(self) -> RedisStore:
        return self.users

    async def close(self) -> None:
        """Give up the lease and directory entries first (the others stop nudging us), then the client."""
        try:
            await self.bus.close()
            await self.queues.flush()
        finally:
            await self.client.aclose()
