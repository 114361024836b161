"""Sampling the broker with py-spy during a measurement, and reading the samples back.

``Profiler(pid, out_path).start()`` runs ``py-spy record --nonblocking -f raw``
(collapsed stacks: ``frame;frame;... count``) against the broker; ``stop()``
ends it. ``summarise_profile(path)`` lists the frames with the most samples:
self time (the frame was running) and total time (the frame was on the stack).

    python -m bench.profiling bench/results/profiles/throughput-idle10000.txt
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import REPO

PY_SPY_CANDIDATES = (Path(sys.executable).parent / "py-spy", Path("/tmp/venv/bin/py-spy"))


def py_spy() -> str | None:
    for candidate in PY_SPY_CANDIDATES:
        if candidate.exists():
            return str(candidate)
    return shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out_path: Path, rate: int = 200, idle: bool = False) -> None:
        self.pid = pid
        self.out_path = out_path
        self.rate = rate
        self.idle = idle
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        exe = py_spy()
        if exe is None:
            print("  (py-spy not found: no profile)", flush=True)
            return False
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        command = [exe, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.out_path),
                   "--rate", str(self.rate), "--nonblocking"]
        if self.idle:
            command.append("--idle")
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return True

    def stop(self) -> dict[str, Any] | None:
        if self._proc is None:
            return None
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = self._proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        self._proc = None
        if not self.out_path.exists():
            print(f"  (py-spy wrote no profile: {err.decode(errors='replace').strip()[-300:]})", flush=True)
            return None
        return summarise_profile(self.out_path)


def _frame_name(frame: str) -> str:
    """``handle (amqtt/broker.py:123)`` -> ``handle (amqtt/broker.py)``: lines split one function otherwise."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO}/", "python3.11/"):  # any checkout
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


LAYERS = (
    ("amqtt/", "amqtt (packets, sessions, handler)"),
    ("aiosqlite", "SQLite thread (aiosqlite)"),
    ("sqlite3", "SQLite thread (aiosqlite)"),
    ("asyncio/runners.py", "event loop (uvloop: polling, callbacks, syscalls)"),
    ("uvloop", "event loop (uvloop: polling, callbacks, syscalls)"),
    ("asyncio/", "asyncio (tasks, futures, locks, streams, wait_for)"),
    ("bridge/", "bridge (messaging, staging)"),
    ("client_sdk/", "chatproto (JSON envelopes)"),
    ("json/", "chatproto (JSON envelopes)"),
    ("broker/", "broker/ (ChatBroker, handler, wire gate)"),
    ("logging/", "logging"),
)


def layer_of(frame: str) -> str:
    for marker, layer in LAYERS:
        if marker in frame:
            return layer
    return "other"


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    module_self: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    samples = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            with contextlib.suppress(ValueError):
                count = int(count_text)
                frames = [_frame_name(f) for f in stack.split(";") if f]
                if not frames:
                    continue
                samples += count
                leaf = frames[-1]
                self_counts[leaf] += count
                module = leaf.rsplit(" (", 1)[-1].rstrip(")")
                module_self[module] += count
                layers[layer_of(leaf)] += count
                for name in set(frames):
                    total_counts[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        if not samples:
            return []
        return [(name, round(100.0 * value / samples, 1)) for name, value in counter.most_common(top)]

    return {"file": str(path), "samples": samples, "self_pct": share(self_counts),
            "total_pct": share(total_counts), "module_self_pct": share(module_self), "layers_pct": share(layers)}


def markdown(summary: dict[str, Any], title: str, top: int = 15) -> list[str]:
    lines = [f"### {title}", "", f"{summary['samples']} samples; file `{Path(summary['file']).name}`.", "",
             "| self % | frame | | total % | frame |", "| ---: | --- | --- | ---: | --- |"]
    selfs, totals = summary["self_pct"][:top], summary["total_pct"][:top]
    for i in range(max(len(selfs), len(totals))):
        a = selfs[i] if i < len(selfs) else ("", "")
        b = totals[i] if i < len(totals) else ("", "")
        lines.append(f"| {a[1]} | `{a[0]}` | | {b[1]} | `{b[0]}` |")
    lines += ["", "Self time by file: " + ", ".join(f"`{m}` {p}%" for m, p in summary["module_self_pct"][:10]), "",
              "Self time by layer: " + ", ".join(f"{m} {p}%" for m, p in summary.get("layers_pct", [])), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description="Top frames of py-spy raw profiles.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the Markdown here as well")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    lines = ["# Where our broker spends its CPU (py-spy)", "",
             "Sampled with `py-spy record --nonblocking --rate 200 -f raw` during the phases of"
             " `python -m bench compare --targets chat --idle-levels 0,10000 --profile` and `python -m bench drain"
             " --profile` (files in `profiled/profiles/`). Self: the frame was running; total: it was on the stack."
             " Time in C (socket syscalls, the garbage collector) is charged to the Python frame that called it.", ""]
    for path in args.files:
        lines += markdown(summarise_profile(path), path.stem, args.top)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
