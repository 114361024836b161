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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.chaos.broker import FAST, deep_merge
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


def staged(data_dir: Path, prefix: str, what: str = "count(*)") -> int:
    """Items staged on disk for the devices of one user (``what``: an aggregate over them), read-only (the broker
    keeps writing)."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'staging.db'}?mode=ro", uri=True, timeout=5) as db:
            value = db.execute(f"SELECT {what} FROM items WHERE device LIKE ?", (prefix + ".%",)).fetchone()[0]
            return int(value or 0)
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


FLOODS = ("badpw", "spam", "big", "deep", "topics", "seen", "devices", "guess", "preauth")
# What "holding" means where the bound is not one of the broker's settings:
RSS_GROWTH_MIB = 96  # broker RSS growth while one flood runs (the honest workload included)
GUESS_CHECKED = 5  # passwords checked of one burst of concurrent guesses: 3 free, then the back-off
HONEST_LOGIN_S = 2.0  # an honest login while the guesses are answered


def flood_plan(size: str, lim: dict[str, float]) -> dict[str, tuple[float, tuple[str, ...]]]:
    """Each flood's duration and its attacker's arguments."""
    each = 6.0 if ci(size) else 30.0
    flooder = ("flooder", password("flooder"))
    most = int(lim["max_devices_per_user"]) + 8 if ci(size) else 1000  # a login hashes a password: ~5/s under load
    return {"badpw": (each, ("a0",)), "spam": (each, (*flooder, "b0")), "big": (each, flooder),
            "deep": (each, (*flooder, "b0")), "topics": (each, flooder), "seen": (each, (*flooder, "victim")),
            "devices": (2 * each, ("hoarder", password("hoarder"), str(most))),
            "guess": (each, ("guessed", f"honest:{password('honest')}", "200" if ci(size) else "1000")),
            # long enough to see the connections closed by the connect timeout at the latest
            "preauth": (lim["connect_timeout_s"] + 5, ("-", "-", "100" if ci(size) else "300"))}


def run_flood(size: str, workdir: Path, progress: Progress) -> Row:
    began = time.monotonic()
    floods: dict[str, Any] = {}
    lim = limits(deep_merge(FAST, DEFAULT_LIMITS))
    plan = flood_plan(size, lim)
    total = sum(seconds for seconds, _args in plan.values())
    honest = Plan(pairs=3 if ci(size) else 6, per_sender=int(total * 8 + 40), rate=8.0)
    extra = ("flooder", "victim", "hoarder", "guessed", "honest")
    with running(workdir, honest, progress, DEFAULT_LIMITS, extra_users=extra) as (broker, work):
        outcome(attack("login", broker.port, 5, "victim", password("victim"), "phone"))  # known, offline
        work.start()
        time.sleep(2.0)
        floods["baseline_p99_ms"] = work.ledger.p99_ms(work.started_at, time.monotonic())
        t0 = time.monotonic()
        for kind, (seconds, args) in plan.items():
            began_kind = time.monotonic()
            checked = broker.metric("chat_logins_total", result="bad_password")
            proc = attack(kind, broker.port, seconds, *args)
            rss = sample_while(proc, broker.rss_kib)
            result = outcome(proc, timeout=seconds + 120)
            result["honest_p99_ms"] = work.ledger.p99_ms(began_kind, time.monotonic())
            result["broker_rss_kib"] = broker.rss_kib()
            result["rss_kib_growth"] = growth(rss)
            if kind == "seen":
                time.sleep(1.0)  # staged receipts reach the disk within staging.flush_ms
                result["staged_receipt_bytes"] = staged(broker.data_dir, "victim", "sum(length(receipt))")
                result["staged_items"] = staged(broker.data_dir, "victim")
            elif kind == "devices":
                result["devices_registered"] = devices(broker.data_dir, "hoarder")
            elif kind == "guess":
                after = broker.metric("chat_logins_total", result="bad_password")
                result["passwords_checked"] = None if after is None or checked is None else int(after - checked)
            floods[kind] = result
            progress(f"  flood {kind}: {result}")
        t1 = time.monotonic()
        work.wait_senders(180)
        checks = judge_floods(floods, lim, plan["seen"][0])
        rate = floods.get("badpw", {}).get("per_s")
        return row("floods", work, broker, len(FLOODS),
                   f"bad passwords ({rate}/s), publish as fast as possible, 5 MB payloads, 50,000-deep JSON, "
                   "thousands of topics, seen reports of 1,000 ids, ever new devices, concurrent guesses, "
                   f"4 MiB CONNECTs never finished; {plan['spam'][0]:.0f} s each", (t0, t1), began, floods=floods,
                   checks=checks)


def limits(config: dict[str, Any]) -> dict[str, float]:
    """The limits the floods are judged by: the broker's config, else the shipped defaults (config/broker.yaml)."""
    given = config.get("limits", {})
    return {"send_burst": given.get("send_burst", 200), "send_rate_per_s": given.get("send_rate_per_s", 20.0),
            "max_devices_per_user": given.get("max_devices_per_user", 16),
            "connect_timeout_s": given.get("connect_timeout_s", 10.0)}


