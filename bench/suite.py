"""The scenarios of ``python -m bench``: what each measures, and how.

compare  (scenarios 1-3 and the baselines) For each broker (ours, plain amqtt,
         mosquitto) in turn: N online pairs, then for each idle level (0, 1,000,
         10,000 idle connected users) a closed-loop run at the highest rate the
         broker sustains (each pair keeps ``inflight`` messages on the way) and
         open-loop runs at fixed offered loads (500, 2,000 msg/s). Latency is
         publish -> recipient's receipt (and -> ``sent`` / PUBACK).
idle     (scenario 5) Connect 10,000 idle authenticated users, then as many as
         the file-descriptor limit allows; broker RSS per connection and CPU at
         rest (keepalive 60 s, PINGREQ like paho) for each broker.
drain    (scenario 4) 100,000 messages staged for one offline device (ours only);
         time from connect until all are received and acked.
restart  (scenario 6) The same staged, then SIGKILL; time until the broker is
         ready, serves the first item, and has delivered everything (from disk).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BenchError, CpuMeter, fd_hard_limit, rss_kib, summarise
from bench.loadgen import LoadGen, samples
from bench.profiling import Profiler
from bench.targets import AmqttPathChatServer, AmqttServer, ChatServer, LeanChatServer, MosquittoServer, Server
from bench.users import make_template

PAIR_WORKERS = (0, 1)
IDLE_WORKERS = (2, 3)
WORKERS = 4
PER_SOURCE = 5000  # connections per source address (ephemeral ports: 28,000 per address)
FD_RESERVE = 300  # descriptors the broker needs besides client sockets (listeners, databases, logs)


@dataclass(frozen=True)
class Sizes:
    name: str
    pairs: int
    inflight: int
    idle_levels: list[int]
    rates: list[int]
    warmup_s: float
    measure_s: float
    drain_messages: int
    idle_counts: list[int]  # -1: as many as the descriptor limit allows
    rest_s: float
    logins: int  # users logging in at once (bench/logins.py)
    body_bytes: int = 100
    keepalive: int = 60
    stage_window: int = 1000


SIZES = {
    "full": Sizes("full", pairs=100, inflight=2, idle_levels=[0, 1000, 10000], rates=[500, 2000], warmup_s=3,
                  measure_s=10, drain_messages=100_000, idle_counts=[10000, -1], rest_s=65,
                  logins=10_000),
    "quick": Sizes("quick", pairs=50, inflight=2, idle_levels=[0, 1000], rates=[500, 2000], warmup_s=2,
                   measure_s=5, drain_messages=10_000, idle_counts=[2000], rest_s=10,
                   logins=5000),
    "tiny": Sizes("tiny", pairs=4, inflight=4, idle_levels=[0, 20], rates=[200], warmup_s=0.5, measure_s=1.5,
                  drain_messages=300, idle_counts=[50], rest_s=1.5, logins=100,
                  stage_window=100),
}

TARGETS = ("chat", "amqtt", "mosquitto")
# By name only (--targets): ours with mqtt.lean_sessions pinned on or off (``chat`` follows the default, on).
MORE_TARGETS = ("chat-lean", "chat-amqtt")
CHAT_KINDS: dict[str, type[ChatServer]] = {"chat": ChatServer, "chat-lean": LeanChatServer,
                                           "chat-amqtt": AmqttPathChatServer}


def idle_user(i: int) -> str:
    return f"i{i:06d}"


def pair_users(i: int) -> tuple[str, str]:
    return f"pa{i:04d}", f"pb{i:04d}"


DRAIN_USERS = ("drain_s", "drain_r")
RESTART_USERS = ("restart_s", "restart_r")


def max_idle() -> int:
    """Idle connections one broker process can hold: its descriptor limit, minus a reserve."""
    return fd_hard_limit() - FD_RESERVE


class Sources:
    """Fresh loopback source addresses (127.x.y.z), so that no run inherits another's TIME_WAIT ports."""

    def __init__(self) -> None:
        self._next = 0

    def take(self, connections: int) -> list[str]:
        count = max(1, -(-connections // PER_SOURCE))
        out = []
        for _ in range(count):
            n = self._next
            self._next += 1
            out.append(f"127.{1 + n // 62500 % 250}.{n // 250 % 250}.{2 + n % 250}")
        return out


class WindowMeter:
    """CPU over the measurement window only (it starts after the warm-up, on a timer)."""

    def __init__(self, groups: dict[str, list[int]], start_after: float, length: float,
                 counters: Callable[[], dict[str, float]] | None = None) -> None:
        self.result: dict[str, float | None] = {}
        self.counters: dict[str, float] = {}  # ``counters()`` at the end minus at the start (e.g. Redis INFO)
        self._meter: CpuMeter | None = None
        self._groups = groups
        self._read_counters = counters
        self._counters_start: dict[str, float] = {}
        self._timers = [threading.Timer(start_after, self._start), threading.Timer(start_after + length, self._end)]
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def _start(self) -> None:
        if self._read_counters is not None:
            self._counters_start = self._read_counters()
        self._meter = CpuMeter(self._groups)

    def _end(self) -> None:
        if self._meter is not None:
            self.result = self._meter.cores()
            if self._read_counters is not None:
                end = self._read_counters()
                self.counters = {key: end[key] - self._counters_start.get(key, 0.0) for key in end}

    def finish(self) -> dict[str, float | None]:
        # Both timers fire during a phase (it lasts warm-up + measurement + drain);
        # a phase that failed early cancels them and leaves {}.
        self._timers[1].join(2.0)
        for timer in self._timers:
            timer.cancel()
        return self.result


@dataclass
class Suite:
    sizes: Sizes
    workdir: Path
    out_dir: Path
    targets: Sequence[str] = TARGETS
    profile: bool = False
    log: Callable[[str], None] = print
    _gen: LoadGen | None = None
    _template: Path | None = None
    sources: Sources = field(default_factory=Sources)
    # More processes to meter in each measured window (e.g. {"redis": pids}), and counters read at
    # its start and end (their deltas go into the phase as ``counters``): the scale scenario's Redis.
    extra_cpu_groups: dict[str, list[int]] = field(default_factory=dict)
    window_counters: Callable[[], dict[str, float]] | None = None

    # --- setup -----------------------------------------------------------------------

    def idle_total(self) -> int:
        counts = [*self.sizes.idle_levels, *self.sizes.idle_counts, self.sizes.logins]
        return max(max_idle() if c < 0 else c for c in counts)

    def template(self) -> Path:
        if self._template is None:
            path = self.workdir / "users-template"
            names = [idle_user(i) for i in range(self.idle_total())]
            for i in range(self.sizes.pairs):
                names += pair_users(i)
            names += [*DRAIN_USERS, *RESTART_USERS]
            self.log(f"bench setup: writing {len(names):,} users with one shared password hash and device tokens"
                     " (bench/users.py) ...")
            took = make_template(path, names)
            self.log(f"  done in {took:.1f} s")
            self._template = path
        return self._template

    def gen(self) -> LoadGen:
        if self._gen is None:
            self.log(f"starting the load generator: {WORKERS} worker processes ...")
            self._gen = LoadGen(WORKERS)
        return self._gen

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def server(self, name: str, extra_config: str = "") -> Server:
        if (kind := CHAT_KINDS.get(name)) is not None:
            server = kind(self.workdir, self.template(), extra_config)
            server.fresh_data()
            return server
        if name == "amqtt":
            return AmqttServer(self.workdir)
        if name == "mosquitto":
            return MosquittoServer(self.workdir)
        raise BenchError(f"unknown target {name!r}")

    def cpu_groups(self, server: Server) -> dict[str, list[int]]:
        return {"broker": server.pids(), "generator": list(self.gen().pids), **self.extra_cpu_groups}

    # --- connections ---------------------------------------------------------------------

    def connect_idle(self, server: Server, first: int, last: int) -> float:
        """Idle users ``first..last-1`` connect (spread over the idle workers); returns seconds."""
        if last <= first:
            return 0.0
        gen = self.gen()
        users = [idle_user(i) for i in range(first, last)]
        chunks = [users[k::len(IDLE_WORKERS)] for k in range(len(IDLE_WORKERS))]
        args = []
        for chunk in chunks:
            args.append({"dialect": server.dialect, "host": server.host, "port": server.port, "users": chunk,
                         "sources": self.sources.take(len(chunk)), "per_source": PER_SOURCE,
                         "keepalive": self.sizes.keepalive})
        started = time.monotonic()
        last_print = [started]

        def progress(state: dict[int, Any]) -> None:
            now = time.monotonic()
            if now - last_print[0] >= 3.0:
                last_print[0] = now
                done = sum(state.values())
                rate = done / (now - started)
                self.log(f"    {first + done:,}/{last:,} connected ({rate:,.0f}/s,"
                         f" ~{(last - first - done) / max(rate, 1):.0f} s left)")

        self.log(f"  connecting idle users {first:,}..{last:,} to {server.label} ...")
        profiler = None
        if self.profile and server.name == "chat":
            profiler = Profiler(server.pid, self.out_dir / "profiles" / f"connect-{first}-{last}.txt")
            profiler.start()
        try:
            gen.call(IDLE_WORKERS, "connect_idle", args, timeout=1800, on_progress=progress)
        finally:
            if profiler is not None:
                profiler.stop()
        took = time.monotonic() - started
        if not server.alive():
            raise BenchError(f"{server.name} died while connecting idle users: {server.log_tail()}")
        self.log(f"    {last - first:,} connected in {took:.1f} s ({(last - first) / took:,.0f}/s)")
        return took

    def connect_pairs(self, server: Server) -> None:
        gen = self.gen()
        pairs = [pair_users(i) for i in range(self.sizes.pairs)]
        args = [{"dialect": server.dialect, "host": server.host, "port": server.port,
                 "pairs": pairs[k::len(PAIR_WORKERS)], "source": self.sources.take(1)[0],
                 "body_bytes": self.sizes.body_bytes, "keepalive": self.sizes.keepalive}
                for k in range(len(PAIR_WORKERS))]
        gen.call(PAIR_WORKERS, "connect_pairs", args, timeout=600)

    def disconnect_all(self) -> None:
        if self._gen is not None:
            self._gen.call(range(WORKERS), "close_all", [{}] * WORKERS, timeout=120)

    # --- one measured run of the pairs --------------------------------------------------------

    def run_pairs(self, server: Server, mode: str, rate: float = 0.0, tag: str = "") -> dict[str, Any]:
        sizes = self.sizes
        gen = self.gen()
        per_worker_rate = rate / len(PAIR_WORKERS)
        args = [{"mode": mode, "warmup_s": sizes.warmup_s, "measure_s": sizes.measure_s,
                 "inflight": sizes.inflight, "rate": per_worker_rate} for _ in PAIR_WORKERS]
        meter = WindowMeter(self.cpu_groups(server), sizes.warmup_s, sizes.measure_s, self.window_counters)
        profiler = None
        if self.profile and server.name == "chat" and tag:
            profiler = Profiler(server.pid, self.out_dir / "profiles" / f"{tag}.txt")
            profiler.start()
        try:
            results = gen.call(PAIR_WORKERS, "run_pairs", args, timeout=sizes.warmup_s + sizes.measure_s + 120)
        finally:
            profile = profiler.stop() if profiler is not None else None
        cpu = meter.finish()
        deliver = [v for r in results for v in samples(r["deliver_ms"])]
        sent = [v for r in results for v in samples(r["sent_ms"])]
        puback = [v for r in results for v in samples(r["puback_ms"])]
        lag = [v for r in results for v in samples(r["lag_ms"])]
        delivered = sum(r["delivered_in_window"] for r in results)
        phase: dict[str, Any] = {
            "mode": mode, "offered_per_s": rate if mode == "rate" else None,
            "msgs_per_s": round(delivered / sizes.measure_s, 1),
            "published_in_window": sum(r["published_in_window"] for r in results),
            "delivered_in_window": delivered,
            "deliver": summarise(deliver), "sent": summarise(sent), "puback": summarise(puback),
            "generator_lag": summarise(lag) if lag else None,
            "saturated": any(r["saturated"] for r in results), "skipped": sum(r["skipped"] for r in results),
            "lost_or_late": sum(r["lost_or_late"] for r in results),
            "missing_sent": sum(r["missing_sent"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results), "errors": sum(r["errors"] for r in results),
            "error_samples": [e for r in results for e in r["error_samples"]][:5],
            "cpu_cores": cpu, "broker_rss_kib": server.rss_kib(),
        }
        if meter.counters:
            phase["counters"] = meter.counters
        if profile is not None:
            phase["profile"] = profile
        return phase

    def _print_phase(self, label: str, p: dict[str, Any]) -> None:
        d, s = p["deliver"], p["sent"] if p["sent"].get("count") else p["puback"]
        cpu = p["cpu_cores"]
        extra = " SATURATED" if p["saturated"] else ""
        if p["errors"] or p["lost_or_late"]:
            extra += f" errors={p['errors']} lost/late={p['lost_or_late']}"
        self.log(f"    {label}: {p['msgs_per_s']:,.0f} msg/s  deliver p50 {d.get('p50_ms', 0):.2f} p99"
                 f" {d.get('p99_ms', 0):.2f} p99.9 {d.get('p999_ms', 0):.2f} ms  ack/sent p99 {s.get('p99_ms', 0):.2f}"
                 f" ms  cpu broker {cpu.get('broker')} gen {cpu.get('generator')} other {cpu.get('others')}{extra}")

    def finish(self, server: Server) -> dict[str, Any]:
        """After a target's phases (or their failure): clients gone, broker stopped; its logged problems."""
        with contextlib.suppress(BenchError):
            self.disconnect_all()
        code = server.stop()
        self.log(f"  {server.label} stopped (exit code {code})")
        return self._log_problems(server)

    def _log_problems(self, server: Server) -> dict[str, Any]:
        problems = server.log_problems()
        if problems["count"]:
            self.log(f"  {server.label} logged {problems['count']} warning/error line(s), e.g.:")
            for line in problems["first"][:3]:
                self.log(f"    {line}")
        return problems

    # --- scenario: compare (1, 2, 3 and baselines) --------------------------------------------------

    def compare(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name in self.targets:
            results[name] = self._compare_one(name)
        return {"targets": results}

    def _compare_one(self, name: str) -> dict[str, Any]:
        sizes = self.sizes
        server = self.server(name)
        self.log(f"[compare] {server.label}: starting ...")
        server.start()
        phases: list[dict[str, Any]] = []
        connected = 0
        try:
            self.connect_pairs(server)
            self.log(f"  {sizes.pairs} pairs online on {server.label} (port {server.port}, pid {server.pid})")
            for level in sizes.idle_levels:
                self.connect_idle(server, connected, level)
                connected = level
                rss_idle = server.rss_kib()
                top = self.run_pairs(server, "max", tag=f"throughput-idle{level}")
                top["idle"] = level
                top["rss_before_kib"] = rss_idle
                phases.append(top)
                self._print_phase(f"idle {level:,} max", top)
                for rate in sizes.rates:
                    if rate > 1.1 * top["msgs_per_s"]:
                        phases.append({"mode": "rate", "offered_per_s": rate, "idle": level,
                                       "not_run": f"above the sustained rate ({top['msgs_per_s']:.0f}/s)"})
                        self.log(f"    idle {level:,} @ {rate}/s: not run (above the sustained rate)")
                        continue
                    phase = self.run_pairs(server, "rate", rate, tag=f"rate{rate}-idle{level}")
                    phase["idle"] = level
                    phases.append(phase)
                    self._print_phase(f"idle {level:,} @ {rate}/s", phase)
                if not server.alive():
                    raise BenchError(f"{server.name} died: {server.log_tail()}")
        finally:
            problems = self.finish(server)
        return {"label": server.label, "dialect": server.dialect, "pairs": sizes.pairs, "phases": phases,
                "broker_log_problems": problems}

    # --- scenario: idle connections (5) -----------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name in self.targets:
            results[name] = self._idle_one(name)
        return {"targets": results}

    def _idle_one(self, name: str) -> dict[str, Any]:
        sizes = self.sizes
        server = self.server(name)
        self.log(f"[idle] {server.label}: starting ...")
        server.start()
        steps: list[dict[str, Any]] = []
        connected = 0
        try:
            time.sleep(2.0)  # let start-up work settle before the baseline
            base = server.rss_kib() or 0
            meter = CpuMeter(self.cpu_groups(server))
            time.sleep(min(sizes.rest_s, 5.0))
            base_cpu = meter.cores()
            self.log(f"  at start: RSS {base / 1024:.0f} MiB, CPU {base_cpu.get('broker')} cores")
            for wanted in sizes.idle_counts:
                count = max_idle() if wanted < 0 else wanted
                if count <= connected:
                    continue
                previous = connected
                took = self.connect_idle(server, connected, count)
                connected = count
                time.sleep(3.0)
                rss = server.rss_kib() or 0
                self.log(f"  {count:,} idle: RSS {rss / 1024:.0f} MiB ({(rss - base) / count:.1f} KiB per connection);"
                         f" measuring CPU at rest for {sizes.rest_s:.0f} s ...")
                profiler = None
                if self.profile and name == "chat":
                    profiler = Profiler(server.pid, self.out_dir / "profiles" / f"rest-idle{count}.txt")
                    profiler.start()
                meter = CpuMeter(self.cpu_groups(server))
                time.sleep(sizes.rest_s)
                cpu = meter.cores()
                profile = profiler.stop() if profiler is not None else None
                rss_after = server.rss_kib() or 0
                step: dict[str, Any] = {
                    "idle": count, "connect_s": round(took, 1),
                    "connect_per_s": round((count - previous) / took, 1) if took else None,
                    "rss_kib": rss, "rss_after_rest_kib": rss_after, "rss_base_kib": base,
                    "kib_per_connection": round((rss - base) / count, 2), "cpu_rest": cpu,
                }
                if profile is not None:
                    step["profile"] = profile
                steps.append(step)
                self.log(f"    at rest: broker {cpu.get('broker')} cores, RSS after {rss_after / 1024:.0f} MiB")
                if not server.alive():
                    raise BenchError(f"{server.name} died: {server.log_tail()}")
        finally:
            problems = self.finish(server)
        return {"label": server.label, "base_rss_kib": base, "base_cpu": base_cpu, "keepalive_s": sizes.keepalive,
                "steps": steps, "broker_log_problems": problems}

    # --- scenarios: offline drain (4) and restart (6) ----------------------------------------------------

    def stage_offline(self, server: Server, sender: str, recipient: str) -> dict[str, Any]:
        sizes = self.sizes
        n = sizes.drain_messages
        self.log(f"  staging {n:,} messages {sender} -> {recipient} (offline) ...")
        last = [time.monotonic()]

        def progress(state: dict[int, Any]) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                self.log(f"    {sum(state.values()):,}/{n:,} staged ('sent' received)")

        meter = CpuMeter(self.cpu_groups(server))
        (result,) = self.gen().call([PAIR_WORKERS[0]], "stage", [{
            "host": server.host, "port": server.port, "sender": sender, "recipient": recipient, "count": n,
            "window": sizes.stage_window, "body_bytes": sizes.body_bytes, "keepalive": sizes.keepalive}],
            timeout=1800, on_progress=progress)
        result["cpu_cores"] = meter.cores()
        result["broker_rss_kib"] = server.rss_kib()
        self.log(f"    staged in {result['seconds']:.1f} s ({result['rate']:,.0f} msg/s until 'sent')")
        return result

    def _drain(self, server: Server, recipient: str, retry_s: float = 0.0, tag: str = "") -> dict[str, Any]:
        n = self.sizes.drain_messages
        last = [time.monotonic()]

        def progress(state: dict[int, Any]) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                self.log(f"    {sum(state.values()):,}/{n:,} received")

        profiler = None
        if self.profile and tag:
            profiler = Profiler(server.pid, self.out_dir / "profiles" / f"{tag}.txt")
            profiler.start()
        meter = CpuMeter(self.cpu_groups(server))
        try:
            (result,) = self.gen().call([PAIR_WORKERS[1]], "drain", [{
                "host": server.host, "port": server.port, "recipient": recipient, "expected": n,
                "timeout_s": 900.0, "keepalive": self.sizes.keepalive, "retry_s": retry_s}],
                timeout=1000, on_progress=progress)
        finally:
            profile = profiler.stop() if profiler is not None else None
        result["cpu_cores"] = meter.cores()
        result["rate"] = round(n / result["all_acked_s"], 1)
        if profile is not None:
            result["profile"] = profile
        return result

    def drain(self) -> dict[str, Any]:
        server = self.server("chat")
        self.log(f"[drain] {server.label}: starting ...")
        server.start()
        try:
            stage = self.stage_offline(server, *DRAIN_USERS)
            self.log(f"  {DRAIN_USERS[1]} connects and drains ...")
            drain = self._drain(server, DRAIN_USERS[1], tag="drain")
            self.log(f"    all {drain['received']:,} received and acked {drain['all_acked_s']:.2f} s after connect"
                     f" ({drain['rate']:,.0f} msg/s; first item after {drain['first_item_s']:.3f} s;"
                     f" order errors {drain['order_errors']}, duplicates {drain['duplicates']})")
        finally:
            with contextlib.suppress(BenchError):
                self.disconnect_all()
            server.stop()
            problems = self._log_problems(server)
        return {"messages": self.sizes.drain_messages, "body_bytes": self.sizes.body_bytes,
                "window": 64, "stage": stage, "drain": drain, "broker_log_problems": problems}

    def restart(self) -> dict[str, Any]:
        server = self.server("chat")
        self.log(f"[restart] {server.label}: starting ...")
        server.start()
        try:
            stage = self.stage_offline(server, *RESTART_USERS)
            db = Path(getattr(server, "data_dir", self.workdir)) / "staging.db"
            db_kib = sum(p.stat().st_size for p in db.parent.glob("staging.db*")) // 1024 if db.exists() else None
            rss_before = server.rss_kib()
            self.log("  SIGKILL, then start again on the same port and data directory ...")
            killed = time.monotonic()
            server.kill()
            ready_s = server.start()
            ready_at = time.monotonic() - killed
            rss_ready = server.rss_kib()
            self.log(f"    ready {ready_at:.2f} s after SIGKILL (process start to ready {ready_s:.2f} s)")
            drain = self._drain(server, RESTART_USERS[1], retry_s=30.0, tag="drain-after-restart")
            first = drain["first_item_s"]
            serving_at = ready_at + (first if first is not None else 0.0)
            self.log(f"    first staged item delivered {serving_at:.2f} s after SIGKILL; all {drain['received']:,}"
                     f" drained from disk in {drain['all_acked_s']:.2f} s ({drain['rate']:,.0f} msg/s)")
        finally:
            with contextlib.suppress(BenchError):
                self.disconnect_all()
            server.stop()
            problems = self._log_problems(server)
        return {"messages": self.sizes.drain_messages, "stage": stage, "staging_db_kib": db_kib,
                "broker_log_problems": problems,
                "rss_before_kill_kib": rss_before, "rss_at_ready_kib": rss_ready,
                "kill_to_ready_s": round(ready_at, 3), "process_start_to_ready_s": round(ready_s, 3),
                "kill_to_first_item_s": round(serving_at, 3), "drain": drain,
                "kill_to_all_delivered_s": round(ready_at + drain["all_acked_s"], 3)}


def sizes_dict(sizes: Sizes) -> dict[str, Any]:
    return asdict(sizes)


def generator_rss_kib(gen: LoadGen) -> int:
    return sum(v or 0 for v in (rss_kib(pid) for pid in gen.pids))
