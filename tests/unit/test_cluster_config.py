"""The ``cluster:`` section, the ``--workers`` checks and the workers' pure parts (chatserver/workers.py)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from broker.streams import start_server
from chatserver.config import ConfigError, build_settings, parse_redis_nodes, resolve_node_id
from chatserver.workers import RestartPolicy, check_workers, ready_fields, reserve_port, worker_overrides
from storage.redis.client import RETRY_S


def cluster(**fields: Any) -> dict[str, Any]:
    return {"cluster": {"redis": ["127.0.0.1:7000"], **fields}}


def test_cluster_is_absent_by_default_and_takes_its_defaults() -> None:
    assert build_settings({}).cluster is None
    section = build_settings(cluster()).cluster
    assert section is not None
    assert (section.node_id, section.key_prefix, section.lease_s, section.min_replicas_ack) == (None, "", 10.0, 1)
    assert section.retry_s == RETRY_S  # one default, the stores'
    assert section.startup_nodes == [("127.0.0.1", 7000)]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"redis": []}, "cluster.redis: List should have at least 1 item"),
    ({"redis": ["nope"]}, "cluster.redis: 'nope' is not HOST:PORT"),
    ({"node_id": "a b"}, "cluster.node_id: 'a b': 1 to 64 letters"),
    ({"node_id": "x" * 65}, "cluster.node_id:"),
    ({"key_prefix": "t{1}"}, "cluster.key_prefix: 't{1}': letters"),
    ({"min_replicas_ack": -1}, "cluster.min_replicas_ack: Input should be greater than or equal to 0"),
    ({"wait_timeout_ms": 0}, "cluster.wait_timeout_ms:"),
    ({"lease_s": 0}, "cluster.lease_s:"),
    ({"retry_s": -1.0}, "cluster.retry_s:"),
    ({"typo": 1}, "cluster.typo: unknown key"),
])
def test_bad_cluster_values_name_the_key(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(cluster(**fields))
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "nodes"), [
    ("redis://10.0.0.1:7000", ["10.0.0.1:7000"]),
    ("redis://a:1,b:2", ["a:1", "b:2"]),
    ("a:1, b:2", ["a:1", "b:2"]),
    ("[::1]:7000", ["[::1]:7000"]),
])
def test_cluster_flag_forms(text: str, nodes: list[str]) -> None:
    assert parse_redis_nodes(text) == nodes


@pytest.mark.parametrize("text", ["", "redis://", "a:1,", "rediss://a:1", "a", "a:99999"])
def test_bad_cluster_flags(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_redis_nodes(text)


def test_node_id_defaults_to_host_and_port_or_a_token() -> None:
    section = build_settings(cluster()).cluster
    assert section is not None
    assert resolve_node_id(section, "0.0.0.0:1883", "broker7.example.org", "abc") == "broker7-1883"
    assert resolve_node_id(section, "127.0.0.1:0", "h", "abc") == "h-abc"
    assert resolve_node_id(section, None, "we ird{}", "abc") == "we-ird---abc"
    named = build_settings(cluster(node_id="n1")).cluster
    assert named is not None and resolve_node_id(named, "0.0.0.0:1883", "h", "abc") == "n1"


def test_workers_need_cluster_mode() -> None:
    with pytest.raises(ConfigError, match=r"needs cluster mode.*one SQLite file, one writer.*--cluster"):
        check_workers(build_settings({}), 2)
    check_workers(build_settings({}), 1)
    check_workers(build_settings(cluster()), 4)
    with pytest.raises(ConfigError, match="must be 1 or more"):
        check_workers(build_settings(cluster()), 0)
    with pytest.raises(ConfigError, match="longer than 64 characters"):
        check_workers(build_settings(cluster(node_id="n" * 63)), 2)
    with pytest.raises(ConfigError, match=r"listeners\.ws\.bind: port 0 with --workers"):
        check_workers(build_settings({**cluster(), "listeners": {"ws": {"bind": "127.0.0.1:0"}}}), 2)


def test_worker_overrides() -> None:
    settings = build_settings({**cluster(node_id="n"), "metrics": {"bind": "0.0.0.0:9100"}})
    assert worker_overrides(settings, 2) == {
        "listeners.reuse_port": True, "cluster.node_id": "n-2", "metrics.bind": "0.0.0.0:9102"}
    settings = build_settings({**cluster(node_id="n"), "metrics": {"bind": "[::1]:0"}})
    assert "metrics.bind" not in worker_overrides(settings, 1)  # port 0 stays 0: each worker picks its own
    with pytest.raises(ConfigError):
        worker_overrides(build_settings({}), 0)


def test_restart_policy_backs_off_then_gives_up() -> None:
    policy = RestartPolicy(max_deaths=3, window_s=60.0, backoff_s=(1.0, 5.0))
    assert policy.delay([100.0], 100.0) == 1.0
    assert policy.delay([100.0, 110.0], 110.0) == 5.0
    assert policy.delay([100.0, 110.0, 120.0], 120.0) is None  # 3 within a minute
    assert policy.delay([0.0, 10.0, 120.0], 120.0) == 1.0  # the old ones are forgotten
    assert policy.delay([50.0, 70.0, 120.0], 120.0) == 5.0


def test_ready_fields() -> None:
    line = "chat-broker ready: tcp=127.0.0.1:1883 metrics=[::1]:9100 node=n-0 data_dir=/var/x"
    assert ready_fields(line) == {"tcp": "127.0.0.1:1883", "metrics": "[::1]:9100", "node": "n-0",
                                  "data_dir": "/var/x"}


async def test_reuse_port_lets_two_listeners_share_a_port() -> None:
    held, port = reserve_port("127.0.0.1")  # bound, never listening: the port is ours meanwhile
    try:
        accepted: list[int] = []
        all_in = asyncio.Event()

        def on_client(which: int) -> Any:
            def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                accepted.append(which)
                writer.close()
                if len(accepted) == 20:
                    all_in.set()
            return connected

        first = await start_server(on_client(1), "127.0.0.1", port, reuse_port=True)
        second = await start_server(on_client(2), "127.0.0.1", port, reuse_port=True)
        with pytest.raises(OSError):  # without SO_REUSEPORT the port is taken
            await start_server(on_client(3), "127.0.0.1", port)
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        await asyncio.wait_for(all_in.wait(), 5)
        assert set(accepted) <= {1, 2}
        first.close()
        second.close()
    finally:
        held.close()


def test_reserve_port_keeps_others_off() -> None:
    held, port = reserve_port("127.0.0.1")
    with held, socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
