"""The data folder is private (0700, files 0600, whatever the umask) and serves one broker at a time.

Proves: a broker and ``chat-broker user add`` on a fresh folder create it 0700 and every file
(databases, their -wal/-shm, server.key, the lock) 0600 under umask 022 and 000; a folder of an
older version (0755, 0644 files) is made private at start, with a log line; a second
``chat-broker run`` on a folder in use exits non-zero with one line naming the holder's pid,
while the user commands keep working against the running broker; after a stop (or a crash)
the folder can be used again.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatserver.data_dir import DataDirInUseError
from tests.helpers import BrokerThread, Peer
from tests.test_cli import broker_process, cli, login, one_line_error

UMASK_SH = ("sh", "-c", 'umask "$0" && exec "$@"')


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """Name -> permission bits of the folder (".") and every file in it."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    found.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()})
    return found


def assert_private(folder: Path) -> None:
    found = modes(folder)
    wrong = {name: oct(mode) for name, mode in found.items() if mode != (0o700 if name == "." else 0o600)}
    assert not wrong, f"not private: {wrong} (all: {found})"


def test_the_broker_creates_a_private_data_folder(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "data"
    broker = BrokerThread(data).start()
    try:
        broker.add_user("alice", "alice-pw")
        alice = Peer(broker.port, "alice", "alice-pw")
        try:
            assert alice.connect() == 0  # a login writes users.db (its WAL) and the token key
            assert alice.subscribe() == [1]
            alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "hi"})  # bob is unknown: an error item
            alice.items()
        finally:
            alice.close()
        names = set(modes(data))
        assert {"users.db", "users.db-wal", "users.db-shm", "staging.db", "staging.db-wal", "server.key",
                "broker.lock"} <= names, names
        assert_private(data)
    finally:
        broker.stop()
    assert_private(data)


def test_user_add_creates_a_private_data_folder(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "fresh" / "data"
    added = cli("user", "add", "bob", "--password-stdin", "--data-dir", str(data), cwd=tmp_path, stdin="bob-pw\n",
                prefix=(*UMASK_SH, f"{umask:03o}"))
    assert added.returncode == 0, added.stderr
    assert "users.db" in modes(data)
    assert_private(data)
    assert stat.S_IMODE(data.parent.stat().st_mode) == 0o777 & ~umask  # parents are the operator's own


def test_an_older_wide_open_folder_is_made_private_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    assert cli("user", "add", "cy", "--password-stdin", "--data-dir", str(data), cwd=tmp_path,
               stdin="cy-pw\n").returncode == 0
    data.chmod(0o755)  # as an older version left it under umask 022
    for path in data.iterdir():
        path.chmod(0o644)
    caplog.set_level(logging.INFO, logger="chatserver.data_dir")
    broker = BrokerThread(data).start()
    try:
        assert_private(data)
        lines = [r.getMessage() for r in caplog.records if r.name == "chatserver.data_dir"]
        assert len(lines) == 1 and "made private" in lines[0] and "users.db" in lines[0], lines
    finally:
        broker.stop()


def test_a_second_broker_on_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with broker_process("--bind", "127.0.0.1:0", "--data-dir", str(data), cwd=tmp_path) as running:
        second = cli("run", "--bind", "127.0.0.1:0", "--data-dir", str(data), cwd=tmp_path)
        line = one_line_error(second)
        assert f"pid {running.proc.pid}" in line and str(data) in line, line
        assert "ready" not in second.stdout
        # The user commands do not take the broker's lock: they keep working while it runs.
        added = cli("user", "add", "dee", "--password-stdin", "--data-dir", str(data), cwd=tmp_path,
                    stdin="dee-pw\n")
        assert added.returncode == 0, added.stderr
        assert login(running.port, "dee", "dee-pw") == 0
        assert running.stop() == 0
    # Released at stop: the next broker starts.
    with broker_process("--bind", "127.0.0.1:0", "--data-dir", str(data), cwd=tmp_path) as again:
        assert login(again.port, "dee", "dee-pw") == 0
        assert again.stop() == 0


def test_a_second_broker_in_one_process_is_refused_and_the_first_keeps_serving(tmp_path: Path) -> None:
    first = BrokerThread(tmp_path / "data").start()
    second = BrokerThread(tmp_path / "data")
    try:
        with pytest.raises(DataDirInUseError, match=f"pid {os.getpid()}"):
            second.start()
        first.add_user("eve", "eve-pw")
        assert login(first.port, "eve", "eve-pw") == 0
    finally:
        second.stop()
        first.stop()
