"""Presence at scale: what 10,000 users heartbeating every 10 s cost the broker.

    python -m bench.presence [--users 10000] [--interval 10] [--duration 60]

1. Makes a data directory with ``--users`` heartbeating users plus the probes and
   a watcher (``bench.users``: one shared password hash, a device token per user),
   and starts the real broker (``python -m chatserver run``, the default presence
   settings: window 30 s, coalescing 1 s, last_seen batches every 5 s).
2. Connects every user as a phone would after its first login: device token,
   ``u/{me}/in`` subscribed, keepalive 600 s. Minimal asyncio MQTT clients in
   this process (one socket each, no threads).
3. Idle phase (``--idle-s``): everyone connected, nobody sending.
4. Baseline phase (``--baseline-s``): the same connections send MQTT PINGREQ at the
   heartbeat rate: the cost of any packet, answered by the MQTT layer alone.
5. Heartbeat phase: every user publishes ``u/{me}/hb {}`` (QoS 1) every
   ``--interval`` seconds, phases spread evenly (``users / interval`` heartbeats
   per second). After ``--warmup`` seconds (every user is online by then),
   ``--duration`` seconds are measured.
   In every phase:
   - broker CPU (utime + stime from /proc, in cores and as a share of the machine);
   - disk: commits to ``presence.db`` (a read-only connection polls
     ``PRAGMA data_version`` every 20 ms; it changes once per commit by another
     connection), and the broker's ``write_bytes`` from ``/proc/<pid>/io``
     (bytes it sent to the storage layer, all files);
   - event-loop stalls: the watcher sends a ``ping`` request every 100 ms and
     times it; the broker runs under ``gc-broker`` (below), which logs every
     garbage collection over 20 ms, so stalls can be attributed.
   In the heartbeat phase also:
   - state change -> watcher latency: ``--probes`` extra users each flip between
     foreground (``{}``) and ``{"state":"away"}`` every 2 s (more than the 1 s
     coalescing, so no item waits for it), and one watcher subscribed to all of
     them times each change from the publish to the arrival of its ``presence``
     item (one clock: both ends are in this process);
   - window expiry -> watcher latency: ``--probes`` more users heartbeat once each
     early in the phase; when their 30 s window runs out the watcher's item
     arrives; latency = arrival - (``last_seen`` + window), in wall-clock ms
     (broker and bench share the machine's clock).
6. Checks that the broker persisted a ``last_seen`` for every heartbeating user,
   stops it (SIGTERM), and writes bench/results/presence.{json,md}.

``python -m bench.presence gc-broker -m broker run ...`` runs the broker with a
``gc.callbacks`` hook that prints ``BENCH-GC-PAUSE <generation> <ms> <time>`` to
stderr for each collection over 20 ms (a measuring aid; the hook costs two clock
reads per collection).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    PINGREQ_BYTES,
    RESULTS,
    BenchError,
    CpuMeter,
    connect_packet,
    fmt,
    machine_info,
    machine_line,
    md_table,
    mqtt_str,
    packet,
    publish_parts,
    raise_fd_limit,
    rss_kib,
    split_packets,
    subscribe_packet,
    summarise,
    write_results,
)
from bench.targets import ChatServer
from bench.users import DEVICE, make_template, token_for

WINDOW_S = 30.0  # the broker's default presence.online_window_s, which this run uses
FLIP_EVERY_S = 2.0
CONNECT_PARALLEL = 48
KEEPALIVE_S = 600
REPLY_TIMEOUT_S = 30.0
perf = time.perf_counter


def heartbeater(i: int) -> str:
    return f"hb{i:05d}"


class Conn(asyncio.Protocol):
    """One MQTT 3.1.1 connection: token login, inbox subscribed, QoS 1 publishes; items go to ``on_item``."""

    def __init__(self, user: str, on_item: Callable[[Conn, dict[str, Any]], None] | None = None) -> None:
        self.user = user
        self.hb_topic = f"u/{user}/hb".encode()
        self.req_topic = f"u/{user}/req".encode()
        self.on_item = on_item
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._buf = b""
        self._pid = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(connect_packet(f"{self.user}.{DEVICE}", self.user, token_for(self.user), KEEPALIVE_S))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.user}: lost before SUBACK ({exc!r})"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        found, pos = split_packets(buf)
        for first, i, end in found:
            kind = first >> 4
            if kind == 3:  # PUBLISH
                packet_id, payload = publish_parts(buf, first, i, end)
                if packet_id:
                    self.write(b"\x40\x02" + packet_id)
                self._item(json.loads(payload))
            elif kind == 2:  # CONNACK
                if buf[i + 1] != 0:
                    self.ready.set_exception(ConnectionError(f"{self.user}: CONNACK {buf[i + 1]}"))
                else:
                    self.write(subscribe_packet(1, f"u/{self.user}/in"))
            elif kind == 9 and not self.ready.done():  # SUBACK
                self.ready.set_result(None)
        self._buf = buf[pos:] if pos < len(buf) else b""

    def _item(self, item: dict[str, Any]) -> None:
        if item.get("kind") == "res":
            future = self.answers.pop(str(item.get("rid")), None)
            if future is not None and not future.done():
                future.set_result(item)
        elif self.on_item is not None:
            self.on_item(self, item)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def publish(self, topic: bytes, payload: bytes) -> None:
        self._pid = self._pid % 65535 + 1
        self.write(packet(0x32, mqtt_str(topic) + self._pid.to_bytes(2, "big") + payload))

    async def request(self, op: str, args: dict[str, Any]) -> Any:
        rid = f"r{self._pid + 1}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[rid] = future
        self.publish(self.req_topic, json.dumps({"rid": rid, "op": op, "args": args}).encode())
        answer = await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        if not answer.get("ok"):
            raise BenchError(f"{self.user}: {op} failed: {answer}")
        return answer["result"]


async def connect_all(port: int, users: list[str], on_item: Callable[[Conn, dict[str, Any]], None] | None = None,
                      label: str = "") -> list[Conn]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    conns: list[Conn] = []
    started = time.monotonic()

    async def one(user: str) -> None:
        async with gate:
            _, conn = await loop.create_connection(lambda: Conn(user, on_item), "127.0.0.1", port)
            await asyncio.wait_for(conn.ready, REPLY_TIMEOUT_S)
            conns.append(conn)
            if label and len(conns) % 1000 == 0:
                print(f"  {label}: {len(conns):,} connected ({time.monotonic() - started:.0f} s)", flush=True)

    await asyncio.gather(*(one(user) for user in users))
    by_user = {c.user: c for c in conns}
    return [by_user[u] for u in users]


class CommitCounter:
    """Counts commits to a SQLite database by other connections (``PRAGMA data_version`` polled every 20 ms)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.commits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _run(self) -> None:
        last = self._version()
        while not self._stop.wait(0.02):
            now = self._version()
            if now != last:
                self.commits += 1
                last = now

    def __enter__(self) -> CommitCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._db.close()


