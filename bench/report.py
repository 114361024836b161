"""Markdown for each scenario's result, and the summary that checks the targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import IDLE_GOAL, fmt, machine_line, md_table

TARGET_RATIO_AMQTT = 5.0
TARGET_RATIO_MOSQUITTO = 0.25
TARGET_P99_MS = 50.0
TARGET_P99_RATE = 500
TARGET_KIB_PER_CONN = 20.0
TARGET_DRAIN_S = 15.0
TARGET_IDLE = 10_000
TARGET_LEAN_KIB = 6.0  # issue #20
TARGET_LOGINS_PER_S = 5000  # issue #20
TARGET_LEAN_RATE = 3 * 3939  # issue #20: 3x the msg/s with 10,000 idle before it
TARGET_LEAN_CPU_RATIO = 4.0  # issue #20: broker CPU per message against mosquitto's
TARGET_LEAN_P99_MS = 1.0  # issue #20: at 500 msg/s with 10,000 idle
LEAN_IDLE_LEVELS = (2_000, 10_000)


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def header(result: dict[str, Any], title: str, what: str) -> list[str]:
    return [f"# {title}", "", f"`{result['command']}` (sizes: {result['sizes']['name']}) on"
            f" {machine_line(result['machine'])}.", "", what, ""]


def _ack(phase: dict[str, Any]) -> dict[str, Any]:
    chosen: dict[str, Any] = phase["sent"] if phase["sent"].get("count") else phase["puback"]
    return chosen


def compare_md(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    targets = result["targets"]
    lines = header(result, "1:1 throughput and latency, with idle users, against plain amqtt and mosquitto", (
        f"{sizes['pairs']} online pairs (one sender, one recipient each; {sizes['body_bytes']}-byte body), the same"
        " load generator for every broker. **ours**: PROTOCOL.md, durable one-to-one delivery: the recipient acks"
        " each item's seq, the sender gets `sent` and a staged `delivered` receipt (and acks it). **plain amqtt /"
        " mosquitto**: the same JSON bytes published with QoS 1 to the recipient's own topic `bench/{user}`, PUBACKed"
        " by the recipient: QoS 1 forwarding between online clients, nothing stored. Idle users are connected and"
        " subscribed to their own topic (ours: `u/{me}/in`), keepalive 60 s. *Max*: closed loop, each pair keeps"
        f" {sizes['inflight']} messages on the way; warm-up {sizes['warmup_s']} s, then {sizes['measure_s']} s"
        " measured. Latency: publish -> recipient's receipt of the message; ack: publish -> `sent` (ours) or PUBACK"
        " (baselines). CPU in cores during the measured window: broker, load generator (4 processes + coordinator),"
        " other processes (noise)."))
    rows = []
    for _name, t in targets.items():
        for p in t["phases"]:
            if p["mode"] != "max":
                continue
            d, a, c = p["deliver"], _ack(p), p["cpu_cores"]
            rows.append([t["label"], p["idle"], p["msgs_per_s"], d.get("p50_ms"), d.get("p99_ms"), d.get("p999_ms"),
                         a.get("p50_ms"), a.get("p99_ms"), c.get("broker"), c.get("generator"), c.get("others"),
                         _mib(p.get("broker_rss_kib")), phase_flags(p)])
    lines += ["## Highest sustained rate (closed loop)", ""]
    lines += md_table(["broker", "idle users", "msg/s", "deliver p50 ms", "p99 ms", "p99.9 ms", "ack p50 ms",
                       "ack p99 ms", "broker CPU", "generator CPU", "other CPU", "broker RSS MiB", "notes"], rows,
                      "lrrrrrrrrrrrl")
    ratios = ratio_rows(result)
    if ratios:
        lines += ["", "## Ours against the baselines (same run, same generator)", ""]
        lines += md_table(["idle users", "ours msg/s", "plain amqtt msg/s", "mosquitto msg/s", "ours / amqtt",
                           "ours / mosquitto"], ratios)
    rows = []
    for _name, t in targets.items():
        for p in t["phases"]:
            if p["mode"] != "rate":
                continue
            if "not_run" in p:
                rows.append([t["label"], p["idle"], p["offered_per_s"], None, None, None, None, None, None, None,
                             "not run: " + p["not_run"]])
                continue
            d, a, c = p["deliver"], _ack(p), p["cpu_cores"]
            lag = (p.get("generator_lag") or {}).get("p99_ms")
            rows.append([t["label"], p["idle"], p["offered_per_s"], p["msgs_per_s"], d.get("p50_ms"), d.get("p99_ms"),
                         d.get("p999_ms"), a.get("p99_ms"), lag, c.get("broker"), phase_flags(p)])
    if rows:
        lines += ["", "## Latency at a fixed offered load (open loop)", ""]
        lines += md_table(["broker", "idle users", "offered msg/s", "achieved msg/s", "deliver p50 ms", "p99 ms",
                           "p99.9 ms", "ack p99 ms", "generator lag p99 ms", "broker CPU", "notes"], rows,
                          "lrrrrrrrrrl")
    lines += log_problems_md({t["label"]: t.get("broker_log_problems") for t in targets.values()})
    return "\n".join(lines) + "\n"


def log_problems_md(by_label: dict[str, dict[str, Any] | None]) -> list[str]:
    """The brokers' logged warnings and errors, if any (they may explain a number)."""
    lines: list[str] = []
    for label, problems in by_label.items():
        if problems and problems.get("count"):
            lines += ["", f"**{label} logged {problems['count']} warning/error line(s)**, the first:", "", "```",
                      *problems["first"], "```"]
    return lines


