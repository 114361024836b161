"""/healthz and /readyz through the real broker: ready while it serves; not ready (HTTP 503) when the
staging store cannot be written (its directory on a small tmpfs that the test fills) or a listener
stops accepting; ready again once fixed. Bad requests to the listener get HTTP errors, not a crash."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BrokerThread, eventually
from tests.observe import base_url, get

TMPFS_SIZE = "8m"


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[bool]:
    """Mount a small tmpfs at ``path``; yields False (and mounts nothing) where mounting is not allowed."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                          capture_output=True, check=False)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full."""
    filler = directory / "filler"
    # Unbuffered: a buffered file keeps the bytes a full disk refused and fails again on close
    # (it did once the data directory held one more database: groups.db).
    with filler.open("wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        with contextlib.suppress(OSError):
            os.fsync(out.fileno())
    return filler


def ready(broker: BrokerThread) -> tuple[int, str]:
    return get(base_url(broker) + "/readyz")


@pytest.mark.parametrize("how", ["disk full", "write lock held"])
def test_health_and_readiness_follow_the_store(tmp_path: Path, how: str) -> None:
    """Two genuine ways for SQLite writes to fail: no space left (a full tmpfs), and another
    connection holding the write lock (every write then waits past the readiness deadline)."""
    with small_tmpfs(tmp_path / "disk") as mounted:
        if how == "disk full" and not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the write-lock case still runs")
        broker = BrokerThread(tmp_path / "disk" / "data", {"metrics.bind": "127.0.0.1:0"}).start()
        try:
            assert get(base_url(broker) + "/healthz") == (200, "ok\n")
            assert ready(broker) == (200, "ready\n")
            if how == "disk full":
                filler = fill(tmp_path / "disk")
                release = filler.unlink
                reason = ("the staging store cannot be written (probe: database or disk is full "
                          "(the file system of the data directory is full: free space there")
            else:
                lock = sqlite3.connect(tmp_path / "disk" / "data" / "staging.db", isolation_level=None)
                lock.execute("BEGIN EXCLUSIVE")
                release = lock.close
                reason = "a write to the staging store has been waiting for "
            eventually(lambda: ready(broker)[0] == 503, what="not ready while the store cannot be written")
            status, body = ready(broker)
            assert status == 503 and body.startswith(f"not ready: {reason}"), body
            assert get(base_url(broker) + "/healthz") == (200, "ok\n")  # the process is still up
            release()
            eventually(lambda: ready(broker) == (200, "ready\n"), what="ready again once fixed")
        finally:
            broker.stop()


def test_a_closed_listener_makes_the_broker_not_ready(tmp_path: Path) -> None:
    broker = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    try:
        assert ready(broker)[0] == 200
        broker.call(_close_listener(broker, "tcp"))
        assert ready(broker) == (503, "not ready: listener tcp is not accepting\n")
    finally:
        broker.stop()


async def _close_listener(broker: BrokerThread, name: str) -> None:
    broker.app.broker._servers[name].instance.close()  # simulates a listener that died


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"GET /healthz HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 requires Host (RFC 9112 section 3.2)
    (b"garbage\r\n\r\n", b"400"),
    (b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n", b"400"),
])
def test_bad_requests_get_http_errors(tmp_path: Path, raw: bytes, status: bytes) -> None:
    broker = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    try:
        with socket.create_connection(broker.address("metrics"), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.split(b" ")[1] == status, reply
        assert get(base_url(broker) + "/healthz") == (200, "ok\n")  # the listener still serves
    finally:
        broker.stop()
