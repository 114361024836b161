"""HAProxy in front of broker processes (testkit/haproxy.py, the template of deploy/haproxy.cfg), and
the deploy/ configurations checked by haproxy and nginx themselves.

The brokers here are plain SQLite processes, one data folder each: what is tested is the gateway
(connections pass through over TCP and WebSocket, /readyz health checks take a stopped node out,
new connections go to the live one), not cluster routing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.haproxy import DEPLOY, HAProxy, render
from tests.helpers import BrokerProcess, Peer, online_peer

REPO = Path(__file__).resolve().parents[1]
DOWN_WITHIN_S = 5.0  # inter 500 ms x fall 2 = ~1 s measured (docs/TESTING.md); bounded generously on a busy box
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def broker(root: Path, name: str) -> BrokerProcess:
    process = BrokerProcess(root / name, {"metrics.bind": "127.0.0.1:0", "listeners.ws.bind": "127.0.0.1:0"})
    process.start()
    process.add_users(PASSWORDS)
    return process


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    made: list[BrokerProcess] = []
    try:
        made += [broker(tmp_path, "a"), broker(tmp_path, "b")]
        yield made
    finally:
        for process in made:
            if process.proc is not None and process.proc.poll() is None:
                process.stop()


def backend(process: BrokerProcess) -> tuple[int, int, int]:
    return process.port, process.ports["metrics"], process.ports["ws"]


def test_deploy_config_is_the_template_and_haproxy_accepts_it() -> None:
    deploy = REPO / "deploy" / "haproxy.cfg"
    assert deploy.read_text() == render(DEPLOY), "run: python -m testkit.haproxy > deploy/haproxy.cfg"
    assert shutil.which("haproxy") is not None, "scripts/test installs haproxy"
    check = subprocess.run(["haproxy", "-c", "-f", str(deploy)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    generated = subprocess.run([sys.executable, "-m", "testkit.haproxy"], capture_output=True, text=True,
                               check=True, cwd=REPO)
    assert generated.stdout == deploy.read_text()


NGINX_STREAM = Path("/etc/nginx/modules-enabled")  # deploy/nginx.conf loads the stream module from here, as Debian does


@pytest.mark.skipif(shutil.which("nginx") is None or not any(NGINX_STREAM.glob("*stream*")),
                    reason="nginx with its stream module is not installed (optional: apt-get install nginx "
                           "libnginx-mod-stream)")
def test_nginx_accepts_the_deploy_config(tmp_path: Path) -> None:
    check = subprocess.run(["nginx", "-t", "-c", str(REPO / "deploy" / "nginx.conf"), "-e", "stderr",
                            "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_messages_pass_through_haproxy_over_tcp_and_websocket(tmp_path: Path,
                                                              brokers: list[BrokerProcess]) -> None:
    gateway = HAProxy(tmp_path / "haproxy", [backend(brokers[0])]).start()  # one backend: both users meet there
    peers: list[Peer] = []
    try:
        gateway.wait_state("node0", "UP")
        bob = online_peer(gateway.port, peers, "bob")
        alice = Peer(gateway.ws_port, "alice", "alice-pw", transport="websockets")
        peers.append(alice)
        assert alice.connect() == 0
        alice.subscribe()
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": "hello through haproxy"})
        assert alice.expect(lambda item: item.get("kind") == "receipt" and item.get("status") == "sent")
        item = bob.expect(lambda item: item.get("kind") == "msg")
        assert (item["from"], item["body"]) == ("alice", "hello through haproxy")
    finally:
        for peer in peers:
            peer.close()
        gateway.stop()


def test_a_stopped_node_is_marked_down_and_new_connections_go_to_the_live_one(
        tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    gateway = HAProxy(tmp_path / "haproxy", [backend(process) for process in brokers]).start()
    peers: list[Peer] = []
    try:
        gateway.wait_state("node0", "UP")
        gateway.wait_state("node1", "UP")
        brokers[0].stop()
        took = gateway.wait_state("node0", "DOWN")
        assert took < DOWN_WITHIN_S
        assert gateway.backend_state() == {"node0": "DOWN", "node1": "UP"}
        for _ in range(4):  # leastconn would pick node0 for some of these, were it not DOWN
            online_peer(gateway.port, peers, "alice", device=f"d{len(peers)}")
    finally:
        for peer in peers:
            peer.close()
        gateway.stop()
