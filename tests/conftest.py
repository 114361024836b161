from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from testkit.packets import RawClient
from testkit.redis_cluster import RedisCluster
from testkit.s3_server import S3Server
from tests.deployment import start_broker
from tests.helpers import BrokerThread, Peer
from tests.push_distributor import Distributor


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module with ``DEPLOYMENTS = ("single", "cluster", "amqtt-path")`` runs each test that uses the
    ``deployment`` fixture (the ``broker`` fixture does) on each: one process on SQLite, three
    cluster nodes on a Redis Cluster behind HAProxy (both with chat sessions on the lean path, pinned,
    as is the default), and one process with ``mqtt.lean_sessions`` off (every client on amqtt; tests/deployment.py);
    ``lean-ws``: the lean path with a ws listener, the test's paho Peers over WebSocket
    (broker/lean_ws.py)."""
    deployments = getattr(metafunc.module, "DEPLOYMENTS", None)
    if deployments and "deployment" in metafunc.fixturenames:
        metafunc.parametrize("deployment", deployments, indirect=True)


@pytest.fixture
def deployment(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "single"))


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest, deployment: str) -> Iterator[BrokerThread]:
    """A running ChatBroker on 127.0.0.1:<free port> with users alice, bob and mallory
    (settings from a ``@pytest.mark.broker_config({...})`` on the test, if any); in the
    ``cluster`` deployment, three nodes behind HAProxy (tests/deployment.py) with the same face."""
    marker = request.node.get_closest_marker("broker_config")
    overrides = marker.args[0] if marker else None
    running = start_broker(deployment, tmp_path, request, overrides)
    for name in ("alice", "bob", "mallory"):
        running.add_user(name, f"{name}-pw")
    yield running
    running.stop()


@pytest.fixture
def peers(broker: BrokerThread) -> Iterator[list[Peer]]:
    """Collects Peers made by a test and closes them afterwards."""
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """Collects clients (anything with ``close()``) made by a test and closes them afterwards."""
    clients: list[Any] = []
    yield clients
    if clients:  # at once: a client whose broker is gone waits out a reconnect delay to stop (~0.6 s each)
        with ThreadPoolExecutor(max_workers=min(32, len(clients))) as pool:
            list(pool.map(lambda client: client.close(), clients))


@pytest.fixture
def distributor() -> Iterator[Distributor]:
    """A UnifiedPush distributor on 127.0.0.1 (tests/push_distributor.py), for the push tests."""
    running = Distributor().start()
    yield running
    running.stop()


@pytest.fixture
def raws() -> Iterator[list[RawClient]]:
    """Collects raw MQTT connections made by a test and closes them afterwards."""
    made: list[RawClient] = []
    yield made
    for raw in made:
        raw.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster (3 masters, 3 replicas) on loopback, started once per session (~7 s) on
    first use. A test that kills a node restarts it before it ends, so the next finds it whole."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A local S3 API server (moto, testkit/s3_server.py), started once per session on first use;
    each test makes a bucket of its own."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
