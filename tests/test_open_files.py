"""The broker's open-file limit (chatserver/open_files.py): the rule, and ``chat-broker run`` started
under a soft limit of 128 holding 600 connections, or warning when the hard limit is short."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

import pytest

from chatserver.open_files import RESERVED, UNLIMITED_WANTS, plan
from tests.helpers import Peer
from tests.test_cli import broker_process, cli, ping

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(("soft", "hard", "listeners", "expected"), [
    (1024, 524_288, [100_000], 100_000 + RESERVED),  # raised to what the listeners need, no further
    (1024, 20_000, [100_000], 20_000),  # as far as the hard limit allows
    (1024, INF, [100_000, 500], 100_500 + RESERVED),  # no hard limit: what is needed
    (1024, 524_288, [0], 524_288),  # an unlimited listener: the hard limit
    (200_000, 524_288, [1_000], 200_000),  # never lowered
    (INF, INF, [1_000], INF),
])
def test_the_soft_limit_rises_to_what_the_listeners_need(soft: int, hard: int, listeners: list[int],
                                                         expected: int) -> None:
    assert plan(soft, hard, listeners).soft == expected


def test_a_short_hard_limit_says_how_many_connections_fit() -> None:
    short = plan(1024, 20_000, [100_000])
    assert short.short and short.fit == 20_000 - RESERVED and short.wanted == 100_000 + RESERVED
    assert not plan(1024, 524_288, [100_000]).short
    assert plan(1024, INF, [0]).wanted == UNLIMITED_WANTS + RESERVED
    assert not plan(INF, INF, [1_000]).short, "no limit is never short (RLIM_INFINITY is -1)"


HELD = 600


def test_run_under_a_soft_limit_of_128_holds_600_connections(tmp_path: Path) -> None:
    assert cli("user", "add", "alice", "--password-stdin", cwd=tmp_path, stdin="alice-pw\n").returncode == 0
    config = tmp_path / "broker.yaml"
    config.write_text("listeners:\n  tcp:\n    max_connections: 1000\n"
                      "limits:\n  max_unauthenticated_per_address: 1000\n")
    with broker_process("-c", str(config), "--bind", "127.0.0.1:0", cwd=tmp_path,
                        prefix=("prlimit", "--nofile=128:4096")) as running:
        held = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(HELD)]
        try:
            alice = Peer(running.port, "alice", "alice-pw")
            try:
                assert alice.connect() == 0, "accepted after 600 others: no EMFILE"
                ping(alice)
            finally:
                alice.close()
            for conn in held[-5:]:  # the last ones were accepted too: none reset or closed
                conn.settimeout(0.05)
                with pytest.raises(TimeoutError):
                    conn.recv(1)
        finally:
            for conn in held:
                conn.close()
        assert running.stop() == 0
    log = running.log.read_text()
    assert f"open files: limit raised from 128 to {1000 + RESERVED}" in log
    assert "EMFILE" not in log and "Too many open files" not in log


def test_run_with_a_short_hard_limit_warns_what_to_do(tmp_path: Path) -> None:
    with broker_process("--bind", "127.0.0.1:0", cwd=tmp_path, prefix=("prlimit", "--nofile=128:1000")) as running:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "open files: limit raised from 128 to 1000" in log
    assert (f"open files: the limit of 1000 leaves room for about {1000 - RESERVED} connections, fewer than "
            "listeners.*.max_connections allow (100000): raise the hard limit") in log
