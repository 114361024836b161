"""The broker under test as its own process on a FIXED port, so it can be SIGKILLed and restarted in place.

``tests.helpers.BrokerProcess`` binds port 0 (a new port per start); SDK clients
keep one host:port for life, so a restart must come back on the same port, as an
operator's broker does. The log goes to a file (kept for the report).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import READY, REPO, BenchError, free_port, rss_kib

# The honest workload and the SDK's resends must not be rate limited by the defaults
# (20 msg/s per user); the flood scenario sets its own limits back to the defaults.
FAST = {"limits": {"send_burst": 1000000, "send_rate_per_s": 1000000.0}, "staging": {"flush_ms": 20}}
AMQTT_PATH = False
"""``--amqtt-path``: every broker of the run serves chat devices on amqtt's path (``mqtt.lean_sessions`` off; the
default is the lean path)."""


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


class ChaosBroker:
    """``python -m chatserver run`` on ``127.0.0.1:<port>``; ``kill()`` is SIGKILL, ``start()`` brings it back."""

    def __init__(self, workdir: Path, data_dir: Path, config: dict[str, Any] | None = None, args: tuple[str, ...] = (),
                 module: str = "chatserver", env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args, self.module, self.env = args, module, env  # a cluster node: --cluster, --node-id; its launcher
        self.config_path = workdir / "broker.json"
        self.metrics_port = free_port()
        metrics = {"metrics": {"bind": f"127.0.0.1:{self.metrics_port}"}}  # login counts for the floods
        self.config = deep_merge(deep_merge(FAST, metrics), config or {})
        if AMQTT_PATH:
            self.config = deep_merge(self.config, {"mqtt": {"lean_sessions": False}})
        self.config_path.write_text(json.dumps(self.config))  # JSON is YAML
        self.log_path = workdir / "broker.log"
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of a Prometheus sample's values whose labels include ``labels`` (None: no /metrics)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] == name and all(w in sample for w in wanted):
                total += float(value)
        return total

    def add_users(self, passwords: dict[str, str]) -> None:
        lines = "".join(f"{name}:{password}\n" for name, password in passwords.items())
        subprocess.run([sys.executable, "-m", "chatserver", "user", "import", "-", "--data-dir", str(self.data_dir)],
                       input=lines, text=True, check=True, cwd=REPO, capture_output=True, timeout=300)

    def start(self, timeout: float = 60.0) -> ChaosBroker:
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "run", "-c", str(self.config_path), "--bind", f"127.0.0.1:{self.port}",
             "--data-dir", str(self.data_dir), *self.args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        log.close()
        ready: queue.Queue[str] = queue.Queue()
        proc = self.proc

        def watch() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(READY):
                    ready.put(line)
            ready.put("")  # exited without becoming ready

        threading.Thread(target=watch, daemon=True).start()
        try:
            line = ready.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            self.kill()
            raise BenchError(f"the broker did not become ready within {timeout:.0f} s (exit code "
                             f"{self.proc.poll()}); see {self.log_path}")
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int | None:
        return rss_kib(self.pid) if self.alive else None

    def kill(self) -> None:
        """SIGKILL, no goodbye: what a crash or the OOM killer does."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful); returns the exit code, -9 if it had to be killed after ``timeout``, None if it was
        not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def log_problems(self) -> list[str]:
        """Warning, error and traceback lines of the broker's log (all starts)."""
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if any(word in line for word in ("ERROR", "CRITICAL", "Traceback"))]
