"""Cluster presence, the pure part: what the shared store holds of a user, the store Protocol the
cluster presence service (bridge/cluster/presence.py) is typed against, the lease arithmetic, and
the re-reads a node owes the users it mirrors.

The model (docs/ARCHITECTURE.md, "Cluster presence"):
- per user, the shared store holds ``last_seen``, the privacy setting, the contacts, and a
  *foreground lease* per node that holds a foreground device of the user; a node writes its lease
  when the user's first local foreground device starts (and ``last_seen``), removes it when the
  last one ends, and renews it at most once per half window while the user stays in the
  foreground (``Leases``), never per heartbeat;
- a lease is written ``1.5 * online_window`` ahead and renewed every half window, so it always
  lasts at least as long as the device's own window: a reader on another node never sees a
  live device run out early. A node that dies leaves leases that run out at most one window
  after its devices' windows would have;
- a node records its *interest* in each user it mirrors (a lease of its own per user, renewed on
  each periodic re-read); a node that changes what a user's watchers may see (a lease written or
  removed, a privacy or contact change) nudges every interested node, which re-reads the user.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from bridge.presence.core import View, visible
from bridge.presence.store import PresenceStore
from chatproto import PRIVACY_CONTACTS


@dataclass(frozen=True, slots=True)
class SharedState:
    """What the shared store holds of one user. ``version`` grows with every write, so a node can
    tell an older read that arrives late from a newer one."""

    version: int = 0
    last_seen: int | None = None
    setting: str = PRIVACY_CONTACTS
    contacts: frozenset[str] = frozenset()
    leases: Mapping[str, int] | None = None  # node id -> its foreground lease (ms)

    def online_until(self, now: int, other_than: str = "") -> int | None:
        """The last running foreground lease (of a node other than ``other_than``), or None."""
        running = [until for node, until in (self.leases or {}).items() if node != other_than and until > now]
        return max(running) if running else None

    def shown_to(self, viewer: str, viewer_state: SharedState, owner: str, online: bool) -> View:
        """Rule 4 of bridge/presence/core.py on this state, ``online`` decided by the caller."""
        return visible(viewer, owner, self.setting, self.contacts, viewer_state.setting, viewer_state.contacts,
                       online, self.last_seen)


class SharedPresenceStore(PresenceStore, Protocol):
    """``PresenceStore`` plus the per-user operations of cluster mode (storage/redis/presence.py).
    Each touches one user's keys only; ``now`` and the leases are in ms of the nodes' clocks."""

    async def look(self, user: str, node: str, interest_until: int) -> SharedState:
        """``node`` wants to hear of ``user`` until ``interest_until`` (0: a plain read); the user's
        state, read in the same step (a change after it nudges ``node``)."""

    async def drop_interest(self, user: str, node: str) -> None: ...

    async def interested(self, user: str, now: int) -> list[str]:
        """The nodes whose interest in ``user`` runs past ``now``."""

    async def put_foreground(self, user: str, node: str, lease: int, last_seen: int | None,
                             now: int) -> tuple[bool, list[str]]:
        """``node`` holds a foreground device of ``user`` until ``lease`` (0: none any more), and
        ``last_seen`` moves forward to the given time; returns whether ``node``'s lease was still
        running before, and ``interested(user, now)``."""

    async def change_contacts(self, owner: str, users: list[str], add: bool,
                              limit: int | None) -> tuple[int, int] | None:
        """Add (or remove) ``users`` to ``owner``'s contacts: (how many changed, how many contacts
        now), or None (nothing added) if adding would go over ``limit``."""


@dataclass(frozen=True, slots=True)
class Leases:
    """The lease arithmetic for an online window of ``window_ms``."""

    window_ms: int

    @property
    def renew_ms(self) -> int:
        """How often a node renews the leases of its users that heartbeated since the last time."""
        return self.window_ms // 2

    def until(self, now: int) -> int:
        """The lease written at ``now``: it outlasts every window a heartbeat before the next renewal
        (at most ``renew_ms`` later) can open."""
        return now + self.window_ms + self.renew_ms


class Rechecks:
    """When a node must read a mirrored user again: when the user's last running foreground lease
    elsewhere runs out (renewed by then, or the node holding it is gone). One heap entry per user,
    re-armed lazily like the core's expiry heap."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._at: dict[str, int] = {}

    def arm(self, user: str, at: int) -> None:
        known = self._at.get(user)
        self._at[user] = at
        if known is None or at < known:
            heapq.heappush(self._heap, (at, user))

    def drop(self, user: str) -> None:
        self._at.pop(user, None)

    def next(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: int) -> list[str]:
        users: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            at, user = heapq.heappop(self._heap)
            armed = self._at.get(user)
            if armed is None or armed < at:
                continue  # dropped, or an earlier entry of it fired already
            if armed > at:
                heapq.heappush(self._heap, (armed, user))  # moved later: wait for that
                continue
            del self._at[user]
            users.append(user)
        return users

    def __len__(self) -> int:
        return len(self._at)