def check(ok: bool, figure: str) -> dict[str, Any]:
    return {"ok": ok, "figure": figure}


def judge_floods(floods: dict[str, Any], lim: dict[str, float], seen_s: float) -> dict[str, dict[str, Any]]:
    """Pass/fail of the new floods from their figures (pure: unit-tested in tests/chaos/test_ledger.py)."""
    out: dict[str, dict[str, Any]] = {}
    seen = floods.get("seen", {})
    if seen:
        # One report per message the rate limit lets through: at most burst + rate x time of them staged.
        allowed = int((lim["send_burst"] + lim["send_rate_per_s"] * seen_s) * seen.get("report_bytes", 0) * 1.25)
        staged_bytes, grew = seen.get("staged_receipt_bytes", -1), seen.get("rss_kib_growth") or 0
        out["seen flood"] = check(
            0 <= staged_bytes <= allowed and grew <= RSS_GROWTH_MIB * 1024,
            f"{seen.get('published')} reports of {seen.get('ids_per_report')} ids published, answers "
            f"{seen.get('answers')}; {seen.get('staged_items')} receipts, {staged_bytes} bytes, staged for the victim "
            f"(bound {allowed} bytes); "
            f"RSS +{grew} KiB (bound {RSS_GROWTH_MIB} MiB)")
    dev = floods.get("devices", {})
    if dev:
        most = int(lim["max_devices_per_user"])
        registered = dev.get("devices_registered", -1)
        out["device flood"] = check(
            0 <= registered <= most and dev.get("accepted", 0) <= most,
            f"{dev.get('attempts')} new client ids, {dev.get('accepted')} accepted, answers "
            f"{dev.get('connack_codes')}; {registered} devices registered (bound limits.max_devices_per_user {most})")
    guessed = floods.get("guess", {})
    if guessed:
        checked = guessed.get("passwords_checked")
        out["concurrent guessing"] = check(
            # Guesses may also be closed unanswered (a cap on unauthenticated connections): none may get in.
            checked is not None and checked <= GUESS_CHECKED and "0" not in guessed.get("connack_codes", {"0": 1})
            and guessed.get("honest_connack") == 0 and guessed.get("honest_login_s", 1e9) <= HONEST_LOGIN_S,
            f"{guessed.get('attempts')} wrong passwords at once: {guessed.get('answered')} answered "
            f"{guessed.get('connack_codes')} within {guessed.get('last_answer_s')} s, {checked} checked "
            f"(bound {GUESS_CHECKED}); an honest login took {guessed.get('honest_login_s')} s "
            f"(bound {HONEST_LOGIN_S} s)")
    pre = floods.get("preauth", {})
    if pre:
        deadline = lim["connect_timeout_s"] + 2
        grew = pre.get("rss_kib_growth") or 0
        out["pre-auth buffering"] = check(
            grew <= RSS_GROWTH_MIB * 1024 and pre.get("still_open_at_end") == 0
            and (pre.get("closed_after_s_max") or 0) <= deadline,
            f"{pre.get('connections')} CONNECTs declared 4 MiB, {pre.get('pushed_mib')} MiB pushed; RSS +{grew} KiB "
            f"(bound {RSS_GROWTH_MIB} MiB); closed after {pre.get('closed_after_s_median')} s (median), "
            f"{pre.get('closed_after_s_max')} s (max, bound {deadline:.0f} s), {pre.get('still_open_at_end')} open "
            "at the end")
    return out


