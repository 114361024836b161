"""``python -m bench logins``: device-token logins per second, and the broker's CPU per login.

A login is what a phone does when it reconnects: a new TCP connection, CONNECT with its device
token, CONNACK, SUBSCRIBE ``u/{me}/in``, SUBACK. ``--logins`` users (full 10,000) log in at once,
``PARALLEL`` at a time in each of the generator's 4 processes (a login that completes starts the
next; ``Worker.cmd_run_logins``), over fresh loopback source addresses. The CONNECT packets and the
tokens are made before the window (``cmd_prepare_logins``): the window measures the broker, and the
generator's CPU in it is reported. Then every connection closes, the broker settles, and the same
users log in again: ``ROUNDS`` rounds per broker (the first on a cold users database page cache), then one
more with SUBSCRIBE sent with the CONNECT (``pipelined``: MQTT 3.1.4 allows it; the broker then answers
CONNACK and SUBACK in one write), to show what the packets' round trips cost the broker.

Per round: logins/s to the last CONNACK and to the last SUBACK, latency of one login (TCP connect
-> CONNACK, -> SUBACK), CPU in cores of the broker, the generator and everything else over the
window, and the broker's CPU per login (its utime + stime over the window / logins).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchError, CpuMeter, md_table, summarise
from bench.loadgen import samples
from bench.profiling import Profiler
from bench.report import TARGET_LOGINS_PER_S, header, log_problems_md
from bench.suite import PER_SOURCE, WORKERS, Suite, idle_user

TARGETS = ("chat-amqtt", "chat-lean")  # both chat paths, pinned whatever the default
PARALLEL = 64  # logins in flight per generator process
ROUNDS = 3
SETTLE_S = 3.0  # after closing a round's connections: the broker ends their sessions before the next


def run(suite: Suite) -> dict[str, Any]:
    count = suite.sizes.logins
    rounds = ROUNDS if suite.sizes.name != "tiny" else 1
    results = {name: _one(suite, name, count, rounds) for name in suite.targets}
    return {"logins": count, "parallel_per_process": PARALLEL, "processes": WORKERS, "targets": results}


def _one(suite: Suite, name: str, count: int, rounds: int) -> dict[str, Any]:
    server = suite.server(name)
    gen = suite.gen()
    suite.log(f"[logins] {server.label}: starting ...")
    server.start()
    users = [idle_user(i) for i in range(count)]
    chunks = [users[k::WORKERS] for k in range(WORKERS)]
    phases: list[dict[str, Any]] = []
    try:
        time.sleep(2.0)
        for number in range(1, rounds + 2):
            pipelined = number > rounds
            gen.call(range(WORKERS), "prepare_logins",
                     [{"dialect": server.dialect, "users": chunk, "sources": suite.sources.take(len(chunk)),
                       "per_source": PER_SOURCE, "keepalive": suite.sizes.keepalive} for chunk in chunks], timeout=120)
            profiler = None
            if suite.profile and server.name.startswith("chat"):
                profiler = Profiler(server.pid, suite.out_dir / "profiles" / f"logins-{name}-{number}.txt")
                profiler.start()
            meter = CpuMeter(suite.cpu_groups(server))
            started = time.monotonic()
            answers = gen.call(range(WORKERS), "run_logins",
                               [{"dialect": server.dialect, "host": server.host, "port": server.port,
                                 "parallel": PARALLEL, "pipelined": pipelined}] * WORKERS, timeout=600)
            wall = time.monotonic() - started
            cpu = meter.cores()
            profile = profiler.stop() if profiler is not None else None
            phase = _phase(number, answers, cpu, wall)
            phase["pipelined"] = pipelined
            if profile is not None:
                phase["profile"] = profile
            phases.append(phase)
            how = " (SUBSCRIBE pipelined)" if pipelined else ""
            suite.log(f"  round {number}{how}: {phase['logins']:,} logins, {phase['logins_per_s']:,.0f}/s to CONNACK,"
                      f" {phase['ready_per_s']:,.0f}/s to SUBACK; broker {cpu.get('broker')} cores"
                      f" ({phase['broker_us_per_login']} µs per login), generator {cpu.get('generator')},"
                      f" other {cpu.get('others')}; failures {phase['failures']}")
            suite.disconnect_all()
            time.sleep(SETTLE_S)
            if not server.alive():
                raise BenchError(f"{server.name} died: {server.log_tail()}")
    finally:
        problems = suite.finish(server)
    return {"label": server.label, "phases": phases, "broker_log_problems": problems}


def _phase(number: int, answers: list[dict[str, Any]], cpu: dict[str, float | None], wall: float) -> dict[str, Any]:
    logins = sum(a["logins"] for a in answers)
    start = min(a["started"] for a in answers)
    to_connack = max(a["last_connack"] for a in answers) - start
    to_ready = max(a["last_ready"] for a in answers) - start
    connack_ms, ready_ms = [], []
    for a in answers:
        connack_ms += samples(a["connack_ms"]).tolist()
        ready_ms += samples(a["ready_ms"]).tolist()
    broker = cpu.get("broker")
    return {
        "round": number, "logins": logins, "failures": sum(a["failures"] for a in answers),
        "failure_samples": [s for a in answers for s in a["failure_samples"]][:3],
        "seconds_to_connack": round(to_connack, 3), "seconds_to_suback": round(to_ready, 3),
        "logins_per_s": round(logins / to_connack, 1) if to_connack > 0 else None,
        "ready_per_s": round(logins / to_ready, 1) if to_ready > 0 else None,
        "connack": summarise(connack_ms), "suback": summarise(ready_ms),
        "metered_s": round(wall, 3), "cpu_cores": cpu,
        # The meter's window is the coordinator's (a few ms of pipe latency longer than the logins).
        "broker_us_per_login": round(broker * wall / logins * 1e6, 1) if broker is not None and logins else None,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = header(result, "Logins with device tokens", (
        f"{result['logins']:,} users log in at once, each on a new TCP connection (CONNECT with the device token,"
        " CONNACK, SUBSCRIBE `u/{me}/in`, SUBACK), from"
        f" {result['processes']} generator processes with {result['parallel_per_process']} logins in flight each; the"
        " CONNECT packets are made before the window. Then every connection closes and the same users log in again;"
        " the last round (*p*) sends SUBSCRIBE with the CONNECT instead of after the CONNACK (MQTT 3.1.4 allows"
        " it), so the broker answers both in one write."
        " Logins/s: logins / (last CONNACK - first connect). Broker CPU per login: its CPU over the window / logins."
        f" CPU in cores over the window: broker, generator, other processes (noise). Target (#20): >="
        f" {TARGET_LOGINS_PER_S:,}/s."))
    rows = []
    for t in result["targets"].values():
        for p in t["phases"]:
            c = p["cpu_cores"]
            number = f"{p['round']}{'p' if p.get('pipelined') else ''}"
            rows.append([t["label"], number, p["logins"], p["logins_per_s"], p["ready_per_s"],
                         p["connack"].get("p50_ms"), p["connack"].get("p99_ms"), p["suback"].get("p99_ms"),
                         c.get("broker"), p["broker_us_per_login"], c.get("generator"), c.get("others"),
                         p["failures"]])
    lines += md_table(["broker", "round", "logins", "logins/s (CONNACK)", "sessions/s (SUBACK)",
                       "CONNACK p50 ms", "CONNACK p99 ms", "SUBACK p99 ms", "broker CPU", "broker µs per login",
                       "generator CPU", "other CPU", "failures"], rows)
    lines += log_problems_md({t["label"]: t.get("broker_log_problems") for t in result["targets"].values()})
    return "\n".join(lines) + "\n"
