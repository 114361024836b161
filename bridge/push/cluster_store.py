"""What push keeps in cluster mode (``storage/redis/push.py`` implements it on the Redis Cluster).

One process loads every registration at start (``bridge/push/store.py``); a node of a cluster must
not: it holds in memory only the registrations of the devices connected to it, and asks the store
about any other device when something happens to it. Each device has at most one record: its
registration, its gone mark, its queued wake-up (with why it was queued and the lease of the node
sending it, and the newest preview when previews are on), and the time before which no new wake-up
is due (rule 3). Queued wake-ups are indexed by due time in ``SHARDS`` shards that every node
sweeps; taking a wake-up leases it to the taker, so exactly one node sends it, and one that died
with it leased leaves it to the next sweep after the lease. Each operation is atomic. A failing
backend raises ``bridge.store.StoreError``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget


class Why(enum.StrEnum):
    # Rule 1: a message staged while the device was connected nowhere (or rule 2 for one that left
    # since): not sent if the device is connected somewhere when the wake-up is taken.
    STAGED = "staged"
    GRACE = "grace"  # rule 2: a delivery the device's connection did not ack within the grace: sent


class Queued(enum.StrEnum):
    QUEUED = "queued"
    KEPT = "kept"  # nothing to do: the device has no registration, or a wake-up queued already (rule 4)
    FULL = "full"  # the queue's shard is full (rule 5): dropped


@dataclass(frozen=True, slots=True)
class Arrival:
    """What the store says of a device that connected (its queued wake-up is dropped: rule 4)."""

    target: PushTarget | None  # its registration
    gone: bool  # its token was reported dead: tell it (the mark is cleared)
    held: bool  # woken since its last ack: its next ack ends the interval (rule 3)


@dataclass(frozen=True, slots=True)
class Taken:
    """A wake-up due, leased to this node by ``take``: sent, then settled with the lease."""

    wake: QueuedWake
    target: PushTarget
    why: Why
    lease: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """What becomes of a taken wake-up: ``sent`` (no new one due before ``hold_until_ms``), ``gone``
    (the registration dropped and the device marked, unless it registered again since), else
    ``again`` queued (a retry), or dropped (None). A lease no longer the taker's changes nothing
    but ``gone``: the device connected or unregistered meanwhile."""

    sent: bool = False
    hold_until_ms: int = 0
    gone: bool = False
    again: QueuedWake | None = None


class ClusterPushStore(Protocol):
    shards: int

    def shard(self, client_id: str) -> int:
        """The shard of the device's queued wake-up (stable across processes)."""

    async def register(self, target: PushTarget) -> None:
        """Store (or replace) the device's registration; clears its gone mark."""

    async def unregister(self, client_id: str) -> bool:
        """Drop everything of the device; True if it had a registration."""

    async def online(self, client_id: str) -> Arrival:
        """The device connected: drop its queued wake-up and gone mark, say what it had."""

    async def acked(self, client_id: str) -> None:
        """The device acked since a wake-up: the next one is due at once (rule 3)."""

    async def registrations(self, client_ids: list[str]) -> dict[str, PushTarget]:
        """The registrations of those devices that have one (``keys.list``'s preview keys)."""

    async def queue(self, wake: QueuedWake, why: Why, max_per_shard: int) -> tuple[Queued, QueuedWake | None]:
        """Queue ``wake`` (due now) if the device is registered and has none queued, due no sooner
        than its interval allows (rule 3: ``due_ms`` and ``expires_ms`` move by the same); a
        ``GRACE`` finding one queued marks it ``GRACE``. Returns the wake-up as queued. Its
        ``preview``, if any, replaces the queued wake-up's (rule 8; also one being sent: its retry
        carries it); ``take`` hands out the newest, and it goes with the wake-up."""

    async def take(self, shard: int, now_ms: int, limit: int, lease_ms: int, lease: str) -> tuple[list[Taken], int]:
        """Up to ``limit`` wake-ups of the shard due by ``now_ms`` (also those whose lease ran out),
        leased for ``lease_ms`` under ``lease``; and how many wake-ups the shard holds."""

    async def settle(self, taken: Taken, settlement: Settlement) -> None: ...
