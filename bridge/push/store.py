"""What the push service keeps: each device's registration (stored with the device, removed with
it), the devices whose token the provider reported gone, and the queue of wake-ups not sent yet
(so that those due at a crash go out after the restart). ``storage/sqlite/push.py`` implements it.
A failing backend raises ``bridge.store.StoreError``.
"""

from __future__ import annotations

from typing import Protocol

from bridge.push.core import QueuedWake
from bridge.push.provider import PushTarget


class PushStore(Protocol):
    async def register(self, target: PushTarget, now_ms: int) -> None:
        """Store (or replace) the device's registration; clears its gone mark."""

    async def unregister(self, client_id: str) -> bool:
        """Drop the device's registration, its queued wake-up and its gone mark; True if it had a registration."""

    async def mark_gone(self, client_id: str) -> None:
        """The provider reported the token dead: drop the registration and queued wake-up, set the mark."""

    async def clear_gone(self, client_id: str) -> None:
        """The device was told to register again."""

    async def save_wakes(self, wakes: list[QueuedWake]) -> None:
        """Store (or replace, by device) queued wake-ups, in one transaction."""

    async def delete_wakes(self, client_ids: list[str]) -> None: ...

    async def load(self) -> tuple[list[PushTarget], list[QueuedWake], list[str]]:
        """Every registration, queued wake-up and gone mark (at start)."""

    async def close(self) -> None: ...
