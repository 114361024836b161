"""Counters the bridge keeps for the metrics endpoint: plain ints and fixed-bucket histograms.

The hot path only adds to ints and lists here (no locks, no prometheus calls);
``chatserver.metrics`` reads them when Prometheus scrapes. Everything runs on the
broker's event loop, so a scrape sees a consistent picture without locking.
Nothing here holds a user id, a body or any other per-user value: labels are
fixed small sets (item kinds, error codes).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from chatproto import DownlinkItem, ErrorItem, ResItem

# Seconds: from 1 ms (an item acked from memory) to a minute (a device that was away).
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                      10.0, 30.0, 60.0)
# Rows per group commit (items written + items deleted).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


class Histogram:
    """A Prometheus-style histogram (``le`` buckets) as a list of ints; ``observe`` is O(log buckets)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. value <= le (Prometheus' rule).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def observe_many(self, value: float, times: int) -> None:
        """``observe(value)`` ``times`` times, at the cost of one."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.count += times
        self.sum += value * times

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, count of observations <= le), ..., ("+Inf", count)]`` as Prometheus exposes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass(slots=True)
class BridgeCounters:
    """What the bridge counts. ``count_downlink`` is called once per item sent to a device."""

    downlink: dict[str, int] = field(default_factory=dict)
    """Items sent to devices, by ``kind`` (msg, receipt, presence, res, error)."""
    errors: dict[str, int] = field(default_factory=dict)
    """``error`` items and failed ``res`` items, by ``code``."""
    redeliveries: int = 0
    """Items sent again because they stayed unacked for ``delivery.redeliver_after_s``."""
    receipts_coalesced: int = 0
    """Pending ``seen`` receipts merged into a newer one for the same device and peer (PROTOCOL rule 11)."""
    group_skipped: int = 0
    """Member devices a group message was not staged for because their queue was full (PROTOCOL section 11)."""
    sent_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    """Seconds from staging a message to its ``receipt sent`` (a repeat answered at once counts ~0)."""
    delivered_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    """Seconds from staging a message to the first ack by a device of the recipient."""
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    commit_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    commit_failures: int = 0
    writeback: dict[str, int] = field(default_factory=dict)
    """Cluster write-back (bridge/cluster/holding.py): stages ``held:msg``, ``settled:receipt``, ... by
    event (held from memory; settled: acked in time, never written; written: reached Redis after all)
    and kind (msg, receipt)."""

    def count_downlink(self, item: DownlinkItem) -> None:
        self.downlink[item.KIND] = self.downlink.get(item.KIND, 0) + 1
        if isinstance(item, ErrorItem):
            self._error(item.code)
        elif isinstance(item, ResItem) and not item.ok:
            self._error(item.error_code)

    def count_writeback(self, event: str, message: bool) -> None:
        key = f"{event}:{'msg' if message else 'receipt'}"
        self.writeback[key] = self.writeback.get(key, 0) + 1

    def _error(self, code: str | None) -> None:
        key = str(code)
        self.errors[key] = self.errors.get(key, 0) + 1