def sample_while(proc: subprocess.Popen[str], rss: Callable[[], int | None], every: float = 0.5) -> list[int]:
    """The broker's RSS (KiB) every ``every`` seconds until ``proc`` has exited."""
    series: list[int] = []
    while proc.poll() is None:
        value = rss()
        if value is not None:
            series.append(value)
        time.sleep(every)
    return series


def growth(series: list[int]) -> int | None:
    return max(series) - series[0] if series else None


def devices(data_dir: Path, user: str) -> int:
    """Devices registered for ``user`` (read-only, as staged())."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'users.db'}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM devices WHERE user = ?", (user,)).fetchone()[0])
    except sqlite3.Error:
        return -1


# --- 7. hostile input -------------------------------------------------------------------------


STOP_S = 15.0  # a graceful stop that takes longer is taken as hung (killed, and the check fails)


def run_hostile(size: str, workdir: Path, progress: Progress) -> Row:
    seconds = 10.0 if ci(size) else 60.0
    plan = Plan(pairs=3 if ci(size) else 6, per_sender=int(seconds * 10 + 90), rate=8.0)
    began = time.monotonic()
    with running(workdir, plan, progress, extra_users=("mallory", "victim")) as (broker, work):
        outcome(attack("login", broker.port, 5, "victim", password("victim"), "phone"))  # known, offline
        work.start()
        t0 = time.monotonic()
        result = outcome(attack("hostile", broker.port, seconds, "mallory", password("mallory"),
                                *work.users), timeout=seconds * 20 + 120)
        progress(f"  hostile: {result}")
        text = outcome(attack("text", broker.port, 15, "mallory", password("mallory"), "victim"), timeout=120)
        progress(f"  hostile text: {text}")
        time.sleep(1.0)  # the honest messages sent after the hostile text are staged behind it
        stopping = time.monotonic()
        code = broker.stop(STOP_S)  # what was staged must survive a restart; and a stop must end
        stop_s = round(time.monotonic() - stopping, 1)
        broker.start()
        progress(f"  hostile: graceful restart, exit code {code} after {stop_s} s")
        t1 = time.monotonic()
        work.wait_senders(180)
        examples = sum(result.get("examples", {}).values())
        checks = {"hostile text": check(
            text.get("unanswered") == [] and text.get("accepted") == 0
            and text.get("refused", 0) >= text.get("payloads", 1),
            f"{text.get('payloads')} payloads with a lone surrogate ({text.get('by_kind')}): {text.get('refused')} "
            f"refused, {text.get('accepted')} accepted, answers {text.get('answers')}, unanswered "
            f"{text.get('unanswered')}"),
            "stop after hostile text": check(code == 0, f"SIGTERM: exit code {code} after {stop_s} s "
                                                        f"(killed after {STOP_S:.0f} s: -9)")}
        return row("hostile input", work, broker, examples + int(text.get("payloads", 0)),
                   f"{examples} Hypothesis examples: envelopes (forged from, to victims), guessed acks, seen, "
                   f"requests, victims' topics, raw MQTT; {text.get('payloads')} uplinks with a lone surrogate in "
                   "one field each; a graceful restart", (t0, t1), began, hostile=result, text=text,
                   stop_exit_code=code, stop_seconds=stop_s, foreign_messages_received=sum(work.foreign.values()),
                   checks=checks)
