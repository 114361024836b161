"""Look inside the running broker: memory per idle connection by allocation site, and garbage-collector time.

    python -m bench.probe memory --idle 1000     # tracemalloc: what each idle connection allocates
    python -m bench.probe gc --idle 10000        # GC pauses under load, with 0 and with N idle users

Both run our broker as ``python -m bench.probe --serve DIR [--trace N] -- <broker run args>``:
``chatserver.cli.main`` unchanged, plus (in the same process) ``gc.callbacks`` timing
every collection, optionally tracemalloc, and a thread that answers requests
through files in DIR (``take-NAME`` -> ``snap-NAME`` tracemalloc snapshot,
``gc-NAME`` -> ``gcstats-NAME`` JSON). Nothing of the broker is changed.

memory: a snapshot with one user connected, another after ``--idle`` more; the
difference per connection, by source line and by the innermost frame of amqtt
or of this project. tracemalloc slows the broker: only bytes count here.
Python allocations only; RSS per connection (``python -m bench idle``) is larger.

gc: 1:1 pairs at the highest rate (as ``python -m bench compare``) with 0 idle
users, then with ``--idle`` idle users, then the same after ``gc.freeze()`` in
the broker (an experiment: ``freeze-NAME`` -> ``frozen-NAME``); for each run,
the broker's collections per generation, their total and longest pause, and the
share of the run they took.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    machine_info,
    machine_line,
    md_table,
    raise_fd_limit,
    write_text_atomic,
)
from bench.loadgen import LoadGen
from bench.suite import IDLE_WORKERS, PER_SOURCE, SIZES, Sources, Suite, idle_user, pair_users
from bench.targets import LEAN_CONFIG, ChatServer
from bench.users import make_template

POLL_S = 0.2


# --- inside the broker process -------------------------------------------------------------------------


class GcTimer:
    """Times every collection (gc.callbacks), per generation."""

    def __init__(self) -> None:
        self._started = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.since = time.perf_counter()
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info["generation"]
        self.count[generation] += 1
        self.total_s[generation] += took
        self.max_s[generation] = max(self.max_s[generation], took)
        self.collected[generation] += info.get("collected", 0)

    def stats(self) -> dict[str, Any]:
        return {"seconds": time.perf_counter() - self.since, "count": self.count, "total_s": self.total_s,
                "max_s": self.max_s, "collected": self.collected, "objects": len(gc.get_objects()),
                "thresholds": gc.get_threshold(), "frozen": gc.get_freeze_count()}


def serve(argv: list[str], control: Path, trace_frames: int) -> int:
    if trace_frames:
        tracemalloc.start(trace_frames)
    timer = GcTimer()

    def watch() -> None:
        while True:
            for request in sorted(control.glob("take-*")):
                name = request.name.split("-", 1)[1]
                tracemalloc.take_snapshot().dump(str(control / f"snap-{name}.tmp"))
                (control / f"snap-{name}.tmp").replace(control / f"snap-{name}")
                request.unlink()
            for request in sorted(control.glob("freeze-*")):
                # Experiment only (what a fix would gain): move every object that exists now
                # (the idle sessions) to the permanent generation, out of the collector's scans.
                gc.freeze()
                name = request.name.split("-", 1)[1]
                (control / f"frozen-{name}").write_text(str(gc.get_freeze_count()), encoding="utf-8")
                request.unlink()
            for request in sorted(control.glob("gc-*")):
                name = request.name.split("-", 1)[1]
                (control / f"gcstats-{name}.tmp").write_text(json.dumps(timer.stats()), encoding="utf-8")
                (control / f"gcstats-{name}.tmp").replace(control / f"gcstats-{name}")
                timer.reset()
                request.unlink()
            time.sleep(POLL_S)

    threading.Thread(target=watch, daemon=True, name="probe").start()
    from chatserver.cli import main as broker_main  # noqa: PLC0415

    return broker_main(argv)


# --- the coordinating side ---------------------------------------------------------------------------------


class ProbedChatServer(ChatServer):
    name = "chat-probed"

    def __init__(self, workdir: Path, template: Path, trace_frames: int = 0, lean: bool = False) -> None:
        super().__init__(workdir, template, LEAN_CONFIG if lean else "")
        self.control = workdir / "probe"
        self.control.mkdir(exist_ok=True)
        self._trace_frames = trace_frames

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.probe", "--serve", str(self.control), "--trace", str(self._trace_frames),
                "--", "run", *self.run_args()]

    def _ask(self, request: str, answer: str, timeout: float) -> Path:
        (self.control / request).touch()
        target = self.control / answer
        deadline = time.monotonic() + timeout
        while not target.exists():
            if time.monotonic() > deadline or not self.alive():
                raise BenchError(f"no {answer} from the broker: {self.log_tail()}")
            time.sleep(POLL_S)
        return target

    def snapshot(self, name: str) -> tracemalloc.Snapshot:
        return tracemalloc.Snapshot.load(str(self._ask(f"take-{name}", f"snap-{name}", 300)))

    def freeze(self, name: str) -> int:
        return int(self._ask(f"freeze-{name}", f"frozen-{name}", 60).read_text())

    def gc_stats(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._ask(f"gc-{name}", f"gcstats-{name}", 60).read_text())
        return data


def _short(path: str) -> str:
    for marker in ("site-packages/", f"{REPO}/", "python3.11/"):  # any checkout, not only /work/main
        if marker in path:
            return path.split(marker, 1)[1]
    return path


OUR_PACKAGES = ("chatproto", "client_sdk", "broker", "bridge", "storage", "chatserver")


def _owner(trace: tracemalloc.Traceback) -> str:
    """The innermost frame of amqtt or of this project, else the innermost frame."""
    frames = list(trace)  # oldest call first (Python >= 3.7)
    for frame in reversed(frames):
        name = frame.filename
        if "site-packages/amqtt/" in name or any(f"/{p}/" in name for p in OUR_PACKAGES):
            return f"{_short(name)}:{frame.lineno}"
    return f"{_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def memory_diff(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int) -> dict[str, Any]:
    by_line = after.compare_to(before, "lineno")
    owners: dict[str, int] = {}
    for stat in after.compare_to(before, "traceback"):
        if stat.size_diff:
            key = _owner(stat.traceback)
            owners[key] = owners.get(key, 0) + stat.size_diff
    total = sum(s.size_diff for s in by_line)
    return {
        "connections": count, "total_bytes_per_connection": round(total / count, 1),
        "by_line": [(f"{_short(s.traceback[-1].filename)}:{s.traceback[-1].lineno}", round(s.size_diff / count, 1),
                     round(s.count_diff / count, 2)) for s in by_line[:30]],
        "by_owner": sorted(((k, round(v / count, 1)) for k, v in owners.items()), key=lambda kv: -kv[1])[:30],
    }


def _connect(gen: LoadGen, server: ChatServer, sources: Sources, users: list[str]) -> None:
    chunks = [(w, users[k::len(IDLE_WORKERS)]) for k, w in enumerate(IDLE_WORKERS)]
    chunks = [(w, chunk) for w, chunk in chunks if chunk]
    gen.call([w for w, _ in chunks], "connect_idle",
             [{"dialect": "chat", "host": server.host, "port": server.port, "users": chunk,
               "sources": sources.take(len(chunk)), "per_source": PER_SOURCE, "keepalive": 60, "parallel": 4}
              for _, chunk in chunks],
             timeout=3600)


def run_memory(idle: int, frames: int, workdir: Path, lean: bool) -> dict[str, Any]:
    template = workdir / "users-template"
    make_template(template, [idle_user(i) for i in range(idle)])
    server = ProbedChatServer(workdir, template, frames, lean)
    server.fresh_data()
    gen = LoadGen(4)
    sources = Sources()
    try:
        server.start()
        # One connection first, so that one-time costs (imports, caches) are not counted per connection.
        gen.call([IDLE_WORKERS[0]], "connect_idle", [{"dialect": "chat", "host": server.host, "port": server.port,
                                                      "users": [idle_user(0)], "sources": sources.take(1),
                                                      "per_source": PER_SOURCE, "keepalive": 60}], timeout=120)
        time.sleep(1.0)
        before = server.snapshot("before")
        rss_before = server.rss_kib() or 0
        print(f"connecting {idle - 1:,} idle users to the traced broker ...", flush=True)
        _connect(gen, server, sources, [idle_user(i) for i in range(1, idle)])
        time.sleep(2.0)
        rss_after = server.rss_kib() or 0
        after = server.snapshot("after")
    finally:
        gen.close()
        server.stop()
    return {"rss_kib_per_connection": round((rss_after - rss_before) / (idle - 1), 1), "lean_sessions": lean,
            "diff": memory_diff(before, after, idle - 1)}


def memory_md(result: dict[str, Any]) -> str:
    d = result["diff"]
    path = "the lean path (`mqtt.lean_sessions`)" if result.get("lean_sessions") else "amqtt's path"
    lines = ["# Broker memory per idle connection, by allocation site (tracemalloc)", "",
             f"`{result['command']}` on {machine_line(result['machine'])}.", "",
             f"{d['connections']:,} idle users connected (device-token login, SUBSCRIBE `u/{{me}}/in`), on"
             f" {path}. Python"
             f" allocations grew by **{d['total_bytes_per_connection'] / 1024:.1f} KiB per connection**; RSS grew by"
             f" {result['rss_kib_per_connection']:.1f} KiB per connection in this run (tracemalloc's own bookkeeping"
             " included; see idle.md for RSS without it).", "", "## By the innermost frame of amqtt or this project",
             ""]
    lines += md_table(["bytes per connection", "allocated under"],
                      [[size, f"`{owner}`"] for owner, size in d["by_owner"] if size > 0], "rl")
    lines += ["", "## By source line (where the objects were created)", ""]
    lines += md_table(["bytes per connection", "objects per connection", "line"],
                      [[size, objs, f"`{line}`"] for line, size, objs in d["by_line"] if size > 0], "rrl")
    return "\n".join(lines) + "\n"


def run_gc(idle: int, workdir: Path, size: str) -> dict[str, Any]:
    sizes = SIZES[size]
    suite = Suite(sizes, workdir, RESULTS, ["chat"])
    template = workdir / "users-template"
    names = [idle_user(i) for i in range(idle)] + [u for i in range(sizes.pairs) for u in pair_users(i)]
    make_template(template, names)
    suite._template = template
    server = ProbedChatServer(workdir, template)
    server.fresh_data()
    runs = []
    try:
        server.start()
        suite.connect_pairs(server)
        for level, freeze in ((0, False), (idle, False), (idle, True)):
            if level and not freeze:
                suite.connect_idle(server, 0, level)
            frozen = server.freeze(f"idle{level}") if freeze else 0
            server.gc_stats(f"reset{level}{freeze}")
            phase = suite.run_pairs(server, "max")
            stats = server.gc_stats(f"idle{level}{freeze}")
            runs.append({"idle": level, "frozen": frozen, "msgs_per_s": phase["msgs_per_s"],
                         "broker_cpu": phase["cpu_cores"], "deliver_p99_ms": phase["deliver"].get("p99_ms"),
                         "gc": stats})
            share = sum(stats["total_s"]) / stats["seconds"]
            print(f"  idle {level:,}{' after gc.freeze()' if freeze else ''}: {phase['msgs_per_s']:,.0f} msg/s;"
                  f" GC {100 * share:.1f}% of the run; gen2 {stats['count'][2]} x, max"
                  f" {1000 * stats['max_s'][2]:.0f} ms; {stats['objects']:,} objects", flush=True)
    finally:
        suite.disconnect_all()
        suite.close()
        server.stop()
    return {"runs": runs, "pairs": sizes.pairs, "inflight": sizes.inflight}


def gc_md(result: dict[str, Any]) -> str:
    lines = ["# Garbage collection in the broker under load", "",
             f"`{result['command']}` on {machine_line(result['machine'])}.", "",
             f"{result['pairs']} pairs at the highest rate (closed loop), first with no idle users, then with idle"
             " users connected. Collections timed in the broker process with `gc.callbacks` over the whole run"
             " (warm-up, measurement and drain). The last row is an experiment, not the product: the probe called"
             " `gc.freeze()` in the broker once the idle users were connected, moving their objects out of the"
             " collector's scans; it shows what a fix of the collector's cost would gain.", ""]
    rows = []
    for r in result["runs"]:
        g = r["gc"]
        rows.append([f"{r['idle']:,}" + (f" + gc.freeze() ({r['frozen']:,} objects frozen)" if r.get("frozen") else ""),
                     r["msgs_per_s"], (r["broker_cpu"] or {}).get("broker"), r["deliver_p99_ms"],
                     g["objects"], g["count"][0], g["count"][1], g["count"][2], 1000 * g["total_s"][2],
                     1000 * g["max_s"][2], 100 * sum(g["total_s"]) / g["seconds"]])
    lines += md_table(["idle users", "msg/s", "broker CPU", "deliver p99 ms", "tracked objects", "gen0 runs",
                       "gen1 runs", "gen2 runs", "gen2 total ms", "gen2 longest ms", "GC share of run %"], rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        control, frames = Path(argv[1]), int(argv[3])
        return serve(argv[5:], control, frames)
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["memory", "gc"])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8, help="tracemalloc frames kept (memory)")
    parser.add_argument("--quick", action="store_true", help="shorter runs (gc)")
    parser.add_argument("--lean", action="store_true",
                        help="memory: the broker with mqtt.lean_sessions (results: probe-memory-lean.*)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    raise_fd_limit(args.idle + 1000)
    workdir = Path(tempfile.mkdtemp(prefix="chat-probe-"))
    command = "python -m bench.probe " + " ".join(argv)
    try:
        if args.what == "memory":
            result = {"command": command, "machine": machine_info(),
                      **run_memory(args.idle, args.frames, workdir, args.lean)}
            text = memory_md(result)
        else:
            result = {"command": command, "machine": machine_info(),
                      **run_gc(args.idle, workdir, "quick" if args.quick else "full")}
            text = gc_md(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stem = f"probe-{args.what}" + ("-lean" if args.lean and args.what == "memory" else "")
    write_text_atomic(args.out / f"{stem}.md", text)
    write_text_atomic(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
