"""The data folder: private to the broker's user, and used by one broker at a time.

It holds password hashes, token digests, the token key and staged messages:
the folder is 0700 and every file in it 0600, whatever the umask (files are
created with ``os.open(..., 0o600)``; SQLite gives its ``-wal``/``-shm``/
``-journal`` files the mode of their database file). ``BrokerLock`` is an
exclusive ``flock`` on ``broker.lock`` held while a broker runs; the
``chat-broker user ...`` commands never take it (SQLite serialises their writes).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from bridge.store import StoreError
from storage.sqlite.db import DIR_MODE, FILE_MODE, ensure_private_dir, explain

log = logging.getLogger(__name__)

LOCK_FILE = "broker.lock"


def make_private(path: Path) -> list[str]:
    """Make the folder 0700 and every file directly in it 0600; return the names that were wider.

    A folder made by an older version (umask 022: 0755 and 0644 files) is fixed at start.
    """
    changed: list[str] = []
    try:
        if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
            path.chmod(DIR_MODE)
            changed.append(".")
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False) and stat.S_IMODE(entry.stat().st_mode) != FILE_MODE:
                os.chmod(entry.path, FILE_MODE)
                changed.append(entry.name)
    except OSError as exc:  # e.g. files of another user: say so, start no broker on a readable folder
        raise StoreError(f"cannot make the data folder {path} private: {exc}") from exc
    if changed:
        log.warning("data folder %s: made private (folder 0700, files 0600): %s", path, ", ".join(sorted(changed)))
    return changed


class DataDirInUseError(StoreError):
    """Another broker runs on this data folder."""


class BrokerLock:
    """``acquire(data_dir)`` or raise DataDirInUseError naming the holder's pid; ``release()``."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> BrokerLock:
        path = data_dir / LOCK_FILE
        try:
            ensure_private_dir(data_dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {path}: {explain(exc, data_dir)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUseError(
                f"data folder {data_dir.resolve()} is in use by another broker (pid {holder}): "
                "stop it first, or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
