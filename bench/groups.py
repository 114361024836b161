"""``python -m bench groups``: one group of 256 members, all online, against the same body sent one-to-one.

The sender is one of the members; the other 255 are the recipients. A *unit* is one group message, or
(``direct``) the same body sent one-to-one to each of the 255 (255 messages published at once): both put
the same body in front of the same 255 devices, on the same broker in the same run.

1. The members log in (device tokens, ``bench.users``), spread over the load generator's worker processes
   (``bench.groupload``); the sender creates the group (``group.create``).
2. Latency: units at a fixed pace (one every ``interval_s``, well below saturation): publish -> the first
   and the last member's receipt (one clock, CLOCK_MONOTONIC, over the processes), publish -> ``sent``.
3. Throughput: closed loop, at most ``window`` units without ``sent``; units/s from the first publish to
   the last member's receipt of the last unit.
4. In 2 and 3: broker CPU (``/proc``, utime + stime) per unit and per member delivery, and the bytes the
   broker wrote (``/proc/<pid>/io`` ``write_bytes``: WAL and checkpoints) per unit.
5. Stored: the members go offline and ``staged_units`` units are staged for them; the bytes of the B-tree
   pages in use in the data folder's SQLite files (``dbstat``) before and after, per unit.

Every member checks what it gets: repeats, and for group messages gseq order; a unit not received by
every member is counted missing, and what arrives of an earlier phase during a phase is counted (not timed).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchError, CpuMeter, machine_line, md_table, summarise
from bench.groupload import GroupWorker
from bench.loadgen import LoadGen
from bench.presence import proc_io
from bench.suite import Suite
from bench.targets import ChatServer
from bench.users import make_template

MODES = ("group", "direct")
KEEPALIVE_S = 60
PHASE_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GroupSizes:
    name: str
    members: int
    workers: int
    latency_units: int
    interval_s: float
    throughput_units: int
    window: int
    staged_units: int
    body_bytes: int = 100


SIZES = {
    "full": GroupSizes("full", members=256, workers=4, latency_units=100, interval_s=0.25, throughput_units=200,
                       window=8, staged_units=100),
    "quick": GroupSizes("quick", members=256, workers=4, latency_units=40, interval_s=0.25, throughput_units=60,
                        window=8, staged_units=40),
    "tiny": GroupSizes("tiny", members=16, workers=2, latency_units=8, interval_s=0.05, throughput_units=16,
                       window=4, staged_units=8),
}


def member(i: int) -> str:
    return f"gm{i:04d}"


def stored_bytes(data_dir: Path) -> dict[str, list[int]]:
    """[bytes of the B-tree pages in use, bytes of payload in them] per SQLite file and table or index
    (``dbstat``), and their ``total``."""
    out: dict[str, list[int]] = {}
    for path in sorted(data_dir.glob("*.db")):
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for name, pages, payload in db.execute("SELECT name, SUM(pgsize), SUM(payload) FROM dbstat GROUP BY name"):
                out[f"{path.name}:{name}"] = [int(pages), int(payload)]
    out["total"] = [sum(v[0] for v in out.values()), sum(v[1] for v in out.values())]
    return out


def staged_items(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'staging.db'}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def merge(tag: str, results: list[dict[str, Any]], recipients: int) -> dict[str, Any]:
    """The workers' answers of one phase as one: latencies per unit (complete units only), rates, checks."""
    published: list[float] = results[0]["published"]
    totals: dict[str, list[float]] = {}
    for result in results:
        for unit, (count, first, last) in result["units"].items():
            total = totals.setdefault(unit, [0, first, last])
            total[0] += count
            total[1], total[2] = min(total[1], first), max(total[2], last)
    last_ms: list[float] = []
    first_ms: list[float] = []
    complete_last: list[float] = []
    for k, at in enumerate(published):
        got = totals.get(f"{tag}-{k}")
        if got is not None and got[0] >= recipients:
            last_ms.append((got[2] - at) * 1000)
            first_ms.append((got[1] - at) * 1000)
            complete_last.append(got[2])
    deliveries = int(sum(t[0] for t in totals.values()))
    span = max(complete_last) - published[0] if complete_last and published else 0.0
    return {
        "units": len(published), "complete_units": len(last_ms), "deliveries": deliveries,
        "missing_deliveries": len(published) * recipients - deliveries,
        "repeats": sum(r["repeats"] for r in results), "order_errors": sum(r["order_errors"] for r in results),
        "late_arrivals": sum(r.get("late", 0) for r in results),
        "missing_sent": results[0]["missing_sent"], "error_items": sum(r["problem_count"] for r in results),
        "error_samples": [p for r in results for p in r["problems"]][:5],
        "last_member": summarise(last_ms), "first_member": summarise(first_ms),
        "sent": summarise(results[0]["sent_ms"]),
        "generator_lag": summarise(results[0]["lag_ms"]) if results[0]["lag_ms"] else None,
        "span_s": round(span, 3),
        "units_per_s": round(len(last_ms) / span, 2) if span else None,
        "deliveries_per_s": round(len(last_ms) * recipients / span, 1) if span else None,
    }


