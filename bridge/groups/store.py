"""Storing groups: ``GroupStore``, implemented by storage/sqlite/groups.py and storage/redis/groups.py.

The store holds each group as the core's ``Group`` (bridge/groups/core.py) and changes it only by
compare-and-set on its gseq (``commit``), so two changes of one group never interleave: the loser
loads again and decides again (``apply``). A message takes its gseq from the same counter
(``next_gseq``), atomically with reading who the members are at that gseq: one order of messages and
membership events for every member. A failing backend raises ``bridge.store.StoreError``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from bridge.groups.core import Decision, Group
from bridge.store import StoreError
from chatproto import GroupItem

APPLY_ATTEMPTS: Final = 32
"""Loads and commits of one change before it gives up: each retry means another change (or a
message's gseq) landed in between. A retry first waits a random time up to 1, 2, 4 ... 64 ms, so
that many changes racing on one group (an admin script, several admins) take turns instead of
colliding again (24 at once need 5-10 rounds)."""
MAX_BACKOFF_S: Final = 0.064


class GroupStore(Protocol):
    async def load(self, group: str) -> Group | None:
        """The group as stored (members in join order), or None if there is none of that id."""

    async def commit(self, before: Group | None, after: Group | None, max_groups_per_user: int) -> bool:
        """Replace ``before`` by ``after`` if the stored group is still ``before`` (the same gseq; None:
        no group of that id yet, a create); False, nothing written, if it is not. ``after`` None deletes
        the group. Raises ``GroupRefused.too_many_groups`` (nothing of the group written) if a user
        ``after`` adds is in ``max_groups_per_user`` groups already."""

    async def next_gseq(self, group: str, sender: str) -> tuple[int, list[str]] | None:
        """Take the group's next gseq for a message of ``sender``, with the members at that gseq (in join
        order); None, nothing taken, if ``sender`` is not a member (or there is no such group)."""

    async def is_member(self, group: str, user: str) -> bool: ...

    async def groups_of(self, user: str) -> list[str]:
        """The ids of the groups ``user`` is a member of, sorted."""

    async def close(self) -> None: ...


class LoggedGroupStore(GroupStore, Protocol):
    """A ``GroupStore`` that keeps each change's events with it, in the change's own transaction, until they
    are staged (the outbox of one process on SQLite, bridge/groups/service.py): a crash between the commit and
    the staging write loses no event."""

    async def commit_logged(self, before: Group | None, decision: Decision, max_groups_per_user: int) -> bool:
        """``commit(before, decision.after, ...)`` and, in the same transaction, ``decision``'s events with
        the users who get them (``decision.notify``)."""

    async def logged(self) -> list[tuple[GroupItem, tuple[str, ...]]]:
        """The logged events (seq 0) with the users who get them, per group in gseq order."""

    async def forget_logged(self, staged: dict[str, int]) -> None:
        """Drop the logged events of each group up to its gseq in ``staged`` (written to the staging store)."""


async def apply(store: GroupStore, group: str, decide: Callable[[Group | None], Decision],
                max_groups_per_user: int,
                commit: Callable[[Group | None, Decision], Awaitable[bool]] | None = None) -> Decision:
    """Load ``group``, ``decide`` what a request does to it (the core, which may raise a refusal) and
    commit that, again from a fresh load while another change wins the compare-and-set. A decision
    without events changes nothing and is not written. ``commit`` replaces ``store.commit`` (cluster
    mode's commit with the change's events, bridge/cluster/groups.py)."""
    for attempt in range(APPLY_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, min(MAX_BACKOFF_S, 0.001 * 2**attempt)))  # noqa: S311 (jitter, not a secret)
        before = await store.load(group)
        decision = decide(before)
        if not decision.events or await (commit(before, decision) if commit is not None else
                                         store.commit(before, decision.after, max_groups_per_user)):
            return decision
    raise StoreError(f"group {group}: changed by others {APPLY_ATTEMPTS} times during one change; try again")
