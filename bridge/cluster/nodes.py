"""How the broker nodes of one cluster find each other's devices and wake each other.

``ClusterMessaging`` and presence are typed against ``NodeBus``; ``storage/redis/nodes.py``
implements it on the Redis Cluster:
- a node is alive while its lease (renewed every ``lease_s / 3``) has not run out; a node that
  dies (SIGKILL, cut off from Redis) is forgotten by the others once its lease ends;
- a device -> node directory says where each device is connected (an entry of a dead node counts
  as no entry);
- a nudge goes to one node over sharded pub/sub (``SPUBLISH`` to the node's channel). It carries
  ids only and may be lost: it only makes the node look sooner at what is in the store. A node whose
  channel was lost (a failover of its master) gets a RESYNC from its own bus once it is subscribed
  again, and also reads the queues of its devices every ``cluster.poll_s``: a lost nudge delays,
  never loses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class NudgeKind(StrEnum):
    ITEMS = "items"  # new items in the queue of ``target`` (a client id): read it
    TAKEOVER = "takeover"  # ``target`` (a client id) connected to ``origin``: close your connection of it
    PRESENCE = "presence"  # the presence of ``target`` (a user) changed: tell your watchers of it
    CLOSE = "close"  # ``target`` (a client id) was removed (``devices.remove``): close its connection
    RESYNC = "resync"  # from this node's own bus: its channel was lost a while, nudges may be lost: look again


@dataclass(frozen=True, slots=True)
class Nudge:
    kind: NudgeKind
    target: str
    origin: str  # the node that sent it


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    connections: int  # devices this node holds, as it last reported them
    lease_left_ms: int
    started_ms: int


class NodeBus(Protocol):
    @property
    def node_id(self) -> str: ...

    async def start(self, on_nudge: Callable[[Nudge], None]) -> None:
        """Take this node's lease (refused with ``StoreError`` if a live node has this id), subscribe
        to its channel, and keep both alive in the background until ``close``."""

    async def register(self, client_id: str) -> str | None:
        """The device is connected here now; returns the live node that had it before (not this
        one), which the caller tells to drop its connection, or None."""

    async def unregister(self, client_id: str) -> None:
        """The device left this node (only its entry for this node is removed)."""

    async def locate(self, client_ids: list[str]) -> dict[str, str]:
        """Client id -> live node holding it, for those connected anywhere."""

    async def send(self, node_id: str, nudge: Nudge) -> None:
        """Publish ``nudge`` to ``node_id``'s channel (best effort: never raises for a lost one)."""

    def report(self, connections: int) -> None:
        """The number of devices connected here, published with the next lease renewal."""

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes of the cluster (``chat-broker cluster status``)."""

    async def close(self) -> None:
        """Give up the lease and the directory entries of this node, and stop."""
