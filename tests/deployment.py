"""A cluster deployment for the tests: broker nodes in cluster mode on one Redis Cluster, behind
HAProxy -- the face of ``BrokerThread`` (``port``, ``add_user(s)``, ``stop``), so the same tests
run against one process on SQLite and against a cluster (``DEPLOYMENTS`` in a test module).

Each node is a ``BrokerThread`` (its own event loop and thread) with its own node id; all share a
key prefix of their own on the session's Redis Cluster, so deployments never see each other's keys.
Clients connect through HAProxy (``leastconn``: consecutive connections land on different nodes).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from testkit.haproxy import HAProxy
from testkit.redis_cluster import RedisCluster
from tests.helpers import WEBSOCKET_FOR, BrokerThread, Peer, online_peer

NODES = 3


class ClusterDeployment:
    def __init__(self, root: Path, redis: RedisCluster, overrides: dict[str, Any] | None = None,
                 nodes: int = NODES) -> None:
        self.root = root
        self.prefix = f"d{uuid.uuid4().hex[:10]}:"
        base = {"cluster.redis": [f"127.0.0.1:{port}" for _, port in redis.startup_nodes],
                "cluster.key_prefix": self.prefix, "cluster.lease_s": 3.0, "metrics.bind": "127.0.0.1:0",
                **(overrides or {})}
        self.nodes = [BrokerThread(root / f"node{n}", {**base, "cluster.node_id": f"node{n}"}) for n in range(nodes)]
        self.haproxy: HAProxy | None = None

    def start(self) -> ClusterDeployment:
        try:
            for node in self.nodes:
                node.start()
            backends = [(node.port, node.address("metrics")[1]) for node in self.nodes]
            self.haproxy = HAProxy(self.root / "haproxy", backends).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def port(self) -> int:
        """Where clients connect: HAProxy's MQTT frontend."""
        assert self.haproxy is not None, "not started"
        return self.haproxy.port

    @property
    def app(self) -> Any:
        """The first node's app (a test reading one node's internals)."""
        return self.nodes[0].app

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return self.nodes[0].call(coro, timeout)

    def peer(self, n: int, made: list[Peer], user: str, device: str = "phone") -> Peer:
        """``user``'s device connected straight to node ``n`` and subscribed (password ``{user}-pw``)."""
        return online_peer(self.nodes[n].port, made, user, device)

    def add_user(self, name: str, password: str) -> None:
        self.nodes[0].add_user(name, password)

    def add_users(self, passwords: dict[str, str]) -> None:
        for name, password in passwords.items():
            self.add_user(name, password)

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
            self.haproxy = None
        errors = []
        for node in self.nodes:
            try:
                if node.loop.is_running():
                    node.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


def start_broker(deployment: str, root: Path, request: pytest.FixtureRequest,
                 overrides: dict[str, Any] | None = None) -> Any:
    """A started ``BrokerThread`` (``single``: chat sessions on the lean path (pinned, as is the default);
    ``amqtt-path``: ``mqtt.lean_sessions`` off, every client on amqtt; ``lean-ws``: the lean path with a ws
    listener, the tests' Peers over WebSocket) or ``ClusterDeployment`` (``cluster``) under ``root``."""
    if deployment == "cluster":
        return ClusterDeployment(root / "cluster", request.getfixturevalue("redis_cluster"),
                                 settings_of(deployment, overrides)).start()
    broker = BrokerThread(root / "data", settings_of(deployment, overrides)).start()
    if deployment == "lean-ws":  # the tests' Peers connect over WebSocket (helpers.WEBSOCKET_FOR)
        tcp = broker.port
        WEBSOCKET_FOR[tcp] = broker.address("ws")[1]
        request.addfinalizer(lambda: WEBSOCKET_FOR.pop(tcp, None))
    return broker


def settings_of(deployment: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides of a deployment (``single``, ``cluster`` and ``lean-ws`` (a ws listener, the Peers
    on it) on the lean path, ``amqtt-path`` on amqtt's), plus ``overrides``."""
    path = {"mqtt.lean_sessions": deployment != "amqtt-path"}  # pinned both ways, whatever the default
    ws = {"listeners.ws.bind": "127.0.0.1:0"} if deployment == "lean-ws" else {}
    return {**path, **ws, **(overrides or {})}
