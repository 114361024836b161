"""The presence store: last seen times, privacy settings and contact lists.

``PresenceService`` is typed against this Protocol; ``storage/`` implements it
(``storage/sqlite/presence.py``). ``last_seen`` is written in batches by the
service (never per heartbeat); privacy settings and contacts are written by the
request that changes them, before it is answered. A failing backend raises
``bridge.store.StoreError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class PresenceSnapshot:
    last_seen: list[tuple[str, int]]
    settings: list[tuple[str, str]]
    contacts: list[tuple[str, str]]


class PresenceStore(Protocol):
    async def load(self) -> PresenceSnapshot: ...

    async def save_last_seen(self, rows: list[tuple[str, int]]) -> None:
        """Write ``(user, ms)`` rows in one transaction, never moving a time backwards;
        raises StoreError (nothing written)."""

    async def set_privacy(self, user: str, setting: str) -> None: ...

    async def add_contacts(self, owner: str, users: list[str]) -> None: ...

    async def remove_contacts(self, owner: str, users: list[str]) -> None: ...

    async def close(self) -> None: ...