def proc_io(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            values[key.strip()] = int(value)
    return values


class Phase:
    """Everything measured between ``__enter__`` and ``__exit__``: broker CPU and disk, ping RTTs, GC pauses."""

    def __init__(self, name: str, pid: int, db: Path) -> None:
        self.name, self.pid, self.db = name, pid, db
        self.rtt_ms: list[float] = []

    def __enter__(self) -> Phase:
        self.counter = CommitCounter(self.db).__enter__()
        self.cpu = CpuMeter({"broker": [self.pid]}, self_group="generator")
        self.io = proc_io(self.pid)
        self.started, self.wall_start = time.monotonic(), time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.started
        self.wall_end = time.time()
        self.cores = self.cpu.cores()
        io = proc_io(self.pid)
        self.counter.__exit__()
        self.write_bytes = io.get("write_bytes", 0) - self.io.get("write_bytes", 0)

    def result(self, gc_pauses: list[tuple[float, int, float]]) -> dict[str, Any]:
        broker = self.cores.get("broker") or 0.0
        mine = [(gen, ms) for at, gen, ms in gc_pauses if self.wall_start <= at <= self.wall_end]
        full = [ms for gen, ms in mine if gen == 2]
        return {
            "seconds": round(self.seconds, 1),
            "broker_cores": broker,
            "broker_share_of_machine": round(broker / max(1, len(os.sched_getaffinity(0))), 4),
            "generator_cores": self.cores.get("generator"),
            "other_cores": self.cores.get("others"),
            "presence_db_commits": self.counter.commits,
            "presence_db_commits_per_s": round(self.counter.commits / self.seconds, 3),
            "broker_write_bytes_per_s": round(self.write_bytes / self.seconds),
            "ping_rtt_ms": summarise(self.rtt_ms),
            "gc_pauses_over_20ms": len(mine),
            "gc_full_collections": len(full),
            "gc_full_max_ms": round(max(full), 1) if full else None,
            "gc_paused_share": round(sum(ms for _, ms in mine) / 1000 / self.seconds, 4),
        }


async def run(server: ChatServer, args: argparse.Namespace) -> dict[str, Any]:
    users = [heartbeater(i) for i in range(args.users)]
    flips = [f"pflip{j:03d}" for j in range(args.probes)]
    expiring = [f"pexp{j:03d}" for j in range(args.probes)]
    pending: dict[tuple[str, bool], float] = {}
    flip_ms: list[float] = []
    expiry_ms: list[float] = []
    expiry_users = set(expiring)

    def on_watcher_item(conn: Conn, item: dict[str, Any]) -> None:
        if item.get("kind") != "presence":
            return
        user, online = str(item.get("user")), item.get("online")
        sent = pending.pop((user, bool(online)), None)
        if sent is not None and user not in expiry_users:
            flip_ms.append((perf() - sent) * 1000)
        if user in expiry_users and online is False and isinstance(item.get("last_seen"), int):
            expiry_ms.append(time.time() * 1000 - (item["last_seen"] + WINDOW_S * 1000))

    print(f"connecting {len(users):,} heartbeating users, {2 * args.probes} probes and a watcher", flush=True)
    t0 = time.monotonic()
    conns = await connect_all(server.port, users, label="users")
    connect_s = time.monotonic() - t0
    probes = await connect_all(server.port, flips + expiring)
    (watcher,) = await connect_all(server.port, ["pwatch"], on_watcher_item)
    for conn in [*probes, watcher]:
        await conn.request("privacy.set", {"last_seen": "everyone"})  # the watcher too: reciprocity
    await watcher.request("presence.subscribe", {"users": flips + expiring})
    print(f"  connected in {connect_s:.0f} s; broker RSS {fmt((rss_kib(server.pid) or 0) / 1024)} MiB", flush=True)

    db = server.data_dir / "presence.db"
    phase: Phase | None = None
    stop = asyncio.Event()

    async def pinging() -> None:  # the stall probe: a ping request every 100 ms, all run long
        while not stop.is_set():
            started = perf()
            await watcher.request("ping", {})
            if phase is not None:
                phase.rtt_ms.append((perf() - started) * 1000)
            await asyncio.sleep(0.1)

    async def periodic(send: Callable[[Conn], None], until: asyncio.Event) -> None:
        """``send`` once per user every ``--interval`` seconds, phases spread evenly."""
        began, sent, n = time.monotonic(), 0, len(conns)
        while not until.is_set():
            due = int((time.monotonic() - began) / args.interval * n)
            while sent < due:
                send(conns[sent % n])
                sent += 1
            await asyncio.sleep(0.005)

    pinger = asyncio.ensure_future(pinging())
    print(f"idle phase: {args.idle_s:.0f} s, nobody sending", flush=True)
    with Phase("idle", server.pid, db) as idle:
        phase = idle
        await asyncio.sleep(args.idle_s)

    print(f"baseline phase: {len(users) / args.interval:,.0f} MQTT PINGREQ/s, {args.baseline_s:.0f} s", flush=True)
    pings_done = asyncio.Event()
    pingreqs = asyncio.ensure_future(periodic(lambda c: c.write(PINGREQ_BYTES), pings_done))
    await asyncio.sleep(5)
    with Phase("pingreq", server.pid, db) as baseline:
        phase = baseline
        await asyncio.sleep(args.baseline_s)
    pings_done.set()
    await pingreqs

    async def flipping() -> None:
        state = dict.fromkeys(flips, False)
        step = FLIP_EVERY_S / max(1, len(flips))
        k = 0
        while not stop.is_set():
            conn = probes[k % len(flips)]
            online = not state[conn.user]
            state[conn.user] = online
            pending[(conn.user, online)] = perf()
            conn.publish(conn.hb_topic, b"{}" if online else b'{"state":"away"}')
            k += 1
            await asyncio.sleep(step)

    async def expiring_once() -> None:
        spread = max(1.0, min(25.0, args.duration - WINDOW_S - 5))
        for conn in probes[len(flips):]:
            conn.publish(conn.hb_topic, b"{}")
            await asyncio.sleep(spread / max(1, len(expiring)))
            if stop.is_set():
                return

    print(f"heartbeat phase: {len(users) / args.interval:,.0f} hb/s; warm-up {args.warmup:.0f} s", flush=True)
    beating = asyncio.ensure_future(periodic(lambda c: c.publish(c.hb_topic, b"{}"), stop))
    await asyncio.sleep(args.warmup)
    phase_start_ms = int(time.time() * 1000) - int(args.interval * 1000)
    flip_task = asyncio.ensure_future(flipping())
    expiry_task = asyncio.ensure_future(expiring_once())
    print(f"measuring {args.duration:.0f} s", flush=True)
    rss_before = rss_kib(server.pid)
    with Phase("heartbeats", server.pid, db) as busy:
        phase = busy
        await asyncio.sleep(args.duration)
    phase = None
    stop.set()
    await asyncio.gather(beating, flip_task, expiry_task, pinger)
    rss_after = rss_kib(server.pid)
    lost = sum(1 for c in [*conns, *probes, watcher] if c.lost)

    check = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        persisted = int(check.execute("SELECT count(*) FROM last_seen WHERE user LIKE 'hb%' AND ms >= ?",
                                      (phase_start_ms,)).fetchone()[0])
    finally:
        check.close()
    for conn in [*conns, *probes, watcher]:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "users": len(users), "interval_s": args.interval, "heartbeats_per_s": round(len(users) / args.interval, 1),
        "window_s": WINDOW_S, "connect_s": round(connect_s, 1), "connections_lost": lost,
        "broker_rss_mib": {"before": round((rss_before or 0) / 1024), "after": round((rss_after or 0) / 1024)},
        "phases": [idle, baseline, busy],
        "last_seen_persisted_users": persisted,
        "flip_to_watcher_ms": summarise(flip_ms),
        "expiry_to_watcher_ms": summarise(expiry_ms),
        "probes": args.probes,
    }


