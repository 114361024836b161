"""The pure parts of observability: histogram buckets, the staging core's figures and counters,
the operator's HTTP app (served in-process on loopback), and the status view's parsing of a scrape."""

from __future__ import annotations

import json
import math

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from rich.console import Console

from bridge.counters import BridgeCounters, Histogram
from chatproto import ErrorItem, MsgItem, ResItem
from chatserver.config import build_settings
from chatserver.http import HttpServer, ops_app
from chatserver.status import DEFAULT_URL, Snapshot, render, url_from_settings
from tests.unit.test_staging import core, msg


def test_histogram_buckets_follow_prometheus_le() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and math.isclose(h.sum, 8.65)
    h.observe_many(0.5, 3)
    assert h.cumulative() == [("0.1", 2), ("1.0", 7), ("+Inf", 8)]
    assert h.count == 8 and math.isclose(h.sum, 10.15)


def test_downlink_counting_by_kind_and_error_code() -> None:
    c = BridgeCounters()
    for item in (MsgItem(1, "m1", "alice", "bob", "text", "x", 1), ErrorItem("too_large", "x"),
                 ResItem.failure("r1", "unknown_op", "x"), ResItem.success("r2", None)):
        c.count_downlink(item)
    assert c.downlink == {"msg": 1, "error": 1, "res": 2}
    assert c.errors == {"too_large": 1, "unknown_op": 1}


def test_figures_count_items_bytes_age_and_depths() -> None:
    s = core()
    s.submit("alice.phone", "alice", msg("m1", body="héllo"), 1_000, 0.0)  # bob has two devices, both offline
    s.submit("alice.phone", "alice", msg("m2", to="alice", body="abc"), 4_000, 0.0)
    s.device_online("carol.phone", 0.0)  # online, nothing queued
    f = s.figures()
    assert (f.items, f.messages, f.body_bytes) == (3, 2, len("héllo".encode()) + 3)
    assert f.oldest_ms == 1_000
    assert sorted(f.depths) == [1, 1, 1] and f.devices == 4, "depths of the devices with items; every device counted"
    s.expire(10**12, 0.0)  # bob's copies expire; alice.phone gets the ``expired`` receipts
    f = s.figures()
    assert (f.items, f.depths, f.devices) == (2, [2], 2)  # carol's box, alice's; bob's emptied offline ones went
    assert f.depths == [len(box.items) for box in s.boxes.values() if box.items]


def test_delivered_latency_and_redeliveries_are_counted_by_the_core() -> None:
    s = core()
    s.device_online("bob.phone", 0.0)
    out = s.submit("alice.phone", "alice", msg("m1"), 1_000, 0.0)
    s.redeliver(10.0)
    assert s.counters.redeliveries == 1
    s.ack("bob.phone", [out.deliveries[0][1].seq], 1_250, 10.1)
    latency = s.counters.delivered_latency
    assert latency.count == 1 and math.isclose(latency.sum, 0.25)
    assert s.figures().items == 1  # bob.laptop's copy; 'delivered' waits until the message is safe (its flush)
    batch = s.take_flush(20.0)
    assert batch is not None
    s.flush_done(batch)
    assert s.figures().items == 2  # ... and now alice's 'delivered' receipt too


async def test_ops_app_answers_and_closes_each_connection() -> None:
    registry = CollectorRegistry()
    Counter("chat_probe", "a counter", registry=registry).inc(3)
    problems: list[str] = []

    async def ready() -> list[str]:
        return problems

    server = HttpServer(ops_app(registry, ready), "127.0.0.1:0")
    await server.start()
    host, port = server.address
    base = f"http://{host}:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics") as r:
                assert r.status == 200 and "chat_probe_total 3.0" in await r.text()
                assert r.headers["Content-Type"].startswith("text/plain; version=")
                assert r.headers["Cache-Control"] == "no-store" and r.headers["Connection"] == "close"
            async with http.get(base + "/readyz?x=1") as r:
                assert (r.status, await r.text()) == (200, "ready\n")
            problems.append("store down")
            async with http.get(base + "/readyz") as r:
                assert (r.status, await r.text()) == (503, "not ready: store down\n")
            async with http.head(base + "/healthz") as r:
                assert r.status == 200 and await r.read() == b""
            async with http.post(base + "/metrics") as r:
                assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"
            async with http.get(base + "/nope") as r:
                assert r.status == 404
    finally:
        await server.close()


SCRAPE = """\
# TYPE chat_connections gauge
chat_connections{listener="tcp"} 2.0
# TYPE chat_uplink_total counter
chat_uplink_total{kind="out"} 10.0
# TYPE chat_sent_latency_seconds histogram
chat_sent_latency_seconds_bucket{le="0.01"} 5.0
chat_sent_latency_seconds_bucket{le="0.1"} 9.0
chat_sent_latency_seconds_bucket{le="+Inf"} 10.0
chat_sent_latency_seconds_count 10.0
chat_sent_latency_seconds_sum 0.5
"""


def test_snapshot_values_quantiles_and_rates() -> None:
    before = Snapshot.parse(SCRAPE, at=0.0)
    now = Snapshot.parse(SCRAPE.replace('kind="out"} 10.0', 'kind="out"} 30.0'), at=2.0)
    assert now.by("chat_connections", "listener") == {"tcp": 2.0}
    assert now.quantile("chat_sent_latency_seconds", 0.5) == 0.01
    assert now.quantile("chat_sent_latency_seconds", 0.9) == 0.1
    assert now.quantile("chat_sent_latency_seconds", 0.99) == math.inf
    assert now.quantile("chat_delivered_latency_seconds", 0.5) is None
    console = Console(width=100, record=True)
    console.print(render(now, before))
    text = console.export_text()
    assert "tcp 2" in text
    assert ["in", "out", "30", "10.0"] in [line.split() for line in text.splitlines()], text  # 20 in 2 s


def test_status_url_from_config() -> None:
    assert url_from_settings(build_settings({})) == DEFAULT_URL
    assert url_from_settings(build_settings({"metrics": {"bind": "0.0.0.0:9200"}})) == "http://127.0.0.1:9200/metrics"
    assert url_from_settings(build_settings({"metrics": {"bind": "[::1]:9200"}})) == "http://[::1]:9200/metrics"


def test_log_format_and_deprecated_json_lines() -> None:
    assert build_settings({"log": {"format": "json"}}).log.effective_format == "json"
    assert build_settings({"log": {"json_lines": True}}).log.effective_format == "json"
    assert build_settings({}).log.effective_format == "text"
    json.dumps(build_settings({"metrics": {"bind": "127.0.0.1:9100"}}).model_dump())