def phase_flags(p: dict[str, Any]) -> str:
    notes = []
    if p.get("saturated"):
        notes.append(f"saturated ({p['skipped']} not sent)")
    if p.get("errors"):
        notes.append(f"{p['errors']} error items")
    if p.get("lost_or_late"):
        notes.append(f"{p['lost_or_late']} not delivered within 20 s")
    if p.get("duplicates"):
        notes.append(f"{p['duplicates']} duplicates")
    others = (p.get("cpu_cores") or {}).get("others")
    if others is not None and others > 0.3:
        notes.append("noisy")
    return "; ".join(notes)


def top_rates(result: dict[str, Any], name: str) -> dict[int, float]:
    """Idle users -> closed-loop msg/s of target ``name`` in a result with ``targets``."""
    phases = result["targets"].get(name, {}).get("phases", [])
    return {p["idle"]: p["msgs_per_s"] for p in phases if p["mode"] == "max"}


def ours_name(result: dict[str, Any]) -> str:
    """Our broker on its default path in a result: ``chat``, else ``chat-lean`` (the default since #20)."""
    return "chat" if "chat" in result["targets"] else "chat-lean"


def ratio_rows(result: dict[str, Any]) -> list[list[Any]]:
    ours, amqtt, mosq = (top_rates(result, name) for name in (ours_name(result), "amqtt", "mosquitto"))
    rows = []
    for level in sorted(ours):
        a, m = amqtt.get(level), mosq.get(level)
        rows.append([level, ours[level], a, m, ours[level] / a if a else None, ours[level] / m if m else None])
    return rows


def idle_md(result: dict[str, Any]) -> str:
    lines = header(result, "Idle connections: memory and CPU at rest", (
        "Idle users connect (ours: device-token login, then SUBSCRIBE `u/{me}/in`; baselines: anonymous CONNECT,"
        f" SUBSCRIBE `bench/{{user}}` QoS 1), keepalive {result['sizes']['keepalive']} s with a PINGREQ after a"
        " keepalive period of silence (as paho does). RSS per connection = (RSS with N connected - RSS at start) / N."
        f" CPU at rest: the broker's CPU over {result['sizes']['rest_s']} s with all N connected and nothing sent."
        f" The ceiling is the descriptor limit of one process (hard RLIMIT_NOFILE {result['rlimit_nofile_hard']})."))
    rows, fits = [], []
    for _name, t in result["targets"].items():
        base_cpu = t.get("base_cpu") or {}
        rows.append([t["label"], 0, None, _mib(t["base_rss_kib"]), None, base_cpu.get("broker"),
                     base_cpu.get("generator"), base_cpu.get("others")])
        for s in t["steps"]:
            cpu = s["cpu_rest"]
            rows.append([t["label"], s["idle"], s["connect_per_s"], _mib(s["rss_kib"]), s["kib_per_connection"],
                         cpu.get("broker"), cpu.get("generator"), cpu.get("others")])
        fit = idle_fit(t)
        if fit is not None:
            fits.append([t["label"], len(t["steps"]), fit["kib_per_connection"], fit["cpu_per_10k"],
                         _mib(fit["rss_kib_at_goal"]), fit["cpu_at_goal"]])
    lines += md_table(["broker", "idle connections", "connects/s", "broker RSS MiB", "KiB per connection",
                       "broker CPU at rest (cores)", "generator CPU", "other CPU"], rows)
    lines += _fd_limit_md(result.get("fd_limit"))
    if fits:
        lines += ["", f"Linear fit over the measured steps (least squares on RSS and CPU at rest against"
                  f" connections), and **extrapolated to {IDLE_GOAL:,} connections: not measured** (one process may"
                  " hold no more descriptors than its limit above):", ""]
        lines += md_table(["broker", "steps", "KiB per connection (slope)", "CPU at rest per 10,000 (cores)",
                           f"RSS at {IDLE_GOAL:,} MiB (extrapolated)", f"CPU at rest at {IDLE_GOAL:,} (extrapolated)"],
                          fits)
    lines += log_problems_md({t["label"]: t.get("broker_log_problems") for t in result["targets"].values()})
    return "\n".join(lines) + "\n"


