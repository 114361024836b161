"""Prometheus metrics of one broker, computed when scraped (docs/OPERATIONS.md lists each).

The hot path only bumps plain ints (``broker.counters``, ``bridge.counters``);
``ChatCollector.collect`` reads them, and the staging core's ``figures()``,
at scrape time, on the broker's event loop (``chatserver.http`` serves it there),
so a scrape sees one consistent moment and needs no locks. Each ``BrokerApp``
has its own ``CollectorRegistry``: several brokers can run in one process.
Labels are small fixed sets; nothing per user (queue depth is a histogram).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bridge.background import cancel
from bridge.counters import LATENCY_BUCKETS, BridgeCounters, Histogram
from bridge.links import LinkRegistry
from bridge.media.service import MediaService
from bridge.messaging.records import Figures
from bridge.push.cluster import ClusterPush
from bridge.push.service import PushService
from broker.auth import Authenticator
from broker.counters import LOGIN_RESULTS
from broker.server import ChatBroker
from chatproto import UPLINKS, ErrorCode
from chatserver.supervisor import TASKS, Supervisor

DEPTH_BUCKETS = (0, 1, 10, 100, 1000, 10000, 100000)
DOWNLINK_KINDS = ("msg", "receipt", "group", "presence", "res", "error")
UPLINK_KINDS = (*sorted(UPLINKS), "forbidden", "generic")
ERROR_CODES = tuple(sorted(v for k, v in vars(ErrorCode).items() if k.isupper()))
LAG_INTERVAL_S = 0.5


class LoopLag:
    """Measures event-loop lag: how late a timer of ``interval`` fires. Start on the broker's loop."""

    def __init__(self, interval: float = LAG_INTERVAL_S) -> None:
        self.interval = interval
        self.histogram = Histogram(LATENCY_BUCKETS)
        self.last = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor) -> None:
        self._task = supervisor.spawn("loop_lag", self._measure)

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(self.interval)
        self.last = max(0.0, loop.time() - before - self.interval)
        self.histogram.observe(self.last)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel([self._task])
            self._task = None


class StagingFigures(Protocol):
    """What the collector reads of staging: the single-node core, or a cluster node's messaging."""

    @property
    def counters(self) -> BridgeCounters: ...

    def figures(self) -> Figures: ...


@dataclass(frozen=True)
class Sources:
    """Where the figures come from; the collector only reads them."""

    broker: ChatBroker
    auth: Authenticator
    staging: StagingFigures
    links: LinkRegistry
    lag: LoopLag
    supervisor: Supervisor
    clock_ms: Callable[[], int]  # wall-clock ms, as message timestamps
    node_id: str = ""  # cluster mode: this node's id ("" for one process on SQLite)
    push: PushService | ClusterPush | None = None  # push.enabled
    media: MediaService | None = None  # media.bind


class ChatCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self._s = sources

    def collect(self) -> Iterator[Metric]:
        s = self._s
        node = InfoMetricFamily("chat_node", "Which broker this is: its cluster node id and mode (join other series "
                                "on the scrape's instance to label them by node).")
        node.add_metric([], {"node": s.node_id, "mode": "cluster" if s.node_id else "single"})
        yield node
        yield from self._connections()
        yield _counter("chat_logins", "Login attempts, by result (ok, anonymous, or why refused).", "result",
                       LOGIN_RESULTS, s.auth.logins)
        yield _counter("chat_uplink", "Publishes received, by uplink kind (forbidden: a topic the client may not use).",
                       "kind", UPLINK_KINDS, s.broker.counters.uplink)
        counters = s.staging.counters
        yield _counter("chat_downlink", "Items sent to devices, by kind.", "kind", DOWNLINK_KINDS, counters.downlink)
        yield _counter("chat_errors", "error items and failed res items sent to devices, by code.", "code",
                       ERROR_CODES, counters.errors)
        yield CounterMetricFamily("chat_redeliveries", "Items sent again after delivery.redeliver_after_s unacked.",
                                  counters.redeliveries)
        yield CounterMetricFamily("chat_receipts_coalesced", "Pending seen receipts merged into a newer one "
                                  "for the same device and peer.", counters.receipts_coalesced)
        yield CounterMetricFamily("chat_group_skipped", "Member devices a group message was not staged for "
                                  "(their queue was full).", counters.group_skipped)
        yield CounterMetricFamily("chat_downlink_dropped", "Items not sent to a connection that left "
                                  "limits.max_unacked_downlinks deliveries without PUBACK, or that does not read "
                                  "while over limits.max_unread_downlink_bytes wait for it (staged ones come again).",
                                  s.broker.counters.downlink_dropped)
        yield _histogram("chat_sent_latency_seconds", "Staging of a message -> its receipt 'sent'.",
                         counters.sent_latency)
        yield _histogram("chat_delivered_latency_seconds",
                         "Staging of a message -> first ack by a device of the recipient.", counters.delivered_latency)
        yield from self._staged()
        if s.node_id:
            yield from _writeback(counters.writeback)
        yield _histogram("chat_store_commit_seconds", "Duration of a staging group commit.", counters.commit_seconds)
        yield _histogram("chat_store_commit_rows", "Item rows written + deleted per group commit.",
                         counters.commit_rows)
        yield CounterMetricFamily("chat_store_commit_failures", "Group commits that failed (retried).",
                                  counters.commit_failures)
        yield _counter("chat_background_failures", "Rounds of a background task that failed unexpectedly "
                       "(logged with a traceback; /readyz is 503 until the task works again).", "task", TASKS,
                       s.supervisor.failures)
        yield _histogram("chat_event_loop_lag_seconds", f"How late a {s.lag.interval}s timer fires on the broker loop.",
                         s.lag.histogram)
        yield GaugeMetricFamily("chat_event_loop_lag_last_seconds", "The last event-loop lag measured.", s.lag.last)
        if s.push is not None:
            yield from _push(s.push)
        if s.media is not None:
            yield from _media(s.media)

    def _connections(self) -> Iterable[Metric]:
        broker = self._s.broker
        open_now = GaugeMetricFamily("chat_connections", "Open connections, by listener.", labels=["listener"])
        for name, count in sorted(broker.open_connections().items()):
            open_now.add_metric([name], count)
        yield open_now
        yield _counter("chat_connections_accepted", "Connections accepted, by listener.", "listener",
                       sorted(broker.open_connections()), broker.counters.accepted)
        yield CounterMetricFamily("chat_connections_refused_unauthenticated", "Connections closed at once: their "
                                  "address had limits.max_unauthenticated_per_address connections not logged in.",
                                  broker.counters.refused_unauthenticated)
        yield CounterMetricFamily("chat_connections_refused_proxy", "Connections closed before MQTT on a listener "
                                  "behind a load balancer: not from listeners.trusted_proxies, or no valid PROXY "
                                  "header (X-Forwarded-For on WebSocket) in time.", broker.counters.refused_proxy)
        yield GaugeMetricFamily("chat_devices_online", "Devices subscribed to their inbox now.", len(self._s.links))

    def _staged(self) -> Iterable[Metric]:
        figures = self._s.staging.figures()
        yield GaugeMetricFamily("chat_staged_items", "Items (messages and receipts, one per target device) staged.",
                                figures.items)
        yield GaugeMetricFamily("chat_staged_messages", "Messages staged (a body each).", figures.messages)
        yield GaugeMetricFamily("chat_staged_bytes", "UTF-8 bytes of the staged message bodies.", figures.body_bytes)
        age = 0.0 if figures.oldest_ms is None else max(0, self._s.clock_ms() - figures.oldest_ms) / 1000
        yield GaugeMetricFamily("chat_staged_oldest_age_seconds",
                                "Age of the oldest staged item (0 when nothing is staged).", age)
        depth = Histogram(DEPTH_BUCKETS)
        depth.observe_many(0, figures.devices - len(figures.depths))
        for n in figures.depths:
            depth.observe(n)
        yield GaugeHistogramMetricFamily("chat_device_queue_depth", "Devices by number of items queued for them.",
                                         buckets=depth.cumulative(), gsum_value=depth.sum)
        yield GaugeMetricFamily("chat_device_queue_depth_max", "The longest queue of one device.",
                                max(figures.depths, default=0))