def gc_pauses(log: Path) -> list[tuple[float, int, float]]:
    """(wall time, generation, ms) of the broker's GC pauses over 20 ms, from the lines ``gc_broker`` logs."""
    found = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(GC_MARK):
                _, gen, ms, at = line.split()
                found.append((float(at), int(gen), float(ms)))
    return found


def markdown(result: dict[str, Any]) -> str:
    r = result["result"]
    phases = {p["name"]: p for p in r["phases"]}
    idle, base, busy = phases["idle"], phases["pingreq"], phases["heartbeats"]
    extra = busy["broker_cores"] - idle["broker_cores"]
    over_ping = busy["broker_cores"] - base["broker_cores"]
    rate = max(r["heartbeats_per_s"], 1)
    labels = {"idle": "connected, idle", "pingreq": f"MQTT PINGREQ, {rate:,.0f}/s (baseline)",
              "heartbeats": f"heartbeats, {rate:,.0f}/s"}
    rows = [[labels[p["name"]], p["seconds"], p["broker_cores"], f"{p['broker_share_of_machine']:.1%}",
             p["presence_db_commits_per_s"], p["broker_write_bytes_per_s"], p["ping_rtt_ms"].get("p50_ms"),
             p["ping_rtt_ms"].get("p99_ms"), p["ping_rtt_ms"].get("max_ms"), p["gc_full_collections"],
             p["gc_full_max_ms"], f"{p['gc_paused_share']:.1%}", p["other_cores"]] for p in r["phases"]]
    lines = [
        f"# Presence: {r['users']:,} users heartbeating", "",
        f"{machine_line(result['machine'])}", "",
        f"{r['users']:,} users connected (device tokens, inbox subscribed). Heartbeat phase: each publishes "
        f"`u/{{me}}/hb {{}}` (QoS 1) every {r['interval_s']:.0f} s = {rate:,.0f} heartbeats/s; window "
        f"{r['window_s']:.0f} s, default presence settings (last_seen batches every 5 s, coalescing 1 s). "
        "Baseline phase: the same connections send MQTT PINGREQ at the same rate instead (answered by the MQTT "
        "layer, never reaching the bridge). Method: bench/presence.py.", "",
        *md_table(["phase", "s", "broker CPU (cores)", "of machine", "presence.db commits/s", "write_bytes/s",
                   "ping p50 ms", "ping p99 ms", "ping max ms", "full GCs", "longest full GC ms", "time in GC",
                   "other CPU"], rows),
        "",
        f"- Heartbeats cost the broker **{extra:.2f} cores** ({busy['broker_share_of_machine']:.0%} of this "
        f"machine) over the same connections idle: {extra / rate * 1e6:.0f} µs per heartbeat, all layers. "
        f"PINGREQs at the same rate cost {base['broker_cores'] - idle['broker_cores']:.2f} cores, so the chat "
        f"path (ACL, JSON, bridge, presence) adds {over_ping:.2f} cores ({over_ping / rate * 1e6:.0f} µs per "
        "heartbeat).",
        f"- Disk: {busy['presence_db_commits_per_s']:.2f} commits/s to presence.db (one batch of changed "
        f"`last_seen` rows every 5 s, not one write per heartbeat); the broker wrote "
        f"{busy['broker_write_bytes_per_s'] / 1024:.0f} KiB/s to storage (all files, WAL and checkpoints included).",
        f"- `last_seen` persisted during the run for {r['last_seen_persisted_users']:,} of {r['users']:,} users.",
        f"- Broker RSS {r['broker_rss_mib']['before']} MiB -> {r['broker_rss_mib']['after']} MiB during the "
        f"measurement; connections lost: {r['connections_lost']}.",
        "",
        "State change -> watcher's `presence` item (ms):", "",
        *md_table(["change", "count", "p50", "p90", "p99", "max"],
                  [[name, s.get("count"), s.get("p50_ms"), s.get("p90_ms"), s.get("p99_ms"), s.get("max_ms")]
                   for name, s in (("hb / away published -> item (one clock)", r["flip_to_watcher_ms"]),
                                   ("window ran out -> item (wall clock)", r["expiry_to_watcher_ms"]))]),
        "",
        "The flip latency includes the probe's publish, the broker's handling and the item's delivery to the "
        "watcher; the ping columns time a request every 100 ms. The broker logs every garbage collection over "
        f"20 ms: in the heartbeat phase it stood still in them for {busy['gc_paused_share']:.1%} of the time, "
        f"the longest full collection taking {fmt(busy['gc_full_max_ms'])} ms.",
        *([] if not busy["gc_full_collections"] else [
            "",
            "Why the tail: CPython's full collections traverse every tracked object, and each amqtt session is a "
            "few hundred of them, so their length grows with the number of connections. Sporadic packets on many "
            "connections trigger them: each packet leaves objects that live until the same connection's next "
            "packet, long enough to reach the oldest generation. Compare the PINGREQ baseline."]),
        "",
    ]
    return "\n".join(lines)