def idle_fit(target: dict[str, Any]) -> dict[str, float] | None:
    """RSS and CPU at rest as lines through the steps (and the start): slope per connection, and the lines'
    values at ``IDLE_GOAL`` connections. None with fewer than two steps."""
    steps = target["steps"]
    if len(steps) < 2:
        return None
    xs = [0, *(s["idle"] for s in steps)]
    rss = [target["base_rss_kib"], *(s["rss_kib"] for s in steps)]
    cpu = [(target.get("base_cpu") or {}).get("broker") or 0.0, *(s["cpu_rest"].get("broker") or 0.0 for s in steps)]
    rss_slope, rss_at0 = _line(xs, rss)
    cpu_slope, cpu_at0 = _line(xs, cpu)
    return {"kib_per_connection": round(rss_slope, 2), "cpu_per_10k": round(cpu_slope * 10_000, 4),
            "rss_kib_at_goal": rss_at0 + rss_slope * IDLE_GOAL,
            "cpu_at_goal": round(cpu_at0 + cpu_slope * IDLE_GOAL, 3)}


def _line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    return slope, mean_y - slope * mean_x


def _fd_limit_md(facts: dict[str, Any] | None) -> list[str]:
    if not facts:
        return []
    if facts["hard"] >= facts["wanted"]:
        return ["", f"The descriptor limit was raised to {facts['hard']:,} for this run."]
    return ["", f"The bench asked for a descriptor limit of {facts['wanted']:,} and got {facts['hard']:,}:"
            f" {facts.get('refused', 'refused')} (CAP_SYS_RESOURCE in the effective set:"
            f" {facts.get('cap_sys_resource')}; fs.nr_open {facts.get('nr_open')}). Root without that capability"
            " cannot raise a hard limit, and several listener processes would not be one process."]


def drain_md(result: dict[str, Any]) -> str:
    d, s = result["drain"], result["stage"]
    lines = header(result, "Offline drain", (
        f"{result['messages']:,} messages ({result['body_bytes']}-byte body) are sent to one user whose only device"
        " is offline; the sender keeps up to 1,000 messages waiting for `sent` (the message is durable). Then the"
        " device connects, subscribes, and acks what it receives (one `u/{me}/ack` per read); the time runs from the"
        " start of its TCP connect until it has received and acked every message. The sender stays connected: it"
        " gets a staged `delivered` receipt for each ack of the recipient and acks it, as a phone would."))
    lines += md_table(["measure", "value"], [
        ["staging: time until all `sent`", f"{s['seconds']:.1f} s ({s['rate']:,.0f} msg/s)"],
        ["broker RSS with all staged", f"{fmt(_mib(s['broker_rss_kib']))} MiB"],
        ["drain: connect + subscribe", f"{d['connect_s'] * 1000:.1f} ms"],
        ["drain: first item", f"{d['first_item_s'] * 1000:.1f} ms"],
        ["drain: all received and acked", f"{d['all_acked_s']:.2f} s ({d['rate']:,.0f} msg/s)"],
        ["order errors / duplicates", f"{d['order_errors']} / {d['duplicates']}"],
        ["CPU during drain (broker / generator / other)",
         f"{d['cpu_cores'].get('broker')} / {d['cpu_cores'].get('generator')} / {d['cpu_cores'].get('others')}"],
    ], "lr")
    lines += log_problems_md({"chat-broker": result.get("broker_log_problems")})
    return "\n".join(lines) + "\n"


