"""Ping round trip with N idle clients connected: does a request slow down as users connect?

    python -m bench.ping_idle [--idle 2000] [--pings 500] [--baseline 10]

Starts the real broker as a subprocess (``python -m chatserver run --bind 127.0.0.1:0``)
on a fresh data directory, creates the users with ``python -m chatserver user import``,
connects ``--baseline`` idle authenticated clients (each subscribed to its inbox
``u/{me}/in``), measures ``--pings`` sequential ``ping`` requests from one extra
client (``u/{me}/req`` -> ``res`` on ``u/{me}/in``), then connects more idle
clients up to ``--idle`` and measures again. Prints p50/p99/mean for both and the
ratio, and writes bench/results/ping_idle.{json,md} with machine information.

The clients are a minimal MQTT 3.1.1 client on asyncio (one process, one socket
per client), not paho: 2,000 paho clients would need 2,000 threads. Everything
this script starts (the broker, the import runs, the sockets, the data
directory) is stopped or removed before it exits, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import READY, REPO, RESULTS, BenchError, CpuMeter, machine_info, raise_fd_limit, write_results
from bench.common import mqtt_str as _str
from bench.common import packet as _packet
from bench.common import rss_kib as _rss_kib

START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0  # CONNACK waits for scrypt; many logins queue behind each other
REQUEST_TIMEOUT_S = 10.0
CONNECT_PARALLEL = 32  # logins in flight; the broker hashes 2 passwords at once anyway
IMPORT_CHUNK = 250  # users per ``user import`` run, so progress can be shown
KEEPALIVE_S = 600  # idle clients send a PINGREQ every half of this (none during a normal run)
PORTS_PER_SOURCE = 20_000  # connections per 127.0.0.x source address
WARMUP_PINGS = 50
DEVICE = "bench"

CONNACK, PUBLISH, SUBACK = 2, 3, 9


# --- a minimal MQTT 3.1.1 client (packet encoding: bench.common) ------------------------


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(packet type, flags, body) of the next packet."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise BenchError("broker sent a malformed remaining length")
    return first >> 4, first & 0x0F, await reader.readexactly(length) if length else b""


class Client:
    """One authenticated device subscribed to its inbox; PUBACKs what it receives."""

    def __init__(self, user: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.user = user
        self._reader = reader
        self._writer = writer
        self._tasks: list[asyncio.Task[None]] = []
        self._next_id = 1

    @classmethod
    async def connect(cls, host: str, port: int, user: str, password: str, source: str | None = None) -> Client:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
        try:
            flags = 0xC2  # username, password, clean session
            writer.write(_packet(0x10, _str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE_S)
                                 + _str(f"{user}.{DEVICE}".encode()) + _str(user.encode()) + _str(password.encode())))
            kind, _, body = await asyncio.wait_for(_read_packet(reader), REPLY_TIMEOUT_S)
            if kind != CONNACK or body[-1:] != b"\x00":
                raise BenchError(f"{user}: login refused (CONNACK {body.hex()})")
            writer.write(_packet(0x82, b"\x00\x01" + _str(f"u/{user}/in".encode()) + b"\x01"))
            kind, _, body = await asyncio.wait_for(_read_packet(reader), REPLY_TIMEOUT_S)
            if kind != SUBACK or body[2:] != b"\x01":
                raise BenchError(f"{user}: inbox subscription refused (SUBACK {body.hex()})")
        except BaseException:
            writer.close()
            raise
        return cls(user, reader, writer)

    def start(self, on_payload: Callable[[bytes], None] | None = None) -> None:
        self._tasks = [asyncio.create_task(self._read_loop(on_payload)), asyncio.create_task(self._keepalive())]

    async def _read_loop(self, on_payload: Callable[[bytes], None] | None) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, flags, body = await _read_packet(self._reader)
                if kind != PUBLISH:
                    continue  # PUBACK, PINGRESP
                start = 2 + struct.unpack("!H", body[:2])[0]
                if flags & 0x06:  # QoS 1: acknowledge
                    self._writer.write(_packet(0x40, body[start:start + 2]))
                    start += 2
                if on_payload is not None:
                    on_payload(body[start:])

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S / 2)
            self._writer.write(b"\xc0\x00")

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 publish (its PUBACK is read and ignored)."""
        packet_id = self._next_id
        self._next_id = self._next_id % 65535 + 1
        self._writer.write(_packet(0x32, _str(topic.encode()) + struct.pack("!H", packet_id) + payload))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(b"\xe0\x00")  # DISCONNECT
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Pinger:
    """Sends ``ping`` requests one at a time and times request -> ``res``."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._count = 0
        client.start(self._on_payload)

    def _on_payload(self, payload: bytes) -> None:
        item = json.loads(payload)
        future = self._waiting.pop(item.get("rid", ""), None) if item.get("kind") == "res" else None
        if future is not None and not future.done():
            future.set_result(item)

    async def ping(self) -> float:
        """One round trip in milliseconds."""
        self._count += 1
        rid = f"p{self._count}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        payload = json.dumps({"rid": rid, "op": "ping"}).encode()
        started = time.perf_counter_ns()
        self._client.publish(f"u/{self._client.user}/req", payload)
        try:
            item = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise BenchError(f"no answer to ping {rid} within {REQUEST_TIMEOUT_S:.0f}s") from None
        finally:
            self._waiting.pop(rid, None)
        elapsed_ms = (time.perf_counter_ns() - started) / 1e6
        if item.get("ok") is not True:
            raise BenchError(f"ping failed: {item}")
        return elapsed_ms


# --- the broker subprocess ----------------------------------------------------------------


def import_users(data_dir: Path, names: list[str], password: str) -> None:
    """Create the users with ``python -m chatserver user import`` (scrypt: slow), showing progress."""
    started = time.monotonic()
    for start in range(0, len(names), IMPORT_CHUNK):
        chunk = names[start:start + IMPORT_CHUNK]
        users_file = data_dir.parent / "users.txt"
        users_file.write_text("".join(f"{name}:{password}\n" for name in chunk), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "chatserver", "user", "import", str(users_file), "--data-dir", str(data_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )
        users_file.unlink()
        if done.returncode != 0:
            raise BenchError(f"user import failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        count = start + len(chunk)
        elapsed = time.monotonic() - started
        eta = elapsed / count * (len(names) - count)
        print(f"  users imported: {count}/{len(names)}  ({elapsed:.0f} s, ~{eta:.0f} s left)", flush=True)


class BrokerProcess:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self._data_dir = data_dir
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> tuple[str, int]:
        with self._log_path.open("wb") as log:  # the child keeps its own descriptor
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chatserver", "run", "--bind", "127.0.0.1:0", "--data-dir", str(self._data_dir),
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = (await asyncio.wait_for(self._proc.stdout.readline(), max(remaining, 0.01))).decode()
            except TimeoutError:
                raise BenchError(f"broker not ready within {START_TIMEOUT_S:.0f}s; see {self._log_path}") from None
            if not line:
                raise BenchError(f"broker exited ({await self._proc.wait()}): {self.log_tail()}")
            if line.startswith(READY):
                break
        self._drain = asyncio.create_task(self._drain_stdout())
        for field in line[len(READY):].split():
            name, _, value = field.partition("=")
            if name == "tcp":
                host, _, port = value.rpartition(":")
                return host, int(port)
        raise BenchError(f"no tcp listener in {line.strip()!r}")

    async def _drain_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while await self._proc.stdout.readline():
            pass

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def rss_kib(self) -> int | None:
        return _rss_kib(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL if it takes over a minute."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 60)
            except TimeoutError:
                print("  broker did not stop within 60 s: killing it", file=sys.stderr)
                self._proc.kill()
                await self._proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
        return self._proc.returncode


# --- the benchmark ------------------------------------------------------------------------


def idle_name(index: int) -> str:
    return f"idle{index:06d}"


async def connect_idle(host: str, port: int, password: str, first: int, last: int, clients: list[Client]) -> float:
    """Connect idle clients ``first..last-1`` (appended to ``clients``); returns seconds taken."""
    slots = asyncio.Semaphore(CONNECT_PARALLEL)
    started = time.monotonic()
    total = last - first
    step = max(1, total // 20)

    async def one(index: int) -> None:
        # Many connections from one source address can run out of ephemeral
        # ports; spread them over 127.0.0.1, 127.0.0.2, ...
        source = f"127.0.0.{1 + index // PORTS_PER_SOURCE}"
        async with slots:
            client = await Client.connect(host, port, idle_name(index), password, source)
        client.start()
        clients.append(client)
        done = len(clients) - first
        if done % step == 0 or done == total:
            elapsed = time.monotonic() - started
            print(f"  idle clients connected: {len(clients)}/{last}  ({done / elapsed:.0f}/s, "
                  f"~{elapsed / done * (total - done):.0f} s left)", flush=True)

    async with asyncio.TaskGroup() as group:
        for index in range(first, last):
            group.create_task(one(index))
    return time.monotonic() - started


def summarise(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": statistics.median(samples), "p90_ms": cuts[89], "p99_ms": cuts[98],
        "mean_ms": statistics.fmean(samples), "min_ms": min(samples), "max_ms": max(samples),
        "stdev_ms": statistics.stdev(samples),
    }


async def run(idle_counts: list[int], pings: int, password: str, data_dir: Path, log_path: Path) -> dict[str, Any]:
    broker = BrokerProcess(data_dir, log_path)
    clients: list[Client] = []
    pinger_client: Client | None = None
    phases: list[dict[str, Any]] = []
    try:
        host, port = await broker.start()
        print(f"broker ready on {host}:{port} (pid {broker.pid})", flush=True)
        pinger_client = await Client.connect(host, port, "pinger", password)
        pinger = Pinger(pinger_client)
        for count in idle_counts:
            print(f"connecting idle clients up to {count} ...", flush=True)
            took = await connect_idle(host, port, password, len(clients), count, clients)
            if not broker.alive():
                raise BenchError(f"broker died: {broker.log_tail()}")
            # The load generator's own garbage collector must not show up in the
            # broker's numbers: freeze what exists (2,000 clients' objects) first.
            gc.collect()
            gc.freeze()
            for _ in range(WARMUP_PINGS):
                await pinger.ping()
            print(f"measuring {pings} pings with {count} idle clients ...", flush=True)
            cpu = CpuMeter({"broker": [broker.pid]})
            samples = [await pinger.ping() for _ in range(pings)]
            cores = cpu.cores()
            broker_cores, other_cores = cores["broker"], cores["others"]
            stats = summarise(samples)
            phases.append({"idle_clients": count, "connect_s": round(took, 1), "broker_rss_kib": broker.rss_kib(),
                           # CPU used during the measurement, in cores: by the broker, and by
                           # processes other than the broker and this benchmark (noise).
                           "broker_cpu_cores": broker_cores, "other_cpu_cores": other_cores,
                           **{key: round(value, 4) for key, value in stats.items()},
                           "samples_ms": [round(sample, 4) for sample in samples]})
            print(f"  N={count}: p50 {stats['p50_ms']:.3f} ms  p99 {stats['p99_ms']:.3f} ms  "
                  f"mean {stats['mean_ms']:.3f} ms", flush=True)
        return {"phases": phases}
    except (BenchError, OSError):
        print(f"broker log (tail):\n{broker.log_tail()}", file=sys.stderr)
        raise
    finally:
        print(f"closing {len(clients) + (pinger_client is not None)} client(s) and stopping the broker ...",
              flush=True)
        await asyncio.gather(*(c.close() for c in [*clients, *([pinger_client] if pinger_client else [])]),
                             return_exceptions=True)
        code = await broker.stop()
        print(f"broker stopped (exit code {code})", flush=True)


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Ping round trip with idle clients connected",
        "",
        f"`python -m bench.ping_idle --idle {result['config']['idle']} --pings {result['config']['pings']}`"
        f" on {m['date']}: {m['nproc']} CPU(s) ({m['cpu_model']}), {m['memory_mib']} MiB,"
        f" Python {m['python']}, amqtt {m['amqtt']}, uvloop {m['uvloop']}, {m['platform']}.",
        "",
        "One client sends sequential `ping` requests (`u/{me}/req` -> `res` on `u/{me}/in`, QoS 1) while N other"
        " authenticated clients sit idle, each subscribed to its own inbox. Broker and clients share the machine;"
        " the CPU columns are cores busy during the measurement (\"other\": neither the broker nor the benchmark).",
        "",
        "| idle clients | p50 ms | p90 ms | p99 ms | mean ms | min ms | max ms | broker RSS MiB | connect s"
        " | broker CPU | other CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in result["phases"]:
        rss = f"{p['broker_rss_kib'] / 1024:.0f}" if p["broker_rss_kib"] else "?"
        lines.append(f"| {p['idle_clients']} | {p['p50_ms']:.3f} | {p['p90_ms']:.3f} | {p['p99_ms']:.3f} |"
                     f" {p['mean_ms']:.3f} | {p['min_ms']:.3f} | {p['max_ms']:.3f} | {rss} | {p['connect_s']} |"
                     f" {_cores(p['broker_cpu_cores'])} | {_cores(p['other_cpu_cores'])} |")
    ratio = result.get("ratio")
    if ratio:
        lines += ["", f"Ratio N={ratio['idle']} / N={ratio['baseline']}: p50 x{ratio['p50']:.2f},"
                      f" p99 x{ratio['p99']:.2f}, mean x{ratio['mean']:.2f}."]
        if ratio.get("rss_kib_per_client") is not None:
            lines.append(f"Broker memory: about {ratio['rss_kib_per_client']:.0f} KiB per idle client.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ping_idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle clients in the second run (default 2000)")
    parser.add_argument("--baseline", type=int, default=10, help="idle clients in the first run (default 10)")
    parser.add_argument("--pings", type=int, default=500, help="sequential pings measured per run (default 500)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    if args.pings < 2 or args.baseline < 0 or args.idle < args.baseline:
        parser.error("need --pings >= 2 and 0 <= --baseline <= --idle")
    idle_counts = sorted({args.baseline, args.idle})

    workdir = Path(tempfile.mkdtemp(prefix="bench-ping-idle-"))
    data_dir, log_path = workdir / "data", workdir / "broker.log"
    try:
        limit = raise_fd_limit(args.idle + 256)
        names = ["pinger", *(idle_name(i) for i in range(args.idle))]
        password = f"bench-{os.urandom(6).hex()}"
        print(f"importing {len(names)} users into {data_dir} (scrypt: about 25 ms each on 2 cores) ...", flush=True)
        import_users(data_dir, names, password)
        measured = asyncio.run(run(idle_counts, args.pings, password, data_dir, log_path))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    phases = measured["phases"]
    result: dict[str, Any] = {
        "benchmark": "ping_idle",
        "config": {"idle": args.idle, "baseline": args.baseline, "pings": args.pings, "warmup_pings": WARMUP_PINGS,
                   "keepalive_s": KEEPALIVE_S, "rlimit_nofile": limit},
        "machine": machine_info(),
        "phases": phases,
    }
    if len(phases) == 2:
        low, high = phases
        rss = (high["broker_rss_kib"] - low["broker_rss_kib"]) / (high["idle_clients"] - low["idle_clients"]) \
            if high["broker_rss_kib"] and low["broker_rss_kib"] else None
        result["ratio"] = {
            "baseline": low["idle_clients"], "idle": high["idle_clients"],
            "p50": round(high["p50_ms"] / low["p50_ms"], 3), "p99": round(high["p99_ms"] / low["p99_ms"], 3),
            "mean": round(high["mean_ms"] / low["mean_ms"], 3),
            "rss_kib_per_client": round(rss, 1) if rss is not None else None,
        }
        print(f"ratio N={high['idle_clients']} / N={low['idle_clients']}: p50 x{result['ratio']['p50']:.2f}  "
              f"p99 x{result['ratio']['p99']:.2f}  mean x{result['ratio']['mean']:.2f}")
    json_path, md_path = write_results("ping_idle", result, markdown(result), args.out)
    print(f"results: {json_path} {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
