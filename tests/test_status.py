"""``chat-broker status`` against a running broker: it shows the figures of a real chat (connections,
traffic, staged items) read from the metrics endpoint, finds the URL from the config file, refreshes
with --watch, and fails with one clear line and a non-zero exit when the endpoint is unreachable."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, BrokerThread, Peer, free_port
from tests.observe import base_url


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatserver", "status", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[BrokerThread]:
    broker = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    alice, bob = Peer(broker.port, "alice", "alice-pw"), Peer(broker.port, "bob", "bob-pw")
    try:
        assert alice.connect() == 0 and alice.subscribe() == [1]
        assert bob.connect() == 0
        bob.close()  # a known device, offline: what alice sends stays staged
        for i in range(2):
            alice.publish("u/alice/out", {"id": f"m{i}", "to": "bob", "body": "x" * 10})
            assert alice.items()["status"] == "sent"
        yield broker
    finally:
        alice.close()
        broker.stop()


def test_status_shows_the_chat(running: BrokerThread) -> None:
    done = status("--url", base_url(running) + "/metrics")
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    assert ["connections", "tcp", "1"] in table
    assert ["devices", "online", "1"] in table
    assert ["logins", "ok", "/", "refused", "2", "/", "0"] in table
    assert ["in", "out", "2", "-"] in table
    assert ["out", "receipt", "2", "-"] in table  # two 'sent'
    assert ["staged", "items", "2"] in table
    assert ["staged", "bytes", "20"] in table
    assert ["longest", "device", "queue", "2"] in table


def test_status_finds_the_url_in_the_config_and_watches(running: BrokerThread, tmp_path: Path) -> None:
    host, port = running.address("metrics")
    config = tmp_path / "ops.yaml"
    config.write_text(json.dumps({"metrics": {"bind": f"{host}:{port}"}}))
    done = status("-c", str(config), "--watch", "--interval", "0.1", "--count", "2")
    assert done.returncode == 0, done.stderr
    assert "staged items" in done.stdout
    per_second = [row for row in rows(done.stdout) if row[:2] == ["in", "out"]]
    assert per_second and per_second[-1][3] != "-", done.stdout  # a rate once two scrapes are known


def test_status_without_a_broker_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    done = status("--url", url)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"chat-broker: error: cannot read {url}: ")
    assert lines[0].endswith("is the broker running with metrics.bind set?")