GC_MARK = "BENCH-GC-PAUSE"


def gc_broker(argv: list[str]) -> int:
    """``python -m bench.presence gc-broker -m broker run ...``: the broker, logging GC pauses over 20 ms."""
    import gc  # noqa: PLC0415
    import runpy  # noqa: PLC0415

    began: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - began[0]) * 1000
        if ms > 20:
            print(f"{GC_MARK} {info['generation']} {ms:.1f} {time.time():.3f}", file=sys.stderr, flush=True)

    if argv[:2] != ["-m", "chatserver"]:
        raise SystemExit("usage: python -m bench.presence gc-broker -m broker ARGS")
    gc.callbacks.append(callback)
    sys.argv = ["broker", *argv[2:]]
    runpy.run_module("chatserver", run_name="__main__", alter_sys=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gc-broker"]:
        return gc_broker(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between a user's heartbeats")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds of the heartbeat phase")
    parser.add_argument("--warmup", type=float, default=15.0, help="heartbeat seconds before measuring")
    parser.add_argument("--idle-s", type=float, default=15.0, help="measured seconds with nobody sending")
    parser.add_argument("--baseline-s", type=float, default=40.0, help="measured seconds of the PINGREQ baseline")
    parser.add_argument("--probes", type=int, default=20, help="users flipping state, and users whose window expires")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    if args.duration < WINDOW_S + 10:
        print(f"note: --duration under {WINDOW_S + 10:.0f} s measures no window expiry", file=sys.stderr)

    raise_fd_limit(args.users + 2 * args.probes + 200)
    workdir = Path(tempfile.mkdtemp(prefix="bench-presence-"))
    server: ChatServer | None = None
    try:
        names = [heartbeater(i) for i in range(args.users)] + [f"pflip{j:03d}" for j in range(args.probes)] \
            + [f"pexp{j:03d}" for j in range(args.probes)] + ["pwatch"]
        print(f"creating {len(names):,} bench users", flush=True)
        template = workdir / "template"
        make_template(template, names)
        server = ChatServer(workdir, template)
        server.python = [sys.executable, "-m", "bench.presence", "gc-broker"]  # logs GC pauses to its stderr
        server.fresh_data()
        server.start()
        print(f"broker up on port {server.port} (pid {server.pid})", flush=True)
        result = asyncio.run(run(server, args))
        code = server.stop()
        pauses = gc_pauses(server.log_path)
        result["phases"] = [phase.result(pauses) | {"name": phase.name} for phase in result["phases"]]
        server = None
        if code != 0:
            raise BenchError(f"the broker exited with {code}")
        full = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "result": result}
        json_path, md_path = write_results("presence", full, markdown(full), args.out)
        print(markdown(full))
        print(f"wrote {json_path} and {md_path}")
        return 0
    except BenchError as exc:
        print(f"bench.presence: {exc}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
