"""``chat-broker cluster status``: the live broker nodes and the Redis Cluster under them.

Read from Redis only (a read-only ``RedisNodeBus``, ``node_id=""``): the nodes whose lease runs,
with the connections each last reported, and ``CLUSTER NODES`` (masters, replicas, their slots
and state). ``parse_topology``, ``render`` and ``as_json`` are pure; ``gather`` does the I/O.
Queues: how many device queues hold items, from the queue store's expiry index (64 reads, never a
scan of the queues); the store keeps no item total, and each node's ``/metrics`` has its own figures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Group
from rich.table import Table

from bridge.cluster.nodes import NodeInfo
from chatserver.config import ClusterSettings
from chatserver.status import kv_table

WAITING_NOTE = ("device queues holding items, from the expiry index (an entry can outlive its items until the "
                "next sweep); item totals: each node's /metrics")


@dataclass(frozen=True, slots=True)
class RedisNode:
    address: str
    role: str  # "master" or "replica"
    state: str  # "ok", "fail" (the cluster agrees it is down), "fail?" (this node thinks so), "disconnected"
    slots: tuple[tuple[int, int], ...]
    master: str | None  # a replica's master (address)


@dataclass(frozen=True, slots=True)
class ClusterView:
    nodes: list[NodeInfo]
    redis: list[RedisNode]
    at_ms: int
    queues_waiting: int


def _state(info: Mapping[str, Any]) -> str:
    flags = str(info.get("flags", "")).split(",")
    if "fail" in flags:
        return "fail"
    if "fail?" in flags:
        return "fail?"
    return "ok" if info.get("connected", True) else "disconnected"


def parse_topology(raw: Mapping[str, Mapping[str, Any]]) -> list[RedisNode]:
    """redis-py's ``CLUSTER NODES`` (address -> fields) -> each master (by first slot) then its replicas."""
    by_id = {str(info["node_id"]): address.split("@")[0] for address, info in raw.items()}
    nodes = []
    for address, info in raw.items():
        flags = str(info.get("flags", "")).split(",")
        slots = tuple((int(r[0]), int(r[-1])) for r in info.get("slots", []) if r and str(r[0]).isdigit())
        master = by_id.get(str(info.get("master_id", "-")))
        role = "master" if "master" in flags else "replica"
        nodes.append(RedisNode(address.split("@")[0], role, _state(info), slots, master if role == "replica" else None))

    def first_slot(node: RedisNode) -> int:
        return node.slots[0][0] if node.slots else 1 << 16

    masters = sorted((n for n in nodes if n.role == "master"), key=lambda n: (first_slot(n), n.address))
    ordered: list[RedisNode] = []
    for primary in masters:
        ordered += [primary, *sorted((n for n in nodes if n.master == primary.address), key=lambda n: n.address)]
    return ordered + [n for n in nodes if n not in ordered]  # replicas of an unknown master


def _slots(slots: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in slots) or "-"


def render(view: ClusterView, source: str = "") -> Group:
    nodes = Table(title=f"Broker nodes {source}".strip(), title_justify="left", box=None, padding=(0, 2))
    for column in ("node", "connections", "lease left", "up"):
        nodes.add_column(column, justify="left" if column == "node" else "right")
    for node in view.nodes:
        up_s = max(0, view.at_ms - node.started_ms) // 1000
        nodes.add_row(node.node_id, f"{node.connections:,}", f"{node.lease_left_ms / 1000:.1f} s",
                      f"{up_s // 3600}h{up_s % 3600 // 60:02d}m{up_s % 60:02d}s")
    redis = Table(title="Redis Cluster", title_justify="left", box=None, padding=(0, 2))
    for column in ("address", "role", "slots", "state"):
        redis.add_column(column)
    for server in view.redis:
        role = server.role if server.master is None else f"replica of {server.master}"
        redis.add_row(server.address, role, _slots(server.slots), server.state)
    masters = [n for n in view.redis if n.role == "master" and n.slots]
    covered = sum(b - a + 1 for n in masters for a, b in n.slots)
    summary = kv_table("Totals", [
        ("broker nodes", f"{len(view.nodes):,}"),
        ("connections", f"{sum(n.connections for n in view.nodes):,}"),
        ("redis masters / replicas", f"{len(masters)} / {sum(1 for n in view.redis if n.role == 'replica')}"),
        ("slots served", f"{covered:,} of 16,384"),
        ("queues with items", f"{view.queues_waiting:,}"),
    ])
    return Group(summary, "", nodes, "", redis)


def as_json(view: ClusterView) -> dict[str, Any]:
    return {
        "at_ms": view.at_ms,
        "nodes": [asdict(node) for node in view.nodes],
        "connections": sum(node.connections for node in view.nodes),
        "redis": [{**asdict(server), "slots": [list(r) for r in server.slots]} for server in view.redis],
        "queues_waiting": view.queues_waiting,
        "queues_waiting_note": WAITING_NOTE,
    }


async def gather(cluster: ClusterSettings) -> ClusterView:
    """Read the view from the cluster (raises ``StoreError`` if Redis cannot be reached)."""
    from storage.redis.nodes import RedisNodeBus  # noqa: PLC0415 (redis-py only for this command)
    from storage.redis.queues import RedisQueueStore  # noqa: PLC0415

    bus = await RedisNodeBus.connect(cluster.startup_nodes, cluster.key_prefix, node_id="",
                                     lease_s=cluster.lease_s, retry_s=cluster.retry_s)
    try:
        nodes = await bus.nodes()
        raw = await bus.command("cluster nodes", "CLUSTER NODES")
    finally:
        await bus.close()
    queues = await RedisQueueStore.open(cluster.startup_nodes, cluster.key_prefix, cluster.retry_s)
    try:
        waiting = await queues.waiting()
    finally:
        await queues.close()
    return ClusterView(nodes, parse_topology(raw), int(time.time() * 1000), waiting)