class Bench:
    """One broker, one load generator, one group; runs the phases of both modes against them."""

    def __init__(self, suite: Suite, sizes: GroupSizes) -> None:
        self.suite, self.sizes = suite, sizes
        self.users = [member(i) for i in range(sizes.members)]
        self.sender, self.recipients = self.users[0], self.users[1:]
        self.held = [self.users[w::sizes.workers] for w in range(sizes.workers)]  # the sender is in worker 0
        template = suite.workdir / "groups-template"
        make_template(template, self.users)
        self.server = ChatServer(suite.workdir, template)
        self.server.fresh_data()
        self.gen: LoadGen | None = None
        self.group = ""

    def start(self) -> None:
        sizes, server = self.sizes, self.server
        server.start()
        self.gen = gen = LoadGen(sizes.workers, GroupWorker)
        gen.call(range(sizes.workers), "connect_members", [
            {"host": server.host, "port": server.port, "users": held, "source": self.suite.sources.take(1)[0],
             "keepalive": KEEPALIVE_S} for held in self.held], timeout=300)
        (created,) = gen.call([0], "request", [{"user": self.sender, "op": "group.create",
                                                "args": {"name": "bench", "members": self.recipients}}], timeout=60)
        self.group = created["group"]
        self.suite.log(f"  {sizes.members} members online over {sizes.workers} processes; group {self.group}")

    def phase(self, mode: str, kind: str) -> dict[str, Any]:
        """``kind``: latency (paced), throughput (closed loop) or staged (members offline)."""
        sizes, server, gen = self.sizes, self.server, self.gen
        assert gen is not None
        tag = f"{mode[0]}{kind[0]}"
        units = {"latency": sizes.latency_units, "throughput": sizes.throughput_units}.get(kind, sizes.staged_units)
        send = {"user": self.sender, "to": [self.group] if mode == "group" else self.recipients,
                "body_bytes": sizes.body_bytes, "interval_s": sizes.interval_s if kind == "latency" else 0.0,
                "window": sizes.window}
        wants = [0 if kind == "staged" else len([u for u in held if u != self.sender]) for held in self.held]
        gen.call(range(sizes.workers), "arm", [{"tag": tag, "units": units, "want": want} for want in wants],
                 timeout=SETTLE_TIMEOUT_S)
        args: list[dict[str, Any]] = [{"timeout_s": PHASE_TIMEOUT_S} for _ in wants]
        args[0]["send"] = send  # worker 0 holds the sender
        before = stored_bytes(server.data_dir) if kind == "staged" else {}
        meter = CpuMeter({"broker": [server.pid], "generator": list(gen.pids)}, self_group="generator")
        io_before, started = proc_io(server.pid), time.monotonic()
        results = gen.call(range(sizes.workers), "phase", args, timeout=PHASE_TIMEOUT_S + 60)
        wall, cpu = time.monotonic() - started, meter.cores()
        written = proc_io(server.pid).get("write_bytes", 0) - io_before.get("write_bytes", 0)
        out = merge(tag, results, 0 if kind == "staged" else len(self.recipients))
        broker_s = (cpu.get("broker") or 0.0) * wall
        out.update({"mode": mode, "kind": kind, "wall_s": round(wall, 3), "cpu_cores": cpu,
                    "broker_cpu_ms_per_unit": round(broker_s * 1000 / units, 3),
                    "broker_cpu_us_per_delivery": round(broker_s * 1e6 / (units * len(self.recipients)), 2),
                    "write_bytes_per_unit": round(written / units)})
        if kind == "staged":
            after = stored_bytes(server.data_dir)
            delta = {k: [a - b for a, b in zip(after[k], before.get(k, [0, 0]), strict=True)] for k in after}
            out["stored_bytes_delta"] = {k: v for k, v in delta.items() if any(v)}
            out["stored_bytes_per_unit"] = round(delta["total"][0] / units)
            out["payload_bytes_per_unit"] = round(delta["total"][1] / units)
            out["bodies_payload_per_unit"] = round(delta.get("staging.db:bodies", [0, 0])[1] / units)
            out["items_payload_per_unit"] = round(delta.get("staging.db:items", [0, 0])[1] / units)
        self.suite.log(f"    {mode} {kind}: last member p50 {out['last_member'].get('p50_ms')} ms"
                       f" p99 {out['last_member'].get('p99_ms')} ms, {out['units_per_s']} units/s,"
                       f" broker {out['broker_cpu_ms_per_unit']} ms CPU per unit"
                       + (f", {out['stored_bytes_per_unit']:,} bytes stored per unit" if kind == "staged" else ""))
        return out

    def offline(self) -> None:
        """Once every item of the online phases is acked and deleted (the stored bytes start from an empty
        queue), the members but the sender log out."""
        assert self.gen is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while (left := staged_items(self.server.data_dir)) > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"{left} item(s) still staged {SETTLE_TIMEOUT_S:.0f} s after the online phases")
            time.sleep(0.05)
        self.gen.call(range(self.sizes.workers), "close_members", [{"keep": [self.sender]}] * self.sizes.workers,
                      timeout=60)

    def close(self) -> dict[str, Any]:
        if self.gen is not None:
            self.gen.close()
        self.server.stop()
        return self.server.log_problems()


