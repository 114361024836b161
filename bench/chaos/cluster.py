"""Cluster mode under faults: three broker nodes (each ``python -m chatserver run --cluster ... --node-id
nodeN``, its own process and metrics port) behind HAProxy, on a Redis Cluster of 3 masters + 3
replicas, the SDK clients connecting through HAProxy; the same workload and ledger as bench/chaos.

The faults (docs/RELIABILITY.md, "Cluster mode"):
- ``cluster-node``: a broker node SIGKILLed mid-stream; HAProxy marks it DOWN (~1 s), its devices
  reconnect through HAProxy to the others; it is started again once its lease ran out;
- ``cluster-redis``: the Redis master of a chatting user's slot SIGKILLed; its replica is promoted
  (3-5 s) while writes wait (``cluster.retry_s``); the killed node comes back as a replica;
- ``cluster-nudges``: every node's nudge subscriber killed (``CLIENT KILL`` of the connection named
  ``{prefix}nudges:{node}``) again and again for a while, so nudges are lost and items wait for
  the periodic read (``cluster.poll_s``, short here): late, never lost;
- ``cluster-cutoff``: one node's every Redis connection runs through proxies (bench/chaos/redis_link.py)
  that are cut for longer than ``retry_s``: its senders get ``internal`` and re-send, its devices
  move through HAProxy (its /readyz fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from bench.chaos.broker import ChaosBroker
from bench.chaos.redis_link import REMAP_ENV
from bench.chaos.scenarios import Row, Scenario, ci, row
from bench.chaos.workload import Plan, Progress, Workload, password
from bench.common import BenchError
from broker import credentials
from storage.redis.users import RedisUserStore
from testkit.haproxy import HAProxy
from testkit.proxy import TcpProxy
from testkit.redis_cluster import RedisCluster

NODES = 3
PREFIX = "chaos:"
LEASE_S = 8.0  # longer than a Redis failover (3-5 s), or every node on the dead master's slots loses its lease
RETRY_S = 6.0


class ChaosCluster:
    """The deployment; duck-types ``ChaosBroker`` for ``scenarios.row`` (``alive``, ``starts``, ``log_problems``)."""

    def __init__(self, workdir: Path, poll_s: float = 5.0, via_proxies: int | None = None) -> None:
        self.workdir = workdir
        self.redis = RedisCluster(workdir / "redis")
        self.poll_s = poll_s
        self.via_proxies = via_proxies  # this node talks to Redis through proxies (cluster-cutoff)
        self.proxies: list[TcpProxy] = []
        self.nodes: list[ChaosBroker] = []
        self.haproxy: HAProxy | None = None

    def start(self, users: list[str]) -> ChaosCluster:
        self.redis.start()
        url = "redis://" + ",".join(f"{h}:{p}" for h, p in self.redis.startup_nodes)
        config = {"cluster": {"key_prefix": PREFIX, "lease_s": LEASE_S, "retry_s": RETRY_S, "poll_s": self.poll_s}}
        for n in range(NODES):
            env, module = None, "chatserver"
            if n == self.via_proxies:
                self.proxies = [TcpProxy(port).start() for _, port in self.redis.startup_nodes]
                env = {REMAP_ENV: ",".join(f"{p.target_port}={p.port}" for p in self.proxies)}
                module = "bench.chaos.redis_link"
            folder = self.workdir / f"node{n}"
            folder.mkdir(parents=True, exist_ok=True)
            self.nodes.append(ChaosBroker(folder, folder / "data", config, ("--cluster", url, "--node-id", f"node{n}"),
                                          module, env))
        asyncio.run(self._add_users(users))
        for node in self.nodes:
            node.start()
        self.haproxy = HAProxy(self.workdir / "haproxy", [(n.port, n.metrics_port) for n in self.nodes]).start()
        return self

    async def _add_users(self, users: list[str]) -> None:
        store = await RedisUserStore.open(self.redis.startup_nodes, PREFIX)
        try:
            await store.add_users([(u, credentials.hash_password(password(u))) for u in users])
        finally:
            await store.close()

    @property
    def port(self) -> int:
        assert self.haproxy is not None
        return self.haproxy.port

    @property
    def alive(self) -> bool:
        return all(node.alive for node in self.nodes)

    @property
    def starts(self) -> int:
        return sum(node.starts for node in self.nodes)

    def log_problems(self) -> list[str]:
        return [line for node in self.nodes for line in node.log_problems()]

    def state(self, n: int) -> str:
        assert self.haproxy is not None
        return self.haproxy.backend_state().get(f"node{n}", "?")

    def restart(self, n: int, timeout: float = 30.0) -> None:
        """Start node ``n`` again with its id: refused until its last life's lease ran out, so retried."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.nodes[n].start()
                return
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            node.kill()
        for proxy in self.proxies:
            proxy.stop()
        self.redis.stop()


