"""Scenarios 5-7: slow consumers, floods and hostile input, while the honest workload runs.

Each attacker is a ``bench.chaos.attacks`` process (raw sockets, its own CPU share);
the honest users are the shared SDK workload, checked by the ledger as in the fault
scenarios. Each scenario reports the honest users' p99 latency while the attack ran.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.chaos.scenarios import Row, ci, row, running
from bench.chaos.workload import Plan, Progress, password
from bench.common import REPO

DEFAULT_LIMITS = {"limits": {"send_burst": 200, "send_rate_per_s": 20.0}}  # the shipped defaults


def attack(kind: str, port: int, seconds: float, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.chaos.attacks", kind, str(port), str(seconds), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"failed": (err or "no output").strip().splitlines()[-1:]}
    return dict(json.loads(lines[-1]))


def staged(data_dir: Path, prefix: str) -> int:
    """Items staged on disk for the devices of one user (read-only; the broker keeps writing)."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'staging.db'}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM items WHERE device LIKE ?", (prefix + ".%",)).fetchone()[0])
    except sqlite3.Error:
        return -1


# --- 5. slow consumers ------------------------------------------------------------------------


def run_slow(size: str, workdir: Path, progress: Progress) -> Row:
    seconds = 20.0 if ci(size) else 90.0
    max_queue = 2000 if ci(size) else 10000
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=int(seconds * 8), rate=8.0)
    began = time.monotonic()
    config = {"delivery": {"max_queue": max_queue}}
    with running(workdir, plan, progress, config, extra_users=("slow", "spammer")) as (broker, work):
        mute = attack("mute", broker.port, seconds + 5, "slow", password("slow"))
        deaf = attack("deaf", broker.port, seconds + 5, "slow", password("slow"))
        time.sleep(1.0)  # both slow devices known before the spam starts
        work.start()
        t0 = time.monotonic()
        spam = attack("spam", broker.port, seconds, "spammer", password("spammer"), "slow")
        rss: list[tuple[float, int | None, int]] = []
        while spam.poll() is None:
            rss.append((round(time.monotonic() - t0, 1), broker.rss_kib(), staged(broker.data_dir, "slow")))
            time.sleep(1.0)
        t1 = time.monotonic()
        spammed, muted, deafened = outcome(spam), outcome(mute), outcome(deaf)
        work.wait_senders(120)
        half = [r for r in rss if r[0] >= seconds / 2 and r[1] is not None]
        growth = (half[-1][1] - half[0][1]) if len(half) >= 2 else None  # type: ignore[operator]
        progress(f"  slow: spam {spammed.get('per_s')} msg/s, staged for slow {rss[-1][2] if rss else '?'}, "
                 f"RSS {rss[-1][1] if rss else '?'} KiB")
        return row("slow consumers", work, broker, 2,
                   f"2 devices that never ack / never read, a spammer at {spammed.get('per_s')} msg/s to them "
                   f"for {seconds:.0f} s", (t0, t1), began,
                   spam=spammed, mute=muted, deaf=deafened, max_queue=max_queue,
                   staged_for_slow_max=max((r[2] for r in rss), default=None),
                   rss_kib_start=rss[0][1] if rss else None, rss_kib_max=max((r[1] or 0 for r in rss), default=None),
                   rss_kib_growth_second_half=growth, rss_series=rss)


# --- 6. floods ---------------------------------------------------------------------------------


FLOODS = ("badpw", "spam", "seen", "big", "deep", "topics")


def run_flood(size: str, workdir: Path, progress: Progress) -> Row:
    each = 6.0 if ci(size) else 30.0
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=int(each * len(FLOODS) * 8 + 40), rate=8.0)
    began = time.monotonic()
    floods: dict[str, Any] = {}
    with running(workdir, plan, progress, DEFAULT_LIMITS, extra_users=("flooder",)) as (broker, work):
        work.start()
        time.sleep(2.0)
        floods["baseline_p99_ms"] = work.ledger.p99_ms(work.started_at, time.monotonic())
        t0 = time.monotonic()
        for kind in FLOODS:
            began_kind = time.monotonic()
            args = {"badpw": ("a0",), "spam": ("flooder", password("flooder"), "b0"),
                    "seen": ("flooder", password("flooder"), "b0"),
                    "big": ("flooder", password("flooder")), "deep": ("flooder", password("flooder"), "b0"),
                    "topics": ("flooder", password("flooder"))}[kind]
            result = outcome(attack(kind, broker.port, each, *args), timeout=each + 120)
            ended = time.monotonic()
            result["honest_p99_ms"] = work.ledger.p99_ms(began_kind, ended)
            result["broker_rss_kib"] = broker.rss_kib()
            result["staged_for_b0"] = staged(broker.data_dir, "b0")  # a seen flood must not pile up there
            floods[kind] = result
            progress(f"  flood {kind}: {result}")
        t1 = time.monotonic()
        work.wait_senders(180)
        rate = floods.get("badpw", {}).get("per_s")
        return row("floods", work, broker, len(FLOODS),
                   f"bad passwords ({rate}/s), publish as fast as possible, seen reports of 1,000 ids as fast as "
                   "possible, 5 MB payloads, 50,000-deep JSON, "
                   f"thousands of topics; {each:.0f} s each", (t0, t1), began, floods=floods)


# --- 7. hostile input -------------------------------------------------------------------------


def run_hostile(size: str, workdir: Path, progress: Progress) -> Row:
    seconds = 10.0 if ci(size) else 60.0
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=int(seconds * 10 + 60), rate=8.0)
    began = time.monotonic()
    with running(workdir, plan, progress, extra_users=("mallory",)) as (broker, work):
        work.start()
        t0 = time.monotonic()
        result = outcome(attack("hostile", broker.port, seconds, "mallory", password("mallory"),
                                *work.users), timeout=seconds * 20 + 120)
        t1 = time.monotonic()
        progress(f"  hostile: {result}")
        work.wait_senders(180)
        examples = sum(result.get("examples", {}).values())
        return row("hostile input", work, broker, examples,
                   f"{examples} Hypothesis examples: envelopes (forged from, to victims), guessed acks, seen, "
                   "requests, victims' topics, raw MQTT", (t0, t1), began, hostile=result,
                   foreign_messages_received=sum(work.foreign.values()))


