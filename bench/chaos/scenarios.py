"""The fault scenarios: each runs the shared workload on a fresh broker while injecting one kind of fault.

Every scenario is ``run_X(size, workdir, progress) -> row``; the row holds the ledger's
verdict (lost, duplicated, reordered, false ``sent``, misrouted), the faults injected,
the honest users' p99 latency while the fault was on, and scenario-specific figures.
``size`` is ``"ci"`` (tests/chaos: seconds) or ``"full"`` (``python -m bench chaos --full``).
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from bench.chaos.broker import ChaosBroker
from bench.chaos.workload import Plan, Progress, Workload, password
from bench.common import BenchError
from testkit.proxy import DOWN, PUBLISH, UP, MqttProxy, Packet

Row = dict[str, Any]
Scenario = Callable[[str, Path, Progress], Row]


def ci(size: str) -> bool:
    return size != "full"


@contextlib.contextmanager
def running(workdir: Path, plan: Plan, progress: Progress, config: dict[str, Any] | None = None,
            data_dir: Path | None = None, extra_users: tuple[str, ...] = ()) -> Iterator[tuple[ChaosBroker, Workload]]:
    """A fresh broker with the workload's users (and ``extra_users``), and the workload (not started)."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = ChaosBroker(workdir, data_dir or workdir / "data", config)
    work = Workload(plan, workdir / "clients", broker.port, progress)
    broker.add_users({u: password(u) for u in (*work.all_users(), *extra_users)})
    broker.start()
    try:
        yield broker, work
    finally:
        work.close()
        broker.kill()


class Deployment(Protocol):
    """What a row reports of the broker side: one ``ChaosBroker``, or a cluster of them."""

    @property
    def alive(self) -> bool: ...

    @property
    def starts(self) -> int: ...

    def log_problems(self) -> list[str]: ...


def row(name: str, work: Workload, broker: Deployment, faults: int, fault_desc: str, window: tuple[float, float],
        began: float, **extra: Any) -> Row:
    verdict = work.finish()
    alive = broker.alive
    return {"scenario": name, **verdict.as_dict(), "faults": faults, "fault": fault_desc,
            "honest_p99_ms": work.ledger.p99_ms(*window), "errors_seen": dict(work.errors),
            "broker_alive_after": alive, "broker_starts": broker.starts,
            "broker_log_problems": len(broker.log_problems()), "seconds": round(time.monotonic() - began, 1),
            **extra}


# --- 1. SIGKILL of the broker ---------------------------------------------------------------------


def run_kill(size: str, workdir: Path, progress: Progress) -> Row:
    kills = 3 if ci(size) else 20
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=120 if ci(size) else 600, rate=20.0)
    began = time.monotonic()
    rng = random.Random()
    with running(workdir, plan, progress) as (broker, work):
        work.start()
        t0 = time.monotonic()
        done = 0
        while done < kills:
            time.sleep(rng.uniform(0.3, 2.0))  # a random moment: mid-stream, mid-flush, mid-reconnect
            broker.kill()
            broker.start()
            done += 1
            progress(f"  kill {done}/{kills}: restarted (pid {broker.pid})")
        work.wait_senders(120)
        t1 = time.monotonic()
        return row("broker SIGKILL", work, broker, done, f"SIGKILL + immediate restart, {done}x at random moments",
                   (t0, t1), began)


# --- 2. a faulty network (proxy) ------------------------------------------------------------------


