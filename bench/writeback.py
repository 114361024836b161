"""The cluster targets of ``python -m bench scale``, with write-back on and off, and what write-back
saved (issue #16: a message whose target devices are all on the sender's node, caught up, and ack
within ``staging.flush_ms`` reaches Redis only as a dedup mark).

``cluster`` / ``cluster-nowb``: ``--workers 2`` with ``staging.flush_ms`` 50 (the default) / 0, on
SO_REUSEPORT: a pair's two ends share a worker only part of the time. ``cluster1`` /
``cluster1-nowb``: ``--workers 1``, every pair on one node, so every message can be held. Each
worker's ``/metrics`` is read at the start and end of a measured window (``chat_writeback_*``
and ``chat_uplink_total{kind="out"}``): how many messages were held, and how many of those were
settled without a write; summed over the workers (``wb:EVENT:KIND``) and per node
(``wb@NODE:EVENT:KIND``).
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import fmt, md_table

WORKERS = 2
FLUSH_MS = 50  # chatserver/config.py's default
SERIES = re.compile(r'^chat_(writeback_held|writeback_settled|writeback_written|uplink)_total\{kind="(\w+)"\} (\S+)$',
                    re.MULTILINE)
PerMessage = Callable[[dict[str, Any], float], dict[str, float | None]]  # bench.scale.per_message (no cycle)
NODE = re.compile(r'^chat_node_info\{[^}]*node="([^"]*)"', re.MULTILINE)


@dataclass(frozen=True)
class ClusterVariant:
    workers: int
    writeback: bool

    @property
    def label(self) -> str:
        return f"chat-broker cluster x{self.workers}" + ("" if self.writeback else ", write-back off")

    def config(self, metrics_port: int) -> str:
        """The config lines this variant adds (workers serve metrics on ``metrics_port`` + index)."""
        lines = f'metrics:\n  bind: "127.0.0.1:{metrics_port}"\n'
        return lines + ("" if self.writeback else "staging:\n  flush_ms: 0\n")


VARIANTS = {"cluster": ClusterVariant(WORKERS, True), "cluster-nowb": ClusterVariant(WORKERS, False),
            "cluster1": ClusterVariant(1, True), "cluster1-nowb": ClusterVariant(1, False)}


class WritebackProbe:
    """Reads ``chat_writeback_*`` and messages in (``chat_uplink_total{kind="out"}``) off every worker."""

    def __init__(self, first_port: int, workers: int) -> None:
        self.urls = [f"http://127.0.0.1:{first_port + i}/metrics" for i in range(workers)]

    def counters(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for url in self.urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            node = NODE.search(text)
            for series, kind, value in SERIES.findall(text):
                if series == "uplink" and kind != "out":
                    continue
                key = f"{series.removeprefix('writeback_')}:{kind}"
                out[f"wb:{key}"] += float(value)
                out[f"wb@{node.group(1) if node else url}:{key}"] += float(value)
        return dict(out)


def shares(counters: dict[str, float], node: str = "") -> dict[str, float | None]:
    """Of the messages in: held (%); of those held: settled (%); of receipts held: settled (%)."""
    prefix = f"wb@{node}:" if node else "wb:"

    def get(key: str) -> float:
        return counters.get(prefix + key, 0.0)

    def pct(part: float, whole: float) -> float | None:
        return round(100 * part / whole, 1) if whole else None

    return {"messages_in": get("uplink:out"), "held_msgs": get("held:msg"),
            "held_pct": pct(get("held:msg"), get("uplink:out")),
            "settled_pct_of_held": pct(get("settled:msg"), get("held:msg")),
            "held_receipts": get("held:receipt"),
            "receipts_settled_pct_of_held": pct(get("settled:receipt"), get("held:receipt"))}


def _nodes(counters: dict[str, float]) -> list[str]:
    return sorted({key[3:].split(":", 1)[0] for key in counters if key.startswith("wb@")})


def markdown(result: dict[str, Any], window: float, per_message: PerMessage) -> list[str]:
    """The write-back section of scale.md: the held share of each phase, and on against off."""
    targets = result["targets"]
    # A result from before the write-back counters were collected gets no section (it would be all zeros).
    present = [name for name in VARIANTS if name in targets
               and any(_nodes(p.get("counters") or {}) for p in targets[name]["phases"])]
    if not present:
        return []
    lines = ["", "## Write-back: what stayed out of Redis", "",
             "Messages in: `chat_uplink_total{kind=\"out\"}` over the measured window, summed over the workers; held:"
             " `chat_writeback_held_total{kind=\"msg\"}` (every target device on the sender's node and caught up:"
             " delivered from memory); settled: `chat_writeback_settled_total` (acked within `staging.flush_ms`:"
             " only the dedup mark reached Redis). Per node in brackets. The `delivered` receipts back to the"
             " sender are held the same way when the sender's devices are on the recipient's node.", ""]
    rows = []
    for name in present:
        t = targets[name]
        for p in t["phases"]:
            c = p.get("counters") or {}
            s = shares(c)
            per_node = ", ".join(f"{node}: {fmt(shares(c, node)['held_pct'])}%" for node in _nodes(c))
            rows.append([t["label"], p["idle"], _load(p), s["messages_in"], s["held_msgs"],
                         f"{fmt(s['held_pct'])}%" + (f" ({per_node})" if len(_nodes(c)) > 1 else ""),
                         s["settled_pct_of_held"], s["held_receipts"], s["receipts_settled_pct_of_held"]])
    lines += md_table(["target", "idle users", "load", "messages in", "held", "held % of in",
                       "settled % of held", "receipts held", "receipts settled %"], rows, "lrlrrlrrr")
    rows = []
    for name in present:
        on = VARIANTS[name]
        off_name = next((n for n, v in VARIANTS.items() if v.workers == on.workers and not v.writeback), None)
        if not on.writeback or off_name not in targets:
            continue
        off_phases = {(p["idle"], p["mode"]): p for p in targets[off_name]["phases"]}
        for p in targets[name]["phases"]:
            q = off_phases.get((p["idle"], p["mode"]))
            if q is None:
                continue
            a, b = per_message(p, window), per_message(q, window)
            cells = [_vs(p["msgs_per_s"], q["msgs_per_s"]), _vs(p["deliver"].get("p99_ms"), q["deliver"].get("p99_ms"))]
            cells += [_vs(a.get(key), b.get(key)) for key in ("redis_commands", "redis_scripts", "redis_bytes",
                                                               "redis_cpu_us", "broker_cpu_us")]
            rows.append([f"x{on.workers}", p["idle"], _load(p), shares(p.get("counters") or {})["held_pct"], *cells])
    if rows:
        lines += ["", "### On against off, same run", "",
                  "Each cell: write-back on (`staging.flush_ms` 50) / off (0), then on / off. Per message delivered in"
                  " the window (the cost table above): Redis commands (Lua's inner calls counted), scripts (EVALSHA),"
                  " bytes (net in + out over the masters), Redis and broker CPU µs.", ""]
        lines += md_table(["workers", "idle users", "load", "held %", "msg/s", "deliver p99 ms", "Redis commands",
                           "Redis scripts", "Redis bytes", "Redis CPU µs", "broker CPU µs"], rows, "lrlrllllllll")
    return lines


def _load(p: dict[str, Any]) -> str:
    return "max" if p["mode"] == "max" else f"{p['offered_per_s']:.0f}/s"


def _vs(on: float | None, off: float | None) -> str:
    ratio = on / off if on is not None and off else None
    return f"{fmt(on)} / {fmt(off)} ({fmt(ratio)})"
