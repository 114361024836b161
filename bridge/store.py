"""What every store of the bridge shares: the one error a store raises when its storage fails.

Each feature's store Protocol (``bridge/{messaging,presence,keys}/store.py``) is
implemented in ``storage/``; an implementation maps its backend's errors (a full
disk, a read-only database) to ``StoreError`` with ``raise StoreError(...) from exc``,
so the services above it never see SQLite's (or Redis's) exception types.
"""

from __future__ import annotations


class StoreError(Exception):
    """A database could not be opened, migrated, read or written; the message says which and why."""


class NotReplicated(StoreError):
    """The write is on the master, but fewer replicas than asked for acknowledged it in time: it
    may still be lost in a failover. ``result`` is what the write answered (the store's own form)."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class UserExistsError(StoreError):
    """Adding a user whose name is taken."""