def restart_md(result: dict[str, Any]) -> str:
    d = result["drain"]
    lines = header(result, "Restart with staged items", (
        f"{result['messages']:,} messages are staged for an offline device (all `sent`, so all on disk), the broker"
        " is killed with SIGKILL and started again on the same port and data directory; the device connects"
        " (retrying until the port accepts) and drains. The sender's connection died with the broker and it does"
        " not reconnect: its `delivered` receipts are staged for it (written to disk), not sent and acked as in"
        " drain.md."))
    lines += md_table(["measure", "value"], [
        ["staging.db + WAL before the kill", f"{fmt(result['staging_db_kib'])} KiB"],
        ["SIGKILL -> ready line", f"{result['kill_to_ready_s']:.2f} s"],
        ["SIGKILL -> first staged item delivered", f"{result['kill_to_first_item_s']:.2f} s"],
        ["drain from disk after connect", f"{d['all_acked_s']:.2f} s ({d['rate']:,.0f} msg/s)"],
        ["SIGKILL -> everything delivered", f"{result['kill_to_all_delivered_s']:.2f} s"],
        ["order errors / duplicates", f"{d['order_errors']} / {d['duplicates']}"],
        ["broker RSS at ready", f"{fmt(_mib(result['rss_at_ready_kib']))} MiB"],
    ], "lr")
    lines += log_problems_md({"chat-broker": result.get("broker_log_problems")})
    return "\n".join(lines) + "\n"


def clientcost_md(result: dict[str, Any]) -> str:
    lines = header(result, "Which client is cheaper for the load generator", (
        "The same traffic through mosquitto (so that the broker is not the limit), generated once by paho-mqtt"
        " clients (one network thread each, `loop_start`) and once by this suite's asyncio protocol clients (one"
        " event loop, uvloop), each in its own process. CPU and memory are the generator process's."))
    rows = [[r["client"], r["connections"], r["messages"], r["seconds"], r["msgs_per_s"], r["cpu_us_per_msg"],
             r["rss_kib_per_connection"]] for r in result["runs"]]
    lines += md_table(["client", "connections", "messages", "seconds", "msg/s", "generator CPU µs per message",
                       "generator KiB per connection"], rows)
    return "\n".join(lines) + "\n"


# --- the targets --------------------------------------------------------------------------------------