def _media(media: MediaService) -> Iterable[Metric]:
    """The media endpoint (docs/MEDIA.md)."""
    c = media.counters
    yield GaugeMetricFamily("chat_media_stored_bytes", "Bytes of the blobs stored (not deleted yet).", c.stored_bytes)
    yield GaugeMetricFamily("chat_media_blobs", "Blobs stored.", c.blobs)
    yield GaugeMetricFamily("chat_media_uploads", "Uploads in progress.", media.uploads_in_progress)
    yield CounterMetricFamily("chat_media_received_bytes", "Bytes received in PATCH bodies.", c.bytes_in)
    yield CounterMetricFamily("chat_media_sent_bytes", "Bytes of blobs sent in downloads.", c.bytes_out)
    yield _counter("chat_media_refusals", "Media requests refused, by error code (docs/MEDIA.md).", "code",
                   (), c.refusals)


def _push(push: PushService | ClusterPush) -> Iterable[Metric]:
    """Per provider (platform): wake-ups sent, failed attempts by outcome, latency, queue depth."""
    sent = CounterMetricFamily("chat_push_sent", "Wake-ups a push provider accepted.", labels=["platform"])
    failed = CounterMetricFamily("chat_push_failed", "Push attempts that failed, by outcome (retry: 429, 5xx or "
                                 "the network, tried again; gone: dead token, dropped; rejected: given up).",
                                 labels=["platform", "outcome"])
    latency = HistogramMetricFamily("chat_push_latency_seconds", "Duration of one push request to a provider.",
                                    labels=["platform"])
    for platform, counters in sorted(push.counters.items()):
        sent.add_metric([platform], counters.sent)
        for outcome in ("retry", "gone", "rejected"):
            failed.add_metric([platform, outcome], counters.failed.get(outcome, 0))
        latency.add_metric([platform], counters.latency.cumulative(), counters.latency.sum)
    depth = GaugeMetricFamily("chat_push_queue_depth", "Wake-ups waiting to go out (due, deferred by "
                              "push.min_interval_s, or backing off).", labels=["platform"])
    for platform, count in sorted(push.queue_depth().items()):
        depth.add_metric([platform], count)
    yield from (sent, failed, latency, depth)
    yield CounterMetricFamily("chat_push_dropped", "Wake-ups dropped: the queue held push.max_queue devices.",
                              push.core.dropped)


WRITEBACK_EVENTS = {
    "held": "Stages (one message or receipt for one user's devices) held in memory: every target device connected "
            "to this node and caught up (write-back, staging.flush_ms).",
    "settled": "Held stages every target acked within staging.flush_ms: never written to Redis (a message leaves "
               "its dedup mark).",
    "written": "Held stages written to Redis after all (flush_ms up, a target left, or a later item of the lane "
               "went to Redis).",
}


def _writeback(values: dict[str, int]) -> Iterable[Metric]:
    """Cluster write-back, by kind (msg, receipt); the node is the chat_node series of the same scrape."""
    for event, doc in WRITEBACK_EVENTS.items():
        yield _counter(f"chat_writeback_{event}", doc, "kind", ("msg", "receipt"),
                       {key.partition(":")[2]: n for key, n in values.items() if key.startswith(event + ":")})


def _counter(name: str, doc: str, label: str, known: Iterable[str], values: dict[str, int]) -> CounterMetricFamily:
    """A counter family with every known label value (0 until it happens), plus any other seen."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in sorted({*known, *values}):
        family.add_metric([key], values.get(key, 0))
    return family


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.cumulative(), sum_value=histogram.sum)


def build_registry(sources: Sources) -> CollectorRegistry:
    """A registry of its own for one broker: the chat figures and the process' (CPU, memory, descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ChatCollector(sources))
    ProcessCollector(registry=registry)
    return registry
