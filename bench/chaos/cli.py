"""``python -m bench chaos [--cluster] [--scenario X[,Y]] [--full]``: run the fault scenarios, publish the figures.

Writes bench/results/chaos.json (every figure) and chaos.md, and regenerates the
table in docs/RELIABILITY.md; with ``--cluster``, the cluster-mode scenarios
(bench/chaos/cluster.py) into chaos-cluster.json/.md and their own table there.
Running a subset replaces those scenarios' rows and
keeps the others from the last run. Exits 1 if any message was lost, duplicated,
reordered, misrouted, or got a false ``sent``, or a scenario's own check failed (a
flood not held within its bound, a hostile uplink not refused).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.chaos import broker, report, workload
from bench.chaos.scenarios import MountFailed, Scenario, all_scenarios
from bench.common import RESULTS, BenchError, machine_info, write_results

BAD = ("lost", "duplicated", "reordered", "false_sent", "misrouted", "unknown")


def main(argv: list[str]) -> int:
    results = "chaos-cluster" if "--cluster" in argv else "chaos"  # bench/results/{results}.json
    scenarios = suite(results)
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="all",
                        help=f"comma-separated, from: {', '.join(scenarios)} (default all)")
    parser.add_argument("--cluster", action="store_true", help="the cluster-mode scenarios: 3 broker nodes behind "
                        "HAProxy on a Redis Cluster (results in chaos-cluster.json/.md)")
    parser.add_argument("--full", action="store_true", help="full sizes (20 broker kills, ...; ~20 min), "
                        "else the CI sizes (~3 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--doc", type=Path, default=report.DOC, help="the document whose table is regenerated")
    parser.add_argument("--note", action="append", default=[], help="a note printed under the table (repeatable)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--settle-s", type=float, default=workload.SETTLE_S,
                        help="how long every delivery may take to arrive after the faults (default %(default)s)")
    parser.add_argument("--render", action="store_true", help="only re-render chaos.md and the table from chaos.json")
    parser.add_argument("--amqtt-path", action="store_true",
                        help="chat devices on amqtt's path, not the default lean one (mqtt.lean_sessions off;"
                             " use with --out and --doc)")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.out / f"{results}.json").read_text(encoding="utf-8"))
        write_results(results, result, report.details(result, results), args.out)
        return 0 if report.update_doc(result, args.doc, results) else 1
    names = list(scenarios) if args.scenario == "all" else [n.strip() for n in args.scenario.split(",")]
    unknown = set(names) - set(scenarios)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    size = "full" if args.full else "ci"
    workload.SETTLE_S = args.settle_s
    broker.AMQTT_PATH = args.amqtt_path
    shown = [a for a, before in zip(argv, ["", *argv[:-1]], strict=True) if a != "--note" and before != "--note"]
    command = "python -m bench chaos " + " ".join(shlex.quote(a) for a in shown)
    workdir = Path(tempfile.mkdtemp(prefix="chat-chaos-"))
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            print(f"[chaos {name}] {size} size ...", flush=True)
            try:
                r = scenarios[name](size, workdir / name, lambda line: print(line, flush=True))
            except MountFailed as exc:
                print(f"[chaos {name}] skipped: {exc}", flush=True)
                continue
            except (BenchError, OSError, AssertionError) as exc:
                traceback.print_exc()
                r = {"scenario": name, "failed": str(exc)}
            r["key"] = name
            rows.append(r)
            print(f"[chaos {name}] " + ", ".join(f"{k} {r.get(k)}" for k in ("messages", *BAD, "honest_p99_ms",
                                                                            "seconds")), flush=True)
            for check, verdict in r.get("checks", {}).items():
                print(f"[chaos {name}] {'ok' if verdict['ok'] else 'FAILED'}: {check}: {verdict['figure']}", flush=True)
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result = merge(args.out / f"{results}.json", rows, names, list(scenarios))
    result.update({"benchmark": results, "command": command, "size": size, "machine": machine_info(),
                   "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   "seconds": round(time.monotonic() - began, 1), "notes": args.note})
    complete = [r for r in result["rows"] if "failed" not in r]
    json_path, md_path = write_results(results, {**result, "rows": complete}, report.details(
        {**result, "rows": complete}, results), args.out)
    if report.update_doc({**result, "rows": complete}, args.doc, results):
        print(f"table regenerated in {args.doc}")
    print(f"chaos: {json_path} {md_path}; {time.monotonic() - began:.0f} s")
    failed = [r["key"] for r in rows if "failed" in r or any(r.get(k) for k in BAD) or report.failed_checks(r)]
    if failed:
        print(f"chaos: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def suite(name: str) -> dict[str, Scenario]:
    """The scenarios of ``chaos`` (one broker) or ``chaos-cluster``, by name, in their table's order."""
    if name == "chaos-cluster":
        from bench.chaos.cluster import CLUSTER_SCENARIOS  # noqa: PLC0415 (needs redis-server, haproxy)

        return CLUSTER_SCENARIOS
    return all_scenarios()


def merge(path: Path, rows: list[dict[str, Any]], names: list[str], order: list[str]) -> dict[str, Any]:
    """The last run's rows with the scenarios just run replaced, in the canonical ``order``."""
    old: list[dict[str, Any]] = []
    if path.exists():
        old = [r for r in json.loads(path.read_text(encoding="utf-8")).get("rows", []) if r.get("key") not in names]
    merged = sorted([*old, *rows], key=lambda r: order.index(r["key"]) if r.get("key") in order else 99)
    return {"rows": merged}
