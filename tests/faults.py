"""A fault injected into the real staging store's group commit, for the supervision tests.

``install()`` wraps ``SqliteMessageStore.commit``: a commit raises ``RuntimeError``
(not a ``StoreError``: what a bug or unencodable text raises) while ``ARMED`` is
set, or whenever its batch holds a message whose body contains ``POISON``; with
``HANG`` set, the next commit waits until it is cancelled. In a
subprocess broker it is installed by the ``sitecustomize`` that ``sitecustomize_dir``
writes (Python imports it at start-up from ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from bridge.messaging.records import FlushBatch
from storage.sqlite.messages import SqliteMessageStore

POISON = "POISON-BODY"
ARMED = threading.Event()
HANG = threading.Event()
"""While set, a commit never ends (a disk that hangs), until its task is cancelled."""


def install() -> Any:
    """Wrap the class's commit; returns the original (for monkeypatch-free restoring)."""
    original = SqliteMessageStore.commit

    async def commit(self: SqliteMessageStore, batch: FlushBatch) -> None:
        if HANG.is_set():
            HANG.clear()  # the next commit (at shutdown) works
            await asyncio.Event().wait()
        if ARMED.is_set() or any(POISON in (m.body or "") for m in batch.bodies):
            raise RuntimeError("injected commit fault")
        await original(self, batch)

    SqliteMessageStore.commit = commit  # type: ignore[method-assign]
    return original


def sitecustomize_dir(where: Path) -> Path:
    """A directory for ``PYTHONPATH`` whose ``sitecustomize`` installs the fault."""
    where.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    (where / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(root)!r})\nimport tests.faults\ntests.faults.install()\n")
    return where
