"""``scripts/cluster-local``: cluster mode on one machine in one command, to try it or to measure it.

Starts a Redis Cluster of 3 masters and 3 replicas on free loopback ports (testkit/redis_cluster.py,
in ``ROOT/redis``), then ``chat-broker run --cluster redis://... --workers N`` with its data folder
in ``ROOT/data``, prints what it started, and waits. Ctrl-C (or SIGTERM) stops the broker, then
Redis, and removes ``ROOT`` (Redis's data goes with it). Not for production: the Redis nodes are one
machine's processes, without passwords.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from testkit.redis_cluster import RedisCluster, RedisClusterError


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/cluster-local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="broker processes (default: the number of cores)")
    parser.add_argument("--bind", default="127.0.0.1:1883", help="the MQTT listener (default 127.0.0.1:1883)")
    parser.add_argument("--metrics-bind", default="127.0.0.1:9100",
                        help="worker i serves /metrics on this port + i (default 127.0.0.1:9100)")
    parser.add_argument("--root", type=Path, help="folder for Redis and the broker (default: a new temporary one)")
    parser.add_argument("-c", "--config", type=Path, help="a broker config file for the rest of the settings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="chat-cluster-"))
    redis = RedisCluster(root / "redis")
    print(f"cluster-local: starting a Redis Cluster (3 masters, 3 replicas) in {root / 'redis'} ...", flush=True)
    try:
        redis.start()
    except RedisClusterError as exc:
        print(f"cluster-local: error: {exc}", file=sys.stderr)
        return 1
    url = "redis://" + ",".join(node.address for node in redis.nodes)
    command = [sys.executable, "-m", "chatserver", "run", "--cluster", url, "--workers", str(args.workers),
               "--bind", args.bind, "--metrics-bind", args.metrics_bind, "--data-dir", str(root / "data"),
               *(["-c", str(args.config)] if args.config else [])]
    print(f"cluster-local: redis nodes {', '.join(node.address for node in redis.nodes)}", flush=True)
    print(f"cluster-local: running chat-broker {' '.join(command[3:])}", flush=True)
    print(f"cluster-local: see it with: chat-broker cluster status --cluster {url}", flush=True)
    broker = subprocess.Popen(command)  # noqa: S603 (our own CLI)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the broker gets them (Ctrl-C: from the terminal too)
        signal.signal(sig, lambda number, frame: broker.send_signal(number))
    try:
        code = broker.wait()
    finally:
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"cluster-local: broker exited with {code}; redis stopped, {root} removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
