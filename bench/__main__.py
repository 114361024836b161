"""``python -m bench``: speed, latency, scale and memory of the chat broker, next to plain amqtt and mosquitto.

    python -m bench all                 # every scenario, full sizes (about 30-40 minutes on 2 cores)
    python -m bench all --quick         # smaller sizes, a few minutes
    python -m bench compare --targets chat,mosquitto
    python -m bench drain --profile     # with a py-spy profile of the broker
    python -m bench summary             # re-render the tables and summary.md from the JSON files
    python -m bench metrics-cost --quick  # 1:1 throughput with the metrics endpoint on vs off
    python -m bench chaos [--cluster] [--scenario X] [--full]   # faults, floods, hostile input (bench/chaos)
    python -m bench scale --quick       # one process on SQLite vs cluster mode on Redis, with mosquitto
    python -m bench groups              # a 256-member group, all online, against 255 one-to-one sends
    python -m bench mqtt-core           # parse + encode per PUBLISH/PUBACK: the sans-IO core against amqtt
    python -m bench media               # media upload/download MB/s vs a file copy, broker RSS (1 GiB)
    python -m bench logins              # device-token logins/s and broker CPU per login, both chat paths

Scenarios: compare (1:1 throughput/latency with 0/1k/10k idle users, fixed-load
latency, baselines), idle (memory per connection, CPU at rest), drain (offline
drain), restart (SIGKILL with staged items), clientcost (paho vs asyncio for the
generator), metrics-cost (the metrics endpoint on vs off), scale (cluster mode
on a local Redis Cluster against one process), groups (a 256-member group
against the same body sent one-to-one), mqtt-core (the sans-IO MQTT core's
parse and encode cost per packet against amqtt's packet classes), media (the
media endpoint's MB/s against a plain file copy, and broker memory during a
1 GiB transfer), logins (device-token logins per second, amqtt's path and the
lean path). Results:
bench/results/{scenario}.json and .md (metrics_cost.*), and summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import groups, logins, media, metrics_cost, mqtt_core, report, scale
from bench.common import (
    IDLE_GOAL,
    RESULTS,
    BenchError,
    fd_hard_limit,
    machine_info,
    raise_fd_limit,
    try_raise_fd_hard_limit,
    write_results,
)
from bench.suite import FD_RESERVE, MORE_TARGETS, SIZES, TARGETS, Suite, sizes_dict
from bench.targets import mosquitto_available

SCENARIOS = ("compare", "idle", "drain", "restart", "clientcost", "metrics-cost", "scale", "groups", "mqtt-core",
             "media", "logins")
MARKDOWN: dict[str, Callable[[dict[str, Any]], str]] = {
    "compare": report.compare_md, "idle": report.idle_md, "drain": report.drain_md,
    "restart": report.restart_md, "clientcost": report.clientcost_md, "metrics-cost": metrics_cost.markdown,
    "scale": scale.markdown, "groups": groups.markdown, "mqtt-core": mqtt_core.markdown,
    "media": media.markdown, "logins": logins.markdown,
}


def result_name(scenario: str) -> str:
    """The results file stem of a scenario (``metrics-cost`` -> ``metrics_cost``)."""
    return scenario.replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["chaos"]:  # its own options; see bench/chaos/cli.py
        from bench.chaos.cli import main as chaos_main  # noqa: PLC0415

        return chaos_main(args_in[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["all", *SCENARIOS, "summary"], help="what to run")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; numbers meaningless)")
    parser.add_argument("--targets", help=f"brokers for compare/idle, comma-separated (default {','.join(TARGETS)};"
                                           f" also {','.join(MORE_TARGETS)});"
                                           f" scale: {','.join(scale.TARGETS)} (also cluster1,cluster1-nowb)")
    parser.add_argument("--redis-replicas", type=int, default=0,
                        help="scale: replicas per Redis master (default 0: 3 masters without replicas)")
    parser.add_argument("--profile", action="store_true", help="sample our broker with py-spy during the runs")
    parser.add_argument("--pairs", type=int, help="override the number of online pairs")
    parser.add_argument("--inflight", type=int, help="override the messages each pair keeps on the way (max runs)")
    parser.add_argument("--idle-levels", help="override the idle levels of compare, e.g. 0,10000")
    parser.add_argument("--rates", help="override the offered loads (msg/s) of the open-loop runs, e.g. 100,500"
                                        " (scale runs the first)")
    parser.add_argument("--logins", type=int, help="override the users logging in at once (logins)")
    parser.add_argument("--idle-counts", help="override the connection counts of idle, e.g. 10000 (-1: as many "
                                              "as the descriptor limit allows)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep data directories and broker logs")
    args = parser.parse_args(argv)

    out_dir: Path = args.out
    if args.scenario == "summary":
        for name in SCENARIOS:  # re-render each scenario's table from its JSON (the wording may have changed)
            path = out_dir / f"{result_name(name)}.json"
            if path.exists():
                result = json.loads(path.read_text(encoding="utf-8"))
                (out_dir / f"{result_name(name)}.md").write_text(MARKDOWN[name](result), encoding="utf-8")
        print(write_summary(out_dir))
        return 0
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    overrides: dict[str, Any] = {}
    if args.pairs:
        overrides["pairs"] = args.pairs
    if args.inflight:
        overrides["inflight"] = args.inflight
    if args.idle_levels:
        overrides["idle_levels"] = [int(v) for v in args.idle_levels.split(",")]
    if args.rates:
        overrides["rates"] = [int(v) for v in args.rates.split(",")]
    if args.logins:
        overrides["logins"] = args.logins
    if args.idle_counts:
        overrides["idle_counts"] = [int(v) for v in args.idle_counts.split(",")]
    if overrides:
        sizes = dataclasses.replace(sizes, **overrides)
    known, default = ((scale.ALL_TARGETS, scale.TARGETS) if args.scenario == "scale"
                      else ((*TARGETS, *MORE_TARGETS), logins.TARGETS if args.scenario == "logins" else TARGETS))
    targets = [t.strip() for t in (args.targets or ",".join(default)).split(",") if t.strip()]
    unknown = set(targets) - set(known)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if "mosquitto" in targets and not mosquitto_available():
        print("mosquitto is not installed: leaving it out (apt-get install mosquitto)", file=sys.stderr)
        targets.remove("mosquitto")
    # "all" leaves scale out: it has its own targets (cluster) and starts a Redis Cluster.
    scenarios = [s for s in SCENARIOS if s != "scale"] if args.scenario == "all" else [args.scenario]
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    # SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C: brokers and workers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    suite = Suite(sizes, workdir, out_dir, targets, args.profile)
    started = time.monotonic()
    try:
        # The idle target is 100,000 connections in one process: ask for that much (it needs CAP_SYS_RESOURCE
        # when the hard limit is lower), and record what the machine allowed.
        fd_facts = try_raise_fd_hard_limit(IDLE_GOAL + FD_RESERVE) if "idle" in scenarios else None
        raise_fd_limit(fd_hard_limit())
        print(f"bench: sizes {sizes.name}, targets {', '.join(targets)}, workdir {workdir}", flush=True)
        for scenario in scenarios:
            began = time.monotonic()
            machine = machine_info()
            if scenario == "clientcost":
                from bench import clientcost  # noqa: PLC0415

                data = clientcost.run(sizes.name, workdir, print)
            elif scenario == "metrics-cost":
                data = metrics_cost.run(suite)
            elif scenario == "scale":
                data = scale.run(suite, args.redis_replicas)
            elif scenario == "groups":
                data = groups.run(suite)
            elif scenario == "mqtt-core":
                data = mqtt_core.run(sizes.name)
            elif scenario == "media":
                data = media.run(sizes.name, workdir)
            elif scenario == "logins":
                data = logins.run(suite)
            else:
                data = getattr(suite, scenario)()
            result = {"benchmark": scenario, "command": command, "sizes": sizes_dict(sizes), "machine": machine,
                      "profiled": args.profile, "rlimit_nofile_hard": fd_hard_limit(),
                      "seconds": round(time.monotonic() - began, 1), **data}
            if scenario == "idle":
                result["fd_limit"] = fd_facts
            json_path, md_path = write_results(result_name(scenario), result, MARKDOWN[scenario](result), out_dir)
            print(f"[{scenario}] done in {result['seconds']:.0f} s: {json_path} {md_path}", flush=True)
        print(write_summary(out_dir))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        suite.close()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"bench: finished in {time.monotonic() - started:.0f} s")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def write_summary(out_dir: Path) -> str:
    text = report.summary_md(out_dir)
    target = out_dir / "summary.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    sys.exit(main())
