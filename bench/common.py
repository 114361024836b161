"""Shared pieces of the benchmarks: MQTT packet helpers, /proc readers, machine facts, results files.

Nothing here starts a broker or a client by itself; ``bench.ping_idle`` and the
suite (``python -m bench``) build on these.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from testkit import packets

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
READY = "chat-broker ready:"
IDLE_GOAL = 100_000  # idle connections one process should hold (issue #20): the idle scenario asks for the limit


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


# --- MQTT 3.1.1 encoding -------------------------------------------------------------------

# The encoders of the raw-socket conformance suite (testkit/packets.py): one copy of
# the MQTT 3.1.1 bytes for tests and benchmarks.
CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ_BYTES = packets.PINGREQ
DISCONNECT_BYTES = packets.DISCONNECT
varint = packets.remaining_length
mqtt_str = packets.utf8
packet = packets.packet
connect_packet = packets.connect_packet
subscribe_packet = packets.subscribe_packet


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH."""
    return packets.publish_packet(topic, payload, 1, packet_id)


def ack_publish(topic: bytes, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH: the chat dialect's ``u/{me}/ack`` (PROTOCOL.md section 3)."""
    return packets.publish_packet(topic, payload, 0)


def split_packets(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The whole packets at the start of ``buf`` (the load generator's clients read with it): each as
    ``(first byte, where its body starts, where it ends)``, and how many bytes they take; the rest waits
    for more. Not the broker's codec: the generator must not share the code it measures."""
    found: list[tuple[int, int, int]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        length, mult, i, complete = 0, 1, pos + 1, False
        while i < n:
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult <<= 7
            i += 1
            if not byte & 0x80:
                complete = True
                break
        if not complete or i + length > n:
            break
        found.append((buf[pos], i, i + length))
        pos = i + length
    return found, pos


def publish_parts(buf: bytes, first: int, start: int, end: int) -> tuple[bytes, bytes]:
    """A PUBLISH found by ``split_packets``: its packet id (b"" at QoS 0) and its payload."""
    at = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if first & 0x06:
        return buf[at:at + 2], buf[at + 2:end]
    return b"", buf[at:end]


# --- processes, /proc ---------------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (e.g. the workers of ``chat-broker run --workers N``)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(v) for v in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (its threads included), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / CLOCK_TICK
    except (OSError, ValueError, IndexError):
        return None


def _busy_seconds() -> float | None:
    """CPU time of the whole machine spent neither idle nor in iowait."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICK


class CpuMeter:
    """CPU used over a window, in cores: per named group of processes, and by everything else.

    ``groups`` maps a name to pids (e.g. ``{"broker": [pid], "generator": [...]}``).
    This process is counted in the group named ``self_group`` if given, else in none
    (it is still kept out of "others"). "others" is the machine's busy time minus
    all of the above: other helpers' tests, the kernel's work for them, etc.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]], self_group: str | None = None) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._self_group = self_group
        self._start = self._sample()

    def _sample(self) -> tuple[float, float | None, dict[str, float]]:
        per: dict[str, float] = {}
        for name, pids in self._groups.items():
            per[name] = sum(value for value in (cpu_seconds(pid) for pid in pids) if value is not None)
        mine = os.times()
        per["__self__"] = mine.user + mine.system
        return time.monotonic(), _busy_seconds(), per

    def cores(self) -> dict[str, float | None]:
        end = self._sample()
        wall = end[0] - self._start[0]
        result: dict[str, float | None] = {}
        if wall <= 0:
            return {name: None for name in [*self._groups, "others"]}
        used = {name: end[2][name] - self._start[2].get(name, 0.0) for name in end[2]}
        for name in self._groups:
            result[name] = round(used[name] / wall, 3)
        if self._self_group is not None:
            result[self._self_group] = round(((result.get(self._self_group) or 0.0) * wall
                                              + used["__self__"]) / wall, 3)
        if self._start[1] is None or end[1] is None:
            result["others"] = None
        else:
            busy = end[1] - self._start[1]
            result["others"] = round(max(0.0, busy - sum(used.values())) / wall, 3)
        return result


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by children) to cover ``needed`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed; raise it (ulimit -Hn) or ask for less")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def try_raise_fd_hard_limit(wanted: int) -> dict[str, Any]:
    """Raise RLIMIT_NOFILE's hard limit to ``wanted`` (root needs CAP_SYS_RESOURCE for that; a container
    often lacks it): what was there, what was tried, what it is now."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    facts: dict[str, Any] = {"wanted": wanted, "hard_before": fd_hard_limit(), "cap_sys_resource": _has_capability(24)}
    with contextlib.suppress(OSError, ValueError):
        facts["nr_open"] = int(Path("/proc/sys/fs/nr_open").read_text())
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (OSError, ValueError) as exc:
            facts["refused"] = f"setrlimit(RLIMIT_NOFILE, {wanted}): {exc}"
    facts["hard"] = fd_hard_limit()
    return facts


def _has_capability(bit: int) -> bool | None:
    """Whether this process has capability ``bit`` in its effective set (None: unknown)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return None


def fd_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free now on 127.0.0.1 (a worker's metrics: port + index)."""
    while True:
        first = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first + 1, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def load_average() -> float | None:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


# --- statistics ---------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def summarise(samples: Iterable[float]) -> dict[str, float | int]:
    """count, p50/p90/p99/p99.9, mean, min, max of latency samples in ms (NaN-free dict when empty)."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50), 3), "p90_ms": round(percentile(ordered, 0.90), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3), "p999_ms": round(percentile(ordered, 0.999), 3),
        "mean_ms": round(sum(ordered) / len(ordered), 3),
        "min_ms": round(ordered[0], 3), "max_ms": round(ordered[-1], 3),
    }


# --- machine facts, results files ------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def mosquitto_version() -> str | None:
    path = shutil.which("mosquitto")
    if path is None:
        return None
    import subprocess  # noqa: PLC0415

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
        first = out.splitlines()[0] if out else ""
        return first.replace("mosquitto version", "").strip() or None
    return None


def machine_info() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_mib": memory_kib // 1024 if memory_kib else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "amqtt": _version("amqtt"),
        "uvloop": _version("uvloop"),  # the broker CLI runs on uvloop when it is installed
        "paho_mqtt": _version("paho-mqtt"),
        "mosquitto": mosquitto_version(),
        "load_average_1m": load_average(),
    }


def machine_line(m: Mapping[str, Any]) -> str:
    return (f"{m['date']}: {m['nproc']} CPU(s) ({m['cpu_model']}), {m['memory_mib']} MiB, Python {m['python']},"
            f" amqtt {m['amqtt']}, uvloop {m['uvloop']}, mosquitto {m.get('mosquitto')}, {m['platform']}")


def write_text_atomic(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(target.suffix + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(target)


def write_results(name: str, result: Mapping[str, Any], markdown_text: str, out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/{name}.json`` and ``out_dir/{name}.md``, each replaced atomically."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_text_atomic(md_path, markdown_text)
    return json_path, md_path


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(header) - 1))
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
