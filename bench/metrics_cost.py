"""``python -m bench metrics-cost``: what the metrics endpoint costs in 1:1 throughput.

The closed-loop 1:1 run of ``compare`` (N online pairs, no idle users), repeated
with the metrics listener on and off, in the order on, off, off, on, on, off, ...
(ABBA), each run on a fresh broker, so that drift of the machine (other load,
thermal, caches) falls on both arms alike. While metrics are on, a thread
scrapes ``/metrics`` every ``SCRAPE_S`` seconds (Prometheus' default is 15 s:
this is the pessimistic case). The "off" arm still bumps the plain-int counters
the collector reads (they cannot be switched off); their cost per message is
measured separately in-process (``counter_cost``) and reported next to the ratio.
"""

from __future__ import annotations

import statistics
import threading
import time
import timeit
import urllib.request
from typing import Any

from bench.common import free_port, md_table, summarise
from bench.suite import Suite
from bridge.counters import BridgeCounters
from broker.counters import BrokerCounters
from chatproto import RECEIPT_SENT, ReceiptItem

SCRAPE_S = 1.0
ROUNDS = {"tiny": 1, "quick": 4, "full": 6}  # even: each arm runs first in half the rounds
# Per chat message on the bench path: uplinks out + 2 acks; downlinks msg, sent, delivered; two latencies,
# commit figures when written (mostly not: acked within flush_ms).
UPLINKS_PER_MESSAGE = 3
DOWNLINKS_PER_MESSAGE = 3
LATENCIES_PER_MESSAGE = 2