def run_network(size: str, workdir: Path, progress: Progress) -> Row:
    rounds = 2 if ci(size) else 10
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=200 if ci(size) else 1000, rate=10.0, keepalive=2)
    began = time.monotonic()
    counts: dict[str, int] = {"cut": 0, "stall": 0, "slow": 0, "cut_after_publish": 0, "cut_after_delivery": 0}
    with running(workdir, plan, progress) as (broker, work):
        proxy = MqttProxy(broker.port).start()
        work.connect_port = proxy.port
        try:
            work.start()
            t0 = time.monotonic()
            for r in range(rounds):
                proxy.cut_all()
                counts["cut"] += 1
                time.sleep(1.0)
                proxy.stall()  # half-open: the SDK's keepalive (2 s) must notice and reconnect
                counts["stall"] += 1
                time.sleep(4.0)
                proxy.resume()  # the stale connections' held bytes go on: late duplicates
                proxy.delay_s = 0.02
                counts["slow"] += 1
                time.sleep(1.5)
                proxy.delay_s = 0.0
                counts["cut_after_publish"] += _cut_once(proxy, lambda p: p.direction == UP and p.kind == PUBLISH
                                                         and p.topic is not None and p.topic.endswith("/out"))
                counts["cut_after_delivery"] += _cut_once(proxy, lambda p: p.direction == DOWN and p.kind == PUBLISH
                                                          and b'"kind":"msg"' in p.data)
                progress(f"  network round {r + 1}/{rounds}: {counts}")
            work.wait_senders(180)
            t1 = time.monotonic()
            desc = ", ".join(f"{k.replace('_', ' ')} x{v}" for k, v in counts.items())
            return row("network (proxy)", work, broker, sum(counts.values()), desc, (t0, t1), began, **counts)
        finally:
            work.close()
            proxy.stop()


def _cut_once(proxy: MqttProxy, rule: Callable[[Packet], bool], timeout: float = 5.0) -> int:
    """Install a cut-after rule and wait (up to ``timeout``) until it fired; returns the cuts made."""
    before = proxy.cuts
    proxy.cut_after(rule)
    deadline = time.monotonic() + timeout
    while proxy.cuts == before and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.rule = None
    return proxy.cuts - before


# --- 3. clients killed with unsent outboxes -------------------------------------------------------


FILL_WAIT_S = 15.0
"""clients: how long a stalled round waits for some child's outbox to hold a message before its kills."""


