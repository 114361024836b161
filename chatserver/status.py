"""``chat-broker status``: the broker's figures in the terminal, read from its ``/metrics``.

``Snapshot.parse`` (text exposition -> figures) and ``render`` (figures ->
rich tables) are pure; ``show`` fetches once or, with ``watch``, every
``interval`` seconds, showing rates between two scrapes.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

from chatserver.binds import parse_bind
from chatserver.config import Settings

DEFAULT_URL = "http://127.0.0.1:9100/metrics"
HINT = "is the broker running with metrics.bind set?"

Labels = tuple[tuple[str, str], ...]


class StatusError(Exception):
    """The endpoint could not be read; ``str()`` is a one-line message."""


def url_from_settings(settings: Settings) -> str:
    if settings.metrics.bind is None:
        return DEFAULT_URL
    host, port = parse_bind(settings.metrics.bind)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 (a bind, not ours)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (the operator's own URL)
            return str(reply.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url} answered HTTP {exc.code}; {HINT}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot read {url}: {reason}; {HINT}") from None


@dataclass
class Snapshot:
    """Samples by name, then by their labels (without ``le`` ordering concerns: buckets are kept as a list)."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float = 0.0) -> Snapshot:
        snap = cls(at)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                snap.samples.setdefault(sample.name, {})[labels] = float(sample.value)
        return snap

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        return {dict(k).get(label, ""): v for k, v in self.samples.get(name, {}).items()}

    def quantile(self, name: str, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` of histogram ``name`` (None: no observations)."""
        buckets = sorted((float(le), v) for le, v in self.by(f"{name}_bucket", "le").items())
        total = buckets[-1][1] if buckets else 0.0
        if total <= 0:
            return None
        return next(le for le, v in buckets if v >= q * total)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "> max bucket" if math.isinf(seconds) else f"{seconds * 1000:,.1f} ms"


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _traffic(now: Snapshot, before: Snapshot | None) -> Table:
    table = Table(title="Traffic", title_justify="left", box=None, padding=(0, 2))
    for column in ("direction", "kind", "total", "per s"):
        table.add_column(column, justify="left" if column in ("direction", "kind") else "right")
    seconds = now.at - before.at if before is not None else 0.0
    for direction, name in (("in", "chat_uplink_total"), ("out", "chat_downlink_total")):
        for kind, total in sorted(now.by(name, "kind").items()):
            rate = "-"
            if before is not None and seconds > 0:
                rate = f"{(total - before.value(name, kind=kind)) / seconds:,.1f}"
            table.add_row(direction, kind, f"{total:,.0f}", rate)
    return table


def render(now: Snapshot, before: Snapshot | None = None, source: str = "") -> Group:
    connections = now.by("chat_connections", "listener")
    logins = now.by("chat_logins_total", "result")
    errors = {code: n for code, n in now.by("chat_errors_total", "code").items() if n}
    overview = kv_table(f"chat-broker {source}".strip(), [
        ("connections", ", ".join(f"{k} {v:,.0f}" for k, v in sorted(connections.items())) or "0"),
        ("devices online", f"{now.value('chat_devices_online'):,.0f}"),
        ("logins ok / refused", f"{logins.get('ok', 0):,.0f} / "
                                f"{sum(v for k, v in logins.items() if k not in ('ok', 'anonymous')):,.0f}"),
        ("errors sent", ", ".join(f"{k} {v:,.0f}" for k, v in sorted(errors.items())) or "none"),
        ("redeliveries", f"{now.value('chat_redeliveries_total'):,.0f}"),
    ])
    staging = kv_table("Staging", [
        ("staged items", f"{now.value('chat_staged_items'):,.0f}"),
        ("staged messages", f"{now.value('chat_staged_messages'):,.0f}"),
        ("staged bytes", f"{now.value('chat_staged_bytes'):,.0f}"),
        ("oldest staged item", f"{now.value('chat_staged_oldest_age_seconds'):,.1f} s"),
        ("longest device queue", f"{now.value('chat_device_queue_depth_max'):,.0f}"),
    ])
    latency = kv_table("Latency (bucket bounds)", [
        ("staged -> sent p50 / p99", f"{_ms(now.quantile('chat_sent_latency_seconds', 0.5))} / "
                                     f"{_ms(now.quantile('chat_sent_latency_seconds', 0.99))}"),
        ("staged -> delivered p50 / p99", f"{_ms(now.quantile('chat_delivered_latency_seconds', 0.5))} / "
                                          f"{_ms(now.quantile('chat_delivered_latency_seconds', 0.99))}"),
        ("store commit p99", _ms(now.quantile("chat_store_commit_seconds", 0.99))),
        ("store commits (failed)", f"{now.value('chat_store_commit_seconds_count'):,.0f} "
                                   f"({now.value('chat_store_commit_failures_total'):,.0f})"),
        ("event loop lag (last)", _ms(now.value("chat_event_loop_lag_last_seconds"))),
        ("memory (RSS)", f"{now.value('process_resident_memory_bytes') / 2**20:,.1f} MiB"),
    ])
    return Group(overview, "", _traffic(now, before), "", staging, "", latency)


def show(url: str, watch: bool, interval: float, console: Console, count: int | None = None,
         clock: Callable[[], float] = time.monotonic) -> None:
    """Print the figures once, or refresh them every ``interval`` s until interrupted or ``count``
    refreshes are done (raises StatusError)."""
    now = Snapshot.parse(fetch(url), clock())
    if not watch:
        console.print(render(now, source=url))
        return
    if not console.is_terminal:
        # Live redraws in place, so into a pipe or file it wrote the last frame only: write each one.
        console.print(render(now, source=url))
        for _ in _refreshes(count, interval):
            before, now = now, Snapshot.parse(fetch(url), clock())
            console.print("", render(now, before, url))
        return
    from rich.live import Live  # noqa: PLC0415 (only the watch mode on a terminal needs it)

    with Live(render(now, source=url), console=console, auto_refresh=False) as live:
        for _ in _refreshes(count, interval):
            before, now = now, Snapshot.parse(fetch(url), clock())
            live.update(render(now, before, url), refresh=True)


def _refreshes(count: int | None, interval: float) -> Iterator[None]:
    """Yield after each ``interval`` s, ``count`` times (None: until interrupted)."""
    while count is None or count > 0:
        count = None if count is None else count - 1
        time.sleep(interval)
        yield