class Scraper:
    """GETs the metrics URL every ``every`` seconds in a thread until stopped; counts scrapes and bytes."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.scrapes = 0
        self.bytes = 0
        self.failures = 0
        self.seconds: list[float] = []  # each scrape's round trip: an upper bound of the broker's time on it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as reply:
                    self.bytes += len(reply.read())
                self.scrapes += 1
                self.seconds.append(time.perf_counter() - started)
            except OSError:
                self.failures += 1


def counter_cost() -> dict[str, float]:
    """Nanoseconds per call of the hot-path counting (in this process, one core)."""
    bridge, broker = BridgeCounters(), BrokerCounters()
    item = ReceiptItem(RECEIPT_SENT, ("m1",), "bob", 1)
    n = 200_000
    downlink = timeit.timeit(lambda: bridge.count_downlink(item), number=n) / n * 1e9
    uplink = timeit.timeit(lambda: broker.publish("out"), number=n) / n * 1e9
    latency = timeit.timeit(lambda: bridge.sent_latency.observe(0.003), number=n) / n * 1e9
    per_message = UPLINKS_PER_MESSAGE * uplink + DOWNLINKS_PER_MESSAGE * downlink + LATENCIES_PER_MESSAGE * latency
    return {"downlink_ns": round(downlink, 1), "uplink_ns": round(uplink, 1), "latency_ns": round(latency, 1),
            "per_message_ns": round(per_message, 1)}


def _one_run(suite: Suite, metrics: bool) -> dict[str, Any]:
    port = free_port()
    extra = f'metrics:\n  bind: "127.0.0.1:{port}"\n' if metrics else ""
    server = suite.server("chat", extra)
    server.start()
    try:
        suite.connect_pairs(server)
        if metrics:
            with Scraper(f"http://127.0.0.1:{port}/metrics", SCRAPE_S) as scraper:
                phase = suite.run_pairs(server, "max")
            phase["scrapes"], phase["scrape_bytes"] = scraper.scrapes, scraper.bytes
            phase["scrape_failures"] = scraper.failures
            phase["scrape_ms"] = summarise([s * 1000 for s in scraper.seconds]) if scraper.seconds else None
        else:
            phase = suite.run_pairs(server, "max")
    finally:
        suite.disconnect_all()
        server.stop()
    phase["metrics"] = metrics
    return phase


def run(suite: Suite) -> dict[str, Any]:
    rounds = ROUNDS.get(suite.sizes.name, 3)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for metrics in ((True, False) if r % 2 == 0 else (False, True)):
            phase = _one_run(suite, metrics)
            runs.append(phase)
            cpu = phase["cpu_cores"].get("broker")
            suite.log(f"  round {r + 1}/{rounds}, metrics {'on ' if metrics else 'off'}: "
                      f"{phase['msgs_per_s']:,.0f} msg/s (broker CPU {cpu} cores, errors {phase['errors']})")
    on = [p["msgs_per_s"] for p in runs if p["metrics"]]
    off = [p["msgs_per_s"] for p in runs if not p["metrics"]]
    ratio = statistics.median(on) / statistics.median(off) if off and statistics.median(off) else None
    # Per round: the on/off pair run next to each other, so their ratio cancels slow drift.
    paired = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in _pairs(runs) if b["msgs_per_s"]]
    broker_cpu = [p["cpu_cores"].get("broker") for p in runs if p["cpu_cores"].get("broker")]
    msgs = statistics.median(on + off) if on + off else 0
    us_per_message = (statistics.median(broker_cpu) / msgs * 1e6) if broker_cpu and msgs else None
    counters = counter_cost()
    scrape_ms = [p["scrape_ms"]["p50_ms"] for p in runs if p.get("scrape_ms")]
    result: dict[str, Any] = {
        "pairs": suite.sizes.pairs, "inflight": suite.sizes.inflight, "rounds": rounds, "scrape_every_s": SCRAPE_S,
        "runs": runs, "median_on": statistics.median(on) if on else None,
        "median_off": statistics.median(off) if off else None,
        "ratio_on_off": round(ratio, 4) if ratio else None,
        "paired_ratios": [round(x, 4) for x in paired],
        "median_paired_ratio": round(statistics.median(paired), 4) if paired else None,
        "broker_cpu_us_per_message": round(us_per_message, 1) if us_per_message else None,
        "counters": counters,
        "scrape_p50_ms": round(statistics.median(scrape_ms), 2) if scrape_ms else None,
        "counters_share_of_cpu": (round(counters["per_message_ns"] / 1000 / us_per_message, 5)
                                  if us_per_message else None),
    }
    if result["ratio_on_off"] is not None:
        suite.log(f"  metrics on / off: median {result['ratio_on_off']:.3f}, paired {result['median_paired_ratio']}"
                  f" (cost {100 * (1 - result['ratio_on_off']):.1f} %)")
    return result


def _pairs(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(on, off) of each round."""
    out = []
    for k in range(0, len(runs) - 1, 2):
        a, b = runs[k], runs[k + 1]
        out.append((a, b) if a["metrics"] else (b, a))
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Metrics cost: 1:1 throughput with the metrics endpoint on and off", "",
             f"`{result['command']}`", "",
             f"{result['pairs']} online pairs, {result['inflight']} messages in flight per pair (closed loop, no idle"
             f" users), {result['rounds']} round(s) in ABBA order, a fresh broker per run; with metrics on,"
             f" `/metrics` scraped every {result['scrape_every_s']:g} s.", ""]
    rows = [[i + 1, "on" if p["metrics"] else "off", p["msgs_per_s"], p["cpu_cores"].get("broker"),
             p["cpu_cores"].get("others"), p.get("scrapes", "-"),
             p["scrape_ms"]["p50_ms"] if p.get("scrape_ms") else "-", p["errors"]]
            for i, p in enumerate(result["runs"])]
    lines += md_table(["run", "metrics", "msg/s", "broker CPU (cores)", "other CPU (cores)", "scrapes",
                       "scrape p50 (ms)", "errors"], rows)
    ratio = result["ratio_on_off"]
    lines += ["", f"- median msg/s: on {result['median_on']}, off {result['median_off']}: **on / off ="
              f" {ratio}** ({'-' if ratio is None else f'{100 * (1 - ratio):.1f} %'} cost; the target is < 5 %)",
              f"- per-round on/off ratios: {result['paired_ratios']} (median {result['median_paired_ratio']})"]
    if result.get("scrape_p50_ms") is not None:
        lines += [f"- one scrape took {result['scrape_p50_ms']} ms (median round trip, under load): at one scrape per"
                  f" {result['scrape_every_s']:g} s that bounds the endpoint's share of the broker's time by"
                  f" {result['scrape_p50_ms'] / 10 / result['scrape_every_s']:.2f} %"]
    c = result["counters"]
    lines += [f"- hot-path counters, always on (also in the 'off' arm): {c['uplink_ns']} ns per uplink count,"
              f" {c['downlink_ns']} ns per downlink count, {c['latency_ns']} ns per histogram observation; about"
              f" {c['per_message_ns']} ns per message against {result['broker_cpu_us_per_message']} µs of broker"
              f" CPU per message ({result['counters_share_of_cpu']} of it)",
              "- 'other CPU' is everything else on the machine during the window: well above 0 means the"
              " run shared the cores with other work, and the ratio is noisier.", ""]
    return "\n".join(lines)