def run(suite: Suite) -> dict[str, Any]:
    sizes = SIZES[suite.sizes.name]
    suite.log(f"[groups] a {sizes.members}-member group against one-to-one sends: starting ...")
    bench = Bench(suite, sizes)
    phases: list[dict[str, Any]] = []
    try:
        bench.start()
        for kind in ("latency", "throughput"):
            phases += [bench.phase(mode, kind) for mode in MODES]
        bench.offline()
        phases += [bench.phase(mode, "staged") for mode in MODES]
    finally:
        problems = bench.close()
    return {"group_sizes": asdict(sizes), "recipients": sizes.members - 1, "phases": phases,
            "broker_log_problems": problems}


def _phase(result: dict[str, Any], mode: str, kind: str) -> dict[str, Any]:
    return next(p for p in result["phases"] if p["mode"] == mode and p["kind"] == kind)


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def headline_rows(result: dict[str, Any]) -> list[list[Any]]:
    """(figure, group, one-to-one, one-to-one / group) for the table and the summary."""
    rows = []
    figures = [
        ("latency", "last_member", "p50_ms", "publish -> last member p50 ms"),
        ("latency", "last_member", "p99_ms", "publish -> last member p99 ms"),
        ("latency", "first_member", "p50_ms", "publish -> first member p50 ms"),
        ("latency", "sent", "p50_ms", "publish -> `sent` p50 ms (per message)"),
        ("throughput", None, "units_per_s", "units/s (closed loop)"),
        ("throughput", None, "deliveries_per_s", "member deliveries/s"),
        ("throughput", "last_member", "p50_ms", "closed loop: publish -> last member p50 ms"),
        ("throughput", None, "broker_cpu_ms_per_unit", "broker CPU ms per unit"),
        ("throughput", None, "broker_cpu_us_per_delivery", "broker CPU µs per member delivery"),
        ("throughput", None, "write_bytes_per_unit", "bytes written by the broker per unit (WAL, checkpoints)"),
        ("staged", None, "stored_bytes_per_unit", "bytes stored per unit, members offline (SQLite pages in use)"),
        ("staged", None, "payload_bytes_per_unit", "the same, payload bytes in those pages"),
        ("staged", None, "bodies_payload_per_unit", "of which the `bodies` table (the body and its fields)"),
        ("staged", None, "items_payload_per_unit", "of which the `items` table (a reference per device)"),
    ]
    for kind, part, key, label in figures:
        values = []
        for mode in MODES:
            phase = _phase(result, mode, kind)
            values.append((phase[part] if part else phase).get(key))
        rows.append([label, values[0], values[1], _ratio(values[1], values[0])])
    return rows


