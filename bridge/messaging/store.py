"""The messaging store: where staged items wait, as per-device queue operations.

``Messaging`` (the service) is typed against these Protocols; ``storage/``
implements them (``storage/sqlite/messages.py``; the Redis Cluster store will sit
beside it). Bodies are stored once per message; each target device has its own
item row (which holds that device's ciphertext of an olm message). A failing
backend raises ``bridge.store.StoreError``.
"""

from __future__ import annotations

from typing import Protocol

from bridge.messaging.group_receipts import TrackedRow
from bridge.messaging.records import FlushBatch, Item, StagedMessage


class MessageStore(Protocol):
    async def next_boot(self) -> int:
        """A number larger than every earlier call's, across restarts."""

    async def load(self, now_ms: int) -> tuple[list[StagedMessage], list[Item], list[tuple[str, str, int]]]:
        """Staged messages (bodies not loaded), items in (device, seq) order, remembered ids."""

    async def commit(self, batch: FlushBatch) -> None:
        """Write one batch atomically; raises StoreError (nothing written) on failure."""

    async def group_gseqs(self) -> dict[str, int]:
        """Each group's highest staged gseq, as the commits wrote it (``FlushBatch.gseqs``)."""

    async def bodies(self, mids: list[int]) -> dict[int, str]: ...

    async def item_bodies(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The olm ciphertexts of the items (device, seq) that have one."""

    async def prune(self, now_ms: int) -> None:
        """Forget remembered ids that expired."""

    async def checkpoint(self) -> None:
        """Make deletions durable and leave no deleted body behind (SQLite: fold and truncate the WAL)."""

    async def close(self) -> None: ...


class GroupReceiptStore(Protocol):
    """Where group receipts wait until complete (bridge/messaging/group_receipts.py). Their writes come
    with the staging commit, ``FlushBatch.receipts``: the store that implements this writes them in
    ``MessageStore.commit``'s transaction, so a member's mark is on disk exactly when the ack or
    seen report that made it is (storage/sqlite/group_receipts.py)."""

    async def group_receipts(self) -> list[TrackedRow]:
        """The tracked group messages with their members' marks, in creation order (expired ones too:
        the staging core forgets those at once, ``GroupStaging.restore_receipts``)."""


class UserLookup(Protocol):
    """The user directory, as messaging needs it (the users store implements it)."""

    async def user_devices(self, name: str) -> list[str] | None:
        """Device ids of ``name`` (possibly none); None if there is no such user."""