@contextlib.contextmanager
def running(workdir: Path, plan: Plan, progress: Progress, **options: Any) -> Iterator[tuple[ChaosCluster, Workload]]:
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = ChaosCluster(workdir, **options)
    try:
        work = Workload(plan, workdir / "clients", 0, progress)
        cluster.start(work.all_users())
        work.connect_port = cluster.port
        progress(f"  cluster up: redis {[p for _, p in cluster.redis.startup_nodes]}, haproxy {cluster.port}")
        try:
            yield cluster, work
        finally:
            work.close()
    finally:
        cluster.stop()


def cluster_plan(size: str, per_sender_full: int) -> Plan:
    """CI: 10 s of 120 msg/s; full: 80 msg/s for as long as the faults last (``per_sender_full`` / 10 s).
    Everything shares 2 cores (3 nodes, 6 Redis, HAProxy, the SDK clients): more would only queue."""
    if ci(size):
        return Plan(pairs=3, per_sender=200, rate=20.0)
    return Plan(pairs=4, per_sender=per_sender_full, rate=10.0)


# --- 1. a broker node SIGKILLed -----------------------------------------------------------------


def run_node_kill(size: str, workdir: Path, progress: Progress) -> Row:
    kills = 1 if ci(size) else 6
    began = time.monotonic()
    rng = random.Random()
    down_s: list[float] = []
    with running(workdir, cluster_plan(size, 900), progress) as (cluster, work):
        assert cluster.haproxy is not None
        work.start()
        t0 = time.monotonic()
        for k in range(kills):
            time.sleep(rng.uniform(1.0, 3.0))
            victim = rng.randrange(NODES)
            cluster.nodes[victim].kill()
            down_s.append(round(cluster.haproxy.wait_state(f"node{victim}", "DOWN"), 2))
            progress(f"  kill {k + 1}/{kills}: node{victim} SIGKILLed, HAProxy DOWN after {down_s[-1]} s")
            time.sleep(LEASE_S)  # its devices work on through the others meanwhile
            cluster.restart(victim)
            cluster.haproxy.wait_state(f"node{victim}", "UP")
        work.wait_senders(180)
        t1 = time.monotonic()
        return row("cluster: broker node SIGKILL", work, cluster, kills,
                   f"a random node of 3 SIGKILLed {kills}x mid-stream, restarted after its lease ({LEASE_S:g} s)",
                   (t0, t1), began, haproxy_down_s=down_s)


# --- 2. a Redis master SIGKILLed ----------------------------------------------------------------


def run_redis_kill(size: str, workdir: Path, progress: Progress) -> Row:
    kills = 1 if ci(size) else 3
    began = time.monotonic()
    promoted_s: list[float] = []
    with running(workdir, cluster_plan(size, 400), progress) as (cluster, work):
        work.start()
        t0 = time.monotonic()
        for k in range(kills):
            time.sleep(2.0)
            user = work.users[(2 * k) % len(work.users)]  # a chatting user's slot: its queues' master
            errors_before = work.errors["internal"]
            killed = cluster.redis.kill_master(f"{{{user}}}")
            at = time.monotonic()
            cluster.redis.wait_promoted(f"{{{user}}}", killed)
            promoted_s.append(round(time.monotonic() - at, 2))
            progress(f"  kill {k + 1}/{kills}: master {killed.port} of {{{user}}} SIGKILLed, replica promoted after "
                     f"{promoted_s[-1]} s ({work.errors['internal'] - errors_before} `internal` meanwhile)")
            cluster.redis.restart(killed)  # it comes back as a replica of the promoted one
        work.wait_senders(180)
        t1 = time.monotonic()
        return row("cluster: Redis master SIGKILL", work, cluster, kills,
                   f"the master of a chatting user's slot SIGKILLed {kills}x (replica promoted), restarted as a "
                   "replica", (t0, t1), began, promoted_s=promoted_s)


# --- 3. nudges dropped --------------------------------------------------------------------------