def markdown(result: dict[str, Any]) -> str:
    sizes = result["group_sizes"]
    n = result["recipients"]
    lines = [
        f"# A {sizes['members']}-member group against one-to-one sends", "",
        f"`{result['command']}` (sizes: {sizes['name']}) on {machine_line(result['machine'])}.", "",
        f"One broker (`python -m chatserver run`, SQLite, the bench configuration of `bench/targets.py`), "
        f"{sizes['members']} members online over {sizes['workers']} load generator processes, one of them "
        f"sending. A **unit** is one group message (`to` the group id), or the same {sizes['body_bytes']}-byte "
        f"body sent one-to-one to each of the other {n} members ({n} messages published at once): the same "
        f"body to the same {n} devices. Latency: {sizes['latency_units']} units, one every "
        f"{sizes['interval_s']} s. Throughput: {sizes['throughput_units']} units, at most {sizes['window']} "
        f"without `sent`. Stored: {sizes['staged_units']} units staged for the {n} members offline. "
        "How it is measured: bench/README.md, `groups`.", "",
    ]
    lines += md_table(["figure", "group", f"{n} one-to-one", "one-to-one / group"], headline_rows(result), "lrrr")
    lines += ["", "## Every phase", ""]
    rows = []
    for p in result["phases"]:
        cpu = p["cpu_cores"]
        rows.append([p["mode"], p["kind"], p["units"], p["complete_units"], p["missing_deliveries"], p["repeats"],
                     p["order_errors"], p.get("late_arrivals"), p["error_items"], p["last_member"].get("p50_ms"),
                     p["last_member"].get("p99_ms"), p["wall_s"], cpu.get("broker"), cpu.get("generator"),
                     cpu.get("others")])
    lines += md_table(["mode", "phase", "units", "complete", "missing deliveries", "repeats", "gseq order errors",
                       "earlier phases' arrivals", "error items", "last member p50 ms", "p99 ms", "seconds",
                       "broker CPU", "generator CPU", "other CPU"], rows, "llrrrrrrrrrrrrr")
    for mode in MODES:
        staged = _phase(result, mode, "staged")
        parts = ", ".join(f"`{k}` {pages:,} ({payload:,})"
                          for k, (pages, payload) in sorted(staged["stored_bytes_delta"].items()))
        lines += ["", f"Stored by {sizes['staged_units']} {mode} units, bytes of pages (of payload): {parts}."]
    problems = result["broker_log_problems"]
    lines += ["", f"Broker log: {problems['count']} warning/error line(s)."]
    return "\n".join(lines) + "\n"
