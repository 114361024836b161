"""The brokers under test, each a subprocess on 127.0.0.1: ours, plain amqtt, mosquitto.

``Server.start()`` returns once the broker accepts connections (a ready line on
stdout, or for mosquitto a successful TCP connect); ``stop()`` sends SIGTERM and
kills after a minute; ``kill()`` is SIGKILL (the restart scenario). Each keeps
its log in the run's work directory and shows the tail when it fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import READY, REPO, BenchError, child_pids, free_port, rss_kib
from bench.users import copy_template

START_TIMEOUT_S = 120.0
PROBLEM_MARKS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "WARNING:", "ERROR:", "Error: ", "Warning: ")

CHAT_CONFIG = """\
# Benchmark configuration (bench/targets.py): the defaults, with the per-user
# send limits, per-connection pacing and queue bound raised so that the load
# generator is neither refused nor slowed down. Every simulated client comes
# from 127.0.0.1, so the cap on connections per address not logged in yet is off.
limits:
  send_burst: 1000000
  send_rate_per_s: 1000000.0
  publishes_per_s: 0
  max_unauthenticated_per_address: 0
delivery:
  max_queue: 200000
"""

LEAN_CONFIG = "mqtt:\n  lean_sessions: true\n"  # added to CHAT_CONFIG: chat sessions on the lean path (broker/lean.py)

MOSQUITTO_CONFIG = """\
# Benchmark configuration (bench/targets.py)
listener {port} 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
max_queued_messages 100000
max_inflight_messages 64
log_dest stderr
log_type error
log_type warning
set_tcp_nodelay true
"""


class Server:
    name = "?"
    dialect = "mqtt"
    label = "?"
    _started = 0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        Server._started += 1
        self.log_path = workdir / f"{self.name}-{Server._started}.log"  # one per broker run

    # subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_line(self) -> str | None:
        """A stdout line prefix that means ready; None: probe the port instead."""
        return None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """The broker's processes (CPU and RSS are summed over them)."""
        return [self.pid]

    def rss_kib(self) -> int | None:
        if not self.alive():
            return None
        return sum(rss_kib(pid) or 0 for pid in self.pids())

    def start(self, port: int | None = None) -> float:
        """Start; returns seconds until it accepted connections."""
        self.port = port or self.port or free_port()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.command(), cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                          stdin=subprocess.DEVNULL)
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True).start()
        marker = self.ready_line()
        deadline = started + START_TIMEOUT_S
        while True:
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.name} not ready within {START_TIMEOUT_S:.0f}s: {self.log_tail()}")
            if marker is not None:
                try:
                    line = self._lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    raise BenchError(f"{self.name} exited ({self._proc.wait()}): {self.log_tail()}")
                if line.startswith(marker):
                    break
            else:
                if self._proc.poll() is not None:
                    raise BenchError(f"{self.name} exited ({self._proc.returncode}): {self.log_tail()}")
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                    break
                time.sleep(0.01)
        return time.monotonic() - started

    @staticmethod
    def _pump(proc: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> int | None:
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within 60 s: killing it", file=sys.stderr, flush=True)
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def log_problems(self, keep: int = 10) -> dict[str, Any]:
        """Warnings and errors the broker logged so far: how many, and the first ``keep`` lines."""
        found: list[str] = []
        count = 0
        try:
            with self.log_path.open(errors="replace") as log:
                for line in log:
                    if any(mark in line for mark in PROBLEM_MARKS):
                        count += 1
                        if len(found) < keep:
                            found.append(line.rstrip()[:400])
        except OSError:
            pass
        return {"count": count, "first": found}

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ChatServer(Server):
    """Our broker: ``python -m chatserver run`` (ChatBroker + bridge + staging store), default config + CHAT_CONFIG."""

    name = "chat"
    dialect = "chat"
    label = "chat-broker"

    def __init__(self, workdir: Path, template: Path, extra_config: str = "") -> None:
        super().__init__(workdir)
        self.data_dir = workdir / "chat-data"
        self.config_path = workdir / "chat-broker.yaml"
        self.config_path.write_text(CHAT_CONFIG + extra_config, encoding="utf-8")
        self._template = template
        self.python = [sys.executable]  # a wrapper may replace it: [*python, "-m", "chatserver", "run", ...]

    def fresh_data(self) -> None:
        copy_template(self._template, self.data_dir)

    def command(self) -> list[str]:
        return [*self.python, "-m", "chatserver", "run", *self.run_args()]

    def run_args(self) -> list[str]:
        return ["-c", str(self.config_path), "--bind",
                f"{self.host}:{self.port}", "--data-dir", str(self.data_dir)]

    def ready_line(self) -> str:
        return READY


class PathChatServer(ChatServer):
    """Our broker with ``mqtt.lean_sessions`` pinned, whatever the default (``chat`` follows it), so
    that the two connection paths can be compared in one run."""

    lean: bool

    def __init__(self, workdir: Path, template: Path, extra_config: str = "") -> None:
        super().__init__(workdir, template, f"mqtt:\n  lean_sessions: {str(self.lean).lower()}\n" + extra_config)
        self.data_dir = workdir / f"{self.name}-data"


class LeanChatServer(PathChatServer):
    """Chat sessions on the sans-IO core (broker/lean.py)."""

    name = "chat-lean"
    label = "chat-broker (lean sessions)"
    lean = True


class AmqttPathChatServer(PathChatServer):
    """Every client on amqtt's path (``mqtt.lean_sessions: false``)."""

    name = "chat-amqtt"
    label = "chat-broker (amqtt's path)"
    lean = False


class ClusterChatServer(ChatServer):
    """Our broker in cluster mode: ``--cluster URL --node-id bench --workers N`` (one node per worker,
    sharing the port with SO_REUSEPORT). Users live in Redis (``bench.users.seed_redis``): the data
    folder starts empty."""

    name = "cluster"

    def __init__(self, workdir: Path, redis_nodes: list[str], workers: int, extra_config: str = "",
                 label: str = "") -> None:
        super().__init__(workdir, workdir, extra_config)
        self.redis_nodes = redis_nodes
        self.workers = workers
        self.label = label or f"chat-broker cluster x{workers}"

    def fresh_data(self) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)

    def run_args(self) -> list[str]:
        return [*super().run_args(), "--cluster", "redis://" + ",".join(self.redis_nodes), "--node-id", "bench",
                "--workers", str(self.workers)]

    def pids(self) -> list[int]:
        return [self.pid, *child_pids(self.pid)]


class AmqttServer(Server):
    """Stock amqtt 0.12.1 (bench/amqtt_plain.py): anonymous auth plugin only, per-user topics QoS 1."""

    name = "amqtt"
    label = "plain amqtt"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.amqtt_plain", "--host", self.host, "--port", str(self.port)]

    def ready_line(self) -> str:
        return "amqtt ready:"


class MosquittoServer(Server):
    """Debian's mosquitto, anonymous, no persistence, per-user topics QoS 1."""

    name = "mosquitto"
    label = "mosquitto"

    def command(self) -> list[str]:
        path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONFIG.format(port=self.port), encoding="utf-8")
        return [path, "-c", str(conf)]


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or os.path.exists("/usr/sbin/mosquitto")