def wait_for_outbox(work: Any, timeout_s: float) -> Any:
    """A child whose outbox holds an accepted message without ``sent``, polled until ``timeout_s``; else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in work.children:
            if work.ledger.unsent(child.user):
                return child
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def run_clients(size: str, workdir: Path, progress: Progress) -> Row:
    kills = 3 if ci(size) else 15
    plan = Plan(pairs=2 if ci(size) else 4, per_sender=100 if ci(size) else 500, rate=20.0,
                child_senders=3 if ci(size) else 6)
    began = time.monotonic()
    rng = random.Random()
    outbox_at_kill = 0
    with running(workdir, plan, progress) as (broker, work):
        proxy = MqttProxy(broker.port).start()
        work.child_port = proxy.port  # the children connect through it, so their outboxes can fill
        try:
            work.start()
            t0 = time.monotonic()
            for k in range(kills):
                time.sleep(rng.uniform(0.5, 1.5))
                proxy.stall()  # nothing gets 'sent' now: the outboxes fill up
                time.sleep(rng.uniform(0.3, 1.0))
                filled = wait_for_outbox(work, FILL_WAIT_S)  # children started late (a loaded machine) sent nothing
                victims = rng.sample(work.children, max(1, len(work.children) // 2))
                if filled is not None and filled not in victims:
                    victims[0] = filled  # at least one kill hits a non-empty outbox
                for child in victims:
                    child.kill()
                outbox_at_kill += sum(work.ledger.unsent(c.user) for c in victims)
                proxy.cut_all()
                proxy.resume()
                time.sleep(rng.uniform(0.2, 1.0))  # dead for a while, then started again on the same store
                for child in victims:
                    child.start()
                progress(f"  client kill round {k + 1}/{kills}: {len(victims)} killed, {outbox_at_kill} unsent so far")
            work.wait_senders(180)
            t1 = time.monotonic()
            total = sum(c.kills for c in work.children)
            return row("clients SIGKILL", work, broker, total,
                       f"SIGKILL of SDK processes with {outbox_at_kill} messages unsent in all, restarted from "
                       "their store", (t0, t1), began, unsent_at_kill=outbox_at_kill)
        finally:
            work.close()
            proxy.stop()


# --- 4. disk full, read-only ----------------------------------------------------------------------


class MountFailed(RuntimeError):
    """The scenario needs a tmpfs mount (root); the reason is the message."""


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MountFailed(f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write a file until the file system is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * (256 * 1024)
    # Unbuffered: a buffered file would retry its failed flush at close and raise there.
    with (path / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk) or 0
        except OSError:
            pass
    with contextlib.suppress(OSError), (path / "filler2").open("wb", buffering=0) as f:  # the last few pages
        while True:
            f.write(b"\0" * 4096)
    return written


def run_disk(size: str, workdir: Path, progress: Progress) -> Row:
    hold = 4.0 if ci(size) else 10.0
    rounds = 1 if ci(size) else 3
    plan = Plan(pairs=2 if ci(size) else 4, per_sender=150 if ci(size) else 700, rate=10.0, pad_bytes=30000,
                offline_s=(2.0, 5.0))
    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "disk"
    figures: dict[str, Any] = {"internal_errors_while_full": 0, "sent_while_full": 0}
    # 128 MB: the broker's own data (30 KB bodies staged for offline tablets, the WAL) must still fit
    # when the filler is gone; with 48 MB it once filled the disk by itself and could not start.
    with tmpfs(disk, 128), running(workdir, plan, progress, data_dir=disk / "data") as (broker, work):
        work.start()
        t0 = time.monotonic()
        faults = 0
        for r in range(rounds):
            time.sleep(1.5)
            errors_before, sent_before = work.errors["internal"], work.ledger.verdict().sent_receipts
            fill(disk)
            progress(f"  round {r + 1}: disk full")
            time.sleep(hold)
            figures["internal_errors_while_full"] += work.errors["internal"] - errors_before
            figures["sent_while_full"] += work.ledger.verdict().sent_receipts - sent_before
            figures.setdefault("alive_while_full", []).append(broker.alive)
            broker.kill()  # a crash while full: anything that got 'sent' must be on disk
            for name in ("filler", "filler2"):
                (disk / name).unlink(missing_ok=True)
            broker.start()
            faults += 2
            progress(f"  round {r + 1}: space back, killed and restarted")
            time.sleep(1.5)
            # A file system cannot turn read-only under a process that has files open for writing
            # (EBUSY), so: crash, come back read-only, then writable again.
            broker.kill()
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
            progress(f"  round {r + 1}: killed; data dir read-only")
            try:
                broker.start(timeout=30)
                figures.setdefault("started_read_only", []).append(True)
                time.sleep(hold)
                figures.setdefault("alive_while_ro", []).append(broker.alive)
                broker.kill()
            except BenchError:
                figures.setdefault("started_read_only", []).append(False)  # refused to start: reported, no harm
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, capture_output=True)
            broker.start()
            faults += 1
            progress(f"  round {r + 1}: writable again")
        work.wait_senders(180)
        t1 = time.monotonic()
        result = row("disk full / read-only", work, broker, faults,
                     f"tmpfs data dir filled {rounds}x for {hold:.0f} s (then SIGKILL, space back, restart); "
                     f"{rounds}x killed and started on the data dir remounted read-only, then read-write",
                     (t0, t1), began, **figures)
        broker.kill()
        return result


SCENARIOS: dict[str, Scenario] = {
    "kill": run_kill, "network": run_network, "clients": run_clients, "disk": run_disk,
}


def all_scenarios() -> dict[str, Scenario]:
    """Every scenario by name, in the order of docs/RELIABILITY.md."""
    from bench.chaos import abuse  # noqa: PLC0415 (abuse imports this module)

    return {**SCENARIOS, "slow": abuse.run_slow, "flood": abuse.run_flood, "hostile": abuse.run_hostile}