def _load(out_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def targets_rows(out_dir: Path) -> list[list[Any]]:
    rows: list[list[Any]] = []
    compare = _load(out_dir, "compare")
    if compare:
        for level, ours, amqtt, mosq, r_a, r_m in ratio_rows(compare):
            if level != max(p for p, *_ in ratio_rows(compare)):
                continue
            if r_a is not None:
                rows.append([f"1:1 rate with {level:,} idle >= 5x plain amqtt QoS 1",
                             f"{ours:,.0f} vs {amqtt:,.0f} msg/s = {r_a:.1f}x", _met(r_a >= TARGET_RATIO_AMQTT)])
            if r_m is not None:
                rows.append([f"1:1 rate with {level:,} idle >= 25% of mosquitto", f"{ours:,.0f} vs {mosq:,.0f} msg/s"
                             f" = {100 * r_m:.0f}%", _met(r_m >= TARGET_RATIO_MOSQUITTO)])
        chat = compare["targets"].get(ours_name(compare))
        for p in (chat or {}).get("phases", []):
            if p["mode"] == "rate" and p.get("offered_per_s") == TARGET_P99_RATE and "deliver" in p:
                p99 = p["deliver"].get("p99_ms")
                if p99 is not None:
                    rows.append([f"p99 publish -> recipient <= 50 ms at 500 msg/s ({p['idle']:,} idle)",
                                 f"{p99:.1f} ms", _met(p99 <= TARGET_P99_MS)])
    idle = _load(out_dir, "idle")
    if idle and "chat" in idle["targets"]:
        steps = idle["targets"]["chat"]["steps"]
        near = [s for s in steps if s["idle"] >= TARGET_IDLE] or steps
        if near:
            s = near[0]
            rows.append([f"broker memory per idle connection <= 20 KiB ({s['idle']:,} connected)",
                         f"{s['kib_per_connection']:.1f} KiB", _met(s["kib_per_connection"] <= TARGET_KIB_PER_CONN)])
    rows += lean_rows(out_dir)
    drain = _load(out_dir, "drain")
    if drain:
        seconds = drain["drain"]["all_acked_s"]
        rows.append([f"offline drain of {drain['messages']:,} staged messages <= 15 s", f"{seconds:.1f} s",
                     _met(seconds <= TARGET_DRAIN_S) + ("" if drain["messages"] >= 100_000 else " (smaller size)")])
    return rows


def lean_rows(out_dir: Path) -> list[list[Any]]:
    """The targets of issue #20 on the lean path: idle connections (``idle.json``, else ``lean/idle.json``: the
    series up to the descriptor limit) and logins (``logins.json``)."""
    rows: list[list[Any]] = []
    idle = next((d for d in (_load(out_dir, "idle"), _load(out_dir / "lean", "idle"))
                 if d and "chat-lean" in d["targets"]), None)
    if idle:
        target = idle["targets"]["chat-lean"]
        near = [s for s in target["steps"] if s["idle"] >= TARGET_IDLE] or target["steps"]
        if near:
            s = near[0]
            rows.append([f"lean: broker memory per idle chat connection <= {TARGET_LEAN_KIB:g} KiB"
                         f" ({s['idle']:,} connected)", f"{s['kib_per_connection']:.1f} KiB",
                         _met(s["kib_per_connection"] <= TARGET_LEAN_KIB)])
        if target["steps"]:
            top = max(target["steps"], key=lambda step: step["idle"])
            fit = idle_fit(target)
            extrapolated = (f"; extrapolated, not measured: {fit['rss_kib_at_goal'] / 1024:,.0f} MiB and"
                            f" {fit['cpu_at_goal']} cores at rest at {IDLE_GOAL:,}") if fit else ""
            rows.append([f"lean: {IDLE_GOAL:,} idle chat connections in one process",
                         f"{top['idle']:,} held (descriptor limit {idle['rlimit_nofile_hard']:,}), CPU at rest"
                         f" {top['cpu_rest'].get('broker')} cores{extrapolated}", _met(top["idle"] >= IDLE_GOAL)])
    compare = _load(out_dir, "compare")
    if compare and "chat-lean" in compare["targets"]:
        rows += lean_compare_rows(compare)
    logins = _load(out_dir, "logins")
    lean = (logins or {}).get("targets", {}).get("chat-lean")
    if lean and lean["phases"]:
        rates = [p["logins_per_s"] or 0.0 for p in lean["phases"]]
        cpu = [p["broker_us_per_login"] for p in lean["phases"] if p["broker_us_per_login"] is not None]
        rounds = ", ".join(f"{p['logins_per_s'] or 0:,.0f}{' (SUBSCRIBE pipelined)' if p.get('pipelined') else ''}"
                           for p in lean["phases"])
        rows.append([f"lean: logins with device tokens >= {TARGET_LOGINS_PER_S:,}/s",
                     f"{max(rates):,.0f}/s (rounds {rounds});"
                     f" broker {min(cpu, default=0):.0f}-{max(cpu, default=0):.0f} µs per login",
                     _met(max(rates) >= TARGET_LOGINS_PER_S)])
    return rows


def cpu_us_per_message(result: dict[str, Any], name: str) -> dict[int, float]:
    """Idle users -> broker CPU µs per message in the closed loop of target ``name``."""
    phases = result["targets"].get(name, {}).get("phases", [])
    return {p["idle"]: 1e6 * p["cpu_cores"]["broker"] / p["msgs_per_s"] for p in phases
            if p["mode"] == "max" and p["msgs_per_s"] and p["cpu_cores"].get("broker") is not None}


def lean_compare_rows(compare: dict[str, Any]) -> list[list[Any]]:
    """The targets of issue #20 that ``compare`` measures: the lean path beside mosquitto in one run."""
    rows: list[list[Any]] = []
    lean, mosq = cpu_us_per_message(compare, "chat-lean"), cpu_us_per_message(compare, "mosquitto")
    for level in LEAN_IDLE_LEVELS:
        if level in lean and level in mosq:
            ratio = lean[level] / mosq[level]
            rows.append([f"lean: broker CPU per message <= {TARGET_LEAN_CPU_RATIO:g}x mosquitto's ({level:,} idle)",
                         f"{lean[level]:.0f} vs {mosq[level]:.1f} µs = {ratio:.1f}x",
                         _met(ratio <= TARGET_LEAN_CPU_RATIO)])
    rate = top_rates(compare, "chat-lean").get(TARGET_IDLE)
    if rate is not None:
        rows.append([f"lean: msg/s with {TARGET_IDLE:,} idle >= 3x 3,939 ({TARGET_LEAN_RATE:,})", f"{rate:,.0f} msg/s",
                     _met(rate >= TARGET_LEAN_RATE)])
    for p in compare["targets"]["chat-lean"]["phases"]:
        if (p["mode"] == "rate" and p.get("offered_per_s") == TARGET_P99_RATE and p["idle"] == TARGET_IDLE
                and p.get("deliver", {}).get("p99_ms") is not None):
            p99 = p["deliver"]["p99_ms"]
            rows.append([f"lean: p99 publish -> recipient <= {TARGET_LEAN_P99_MS:g} ms at {TARGET_P99_RATE} msg/s"
                         f" ({TARGET_IDLE:,} idle)", f"{p99:.2f} ms", _met(p99 <= TARGET_LEAN_P99_MS)])
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def summary_md(out_dir: Path) -> str:
    lines = ["# Benchmark summary", ""]
    sources = []
    for name in ("compare", "idle", "lean/idle", "logins", "drain", "restart", "clientcost", "scale", "groups"):
        data = _load(out_dir, name)
        if data:
            sources.append(f"- [{name}.md]({name}.md): `{data['command']}`, {machine_line(data['machine'])}"
                           f" (sizes: {data['sizes']['name']})")
    lines += ["Sources:", "", *sources, "", "## Targets", ""]
    lines += md_table(["target", "measured", "verdict"], targets_rows(out_dir), "lll")
    compare = _load(out_dir, "compare")
    if compare and ratio_rows(compare):
        lines += ["", "## Throughput, ours and theirs", ""]
        lines += md_table(["idle users", "ours msg/s", "plain amqtt msg/s", "mosquitto msg/s", "ours / amqtt",
                           "ours / mosquitto"], ratio_rows(compare))
    idle = _load(out_dir, "idle")
    if idle:
        rows = []
        for t in idle["targets"].values():
            for s in t["steps"]:
                rows.append([t["label"], s["idle"], s["kib_per_connection"], s["cpu_rest"].get("broker")])
        lines += ["", "## Idle connections", ""]
        lines += md_table(["broker", "connections", "KiB per connection", "CPU at rest (cores)"], rows)
    scale = _load(out_dir, "scale")
    if scale:
        from bench.scale import summary_lines  # noqa: PLC0415 (bench.scale imports this module)

        lines += summary_lines(scale)
    restart = _load(out_dir, "restart")
    if restart:
        lines += ["", "## Restart", "", f"SIGKILL with {restart['messages']:,} staged: ready after"
                  f" {restart['kill_to_ready_s']:.2f} s, first item delivered after"
                  f" {restart['kill_to_first_item_s']:.2f} s, all delivered after"
                  f" {restart['kill_to_all_delivered_s']:.2f} s."]
    logins = _load(out_dir, "logins")
    if logins:
        lines += ["", "## Logins with device tokens", "", f"{logins['logins']:,} at once, each a new connection"
                  " (CONNECT with the token to SUBACK); *p*: SUBSCRIBE sent with the CONNECT ([logins.md](logins.md)).",
                  ""]
        lines += md_table(["broker", "round", "logins/s (CONNACK)", "broker µs per login", "broker CPU", "other CPU"],
                          [[t["label"], f"{p['round']}{'p' if p.get('pipelined') else ''}", p["logins_per_s"],
                            p["broker_us_per_login"],
                            p["cpu_cores"].get("broker"), p["cpu_cores"].get("others")]
                           for t in logins["targets"].values() for p in t["phases"]])
    groups = _load(out_dir, "groups")
    if groups:
        from bench.groups import headline_rows  # noqa: PLC0415 (bench.groups imports the suite, which is heavier)

        lines += ["", f"## Groups: one message to {groups['group_sizes']['members']} members against"
                      f" {groups['recipients']} one-to-one sends", ""]
        lines += md_table(["figure", "group", "one-to-one", "one-to-one / group"], headline_rows(groups), "lrrr")
    return "\n".join(lines) + "\n"