class NudgeCutter:
    """Kills every node's nudge subscriber on every Redis node, every ``every_s``, until stopped."""

    def __init__(self, cluster: ChaosCluster, every_s: float = 0.05) -> None:
        self.cluster, self.every_s = cluster, every_s
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="nudge-cutter")

    def __enter__(self) -> NudgeCutter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        clients = [redis.Redis(port=port, socket_timeout=2) for _, port in self.cluster.redis.startup_nodes]
        while not self._stop.wait(self.every_s):
            for client in clients:
                with contextlib.suppress(redis.RedisError):
                    listed: list[dict[str, Any]] = client.client_list(_type="pubsub")  # type: ignore[assignment]
                    for conn in listed:
                        if str(conn.get("name", "")).startswith(f"{PREFIX}nudges:"):
                            client.client_kill_filter(_id=conn["id"])
                            self.kills += 1
        for client in clients:
            client.close()


def run_nudges(size: str, workdir: Path, progress: Progress) -> Row:
    poll_s = 2.0
    window_s = 8.0 if ci(size) else 60.0
    began = time.monotonic()
    with running(workdir, cluster_plan(size, 700), progress, poll_s=poll_s) as (cluster, work):
        work.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        with NudgeCutter(cluster) as cutter:
            time.sleep(window_s)
        t1 = time.monotonic()
        progress(f"  nudge subscribers killed {cutter.kills}x in {window_s:g} s")
        work.wait_senders(180)
        checks = {"nudges were dropped": {"ok": cutter.kills > 0,
                                          "figure": f"{cutter.kills} subscriber connections killed"}}
        return row("cluster: nudges dropped", work, cluster, cutter.kills,
                   f"every node's nudge subscriber killed (CLIENT KILL) {cutter.kills}x over {window_s:g} s; "
                   f"cluster.poll_s {poll_s:g} s", (t0, t1), began, poll_s=poll_s, window_s=window_s,
                   checks=checks)


# --- 4. one node cut off from Redis -------------------------------------------------------------


def run_cutoff(size: str, workdir: Path, progress: Progress) -> Row:
    modes = ["refuse", "blackhole"] if ci(size) else ["refuse", "blackhole"] * 3
    hold_s = RETRY_S + 4.0
    victim = NODES - 1
    began = time.monotonic()
    figures: dict[str, list[Any]] = {"internal_during_cut": [], "state_during_cut": [], "down_after_s": []}
    with running(workdir, cluster_plan(size, 800), progress, via_proxies=victim) as (cluster, work):
        assert cluster.haproxy is not None
        work.start()
        t0 = time.monotonic()
        for r, mode in enumerate(modes):
            time.sleep(1.5)
            errors_before = work.errors["internal"]
            for proxy in cluster.proxies:
                proxy.cut(mode)
            cut_at = time.monotonic()
            down = _wait_for(lambda: cluster.state(victim) == "DOWN", hold_s)
            figures["down_after_s"].append(None if down is None else round(down - cut_at, 2))
            time.sleep(max(0.0, hold_s - (time.monotonic() - cut_at)))
            figures["state_during_cut"].append(cluster.state(victim))
            figures["internal_during_cut"].append(work.errors["internal"] - errors_before)
            for proxy in cluster.proxies:
                proxy.restore()
            up = _wait_for(lambda: cluster.state(victim) == "UP", 60.0)
            progress(f"  cut {r + 1}/{len(modes)} ({mode}, {hold_s:g} s): node{victim} DOWN after "
                     f"{figures['down_after_s'][-1]} s, {figures['internal_during_cut'][-1]} `internal`; UP again "
                     f"{'after ' + format(up - cut_at - hold_s, '.1f') + ' s' if up else 'NOT'}")
        work.wait_senders(180)
        t1 = time.monotonic()
        # The node's answers to what it could not stage: most reach nobody, as HAProxy closes its connections
        # (DOWN ~3 s after the cut) before retry_s ends; the SDK re-sends those messages through another node.
        log = cluster.nodes[victim].log_path.read_text(errors="replace")
        figures["refusals_logged"] = [log.count(" not staged: ")]
        return row("cluster: node cut off from Redis", work, cluster, len(modes),
                   f"node{victim}'s Redis links cut {len(modes)}x for {hold_s:g} s (retry_s {RETRY_S:g} s): "
                   f"{', '.join(modes)} (refused / blackholed)", (t0, t1), began, **figures)


def _wait_for(done: Callable[[], bool], timeout: float) -> float | None:
    """Poll until ``done``; the monotonic time it held, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return time.monotonic()
        time.sleep(0.1)
    return None


CLUSTER_SCENARIOS: dict[str, Scenario] = {
    "cluster-node": run_node_kill, "cluster-redis": run_redis_kill, "cluster-nudges": run_nudges,
    "cluster-cutoff": run_cutoff,
}
