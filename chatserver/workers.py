"""``chat-broker run --workers N``: one parent process and N broker processes sharing the listeners.

Each worker is ``python -m chatserver run`` with the parent's options plus ``--worker-index I``,
which makes it (``worker_overrides``) bind its listeners with SO_REUSEPORT (the kernel spreads new
connections over the workers), name itself ``<node_id>-<I>`` in the cluster, and serve its
metrics on the configured port + I (port 0 stays 0). A tcp listener on port 0 is resolved here
to one free port all workers share (held by a bound, not listening, SO_REUSEPORT socket).

The parent serves nothing itself. It prints one line per worker as it becomes ready, then
``chat-broker ready: tcp=HOST:PORT ... workers=N``; forwards SIGTERM and SIGINT to the workers
and waits for them; restarts a worker that dies, after a back-off, at most ``RestartPolicy``
times a minute, and past that (or if a worker cannot start at all) stops the others and exits 1:
a crash loop is a fault to look at (Redis unreachable, a bad certificate), not one to hide.
Only cluster mode has workers: on SQLite one process owns the data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatserver.binds import parse_bind
from chatserver.config import ConfigError, Settings

log = logging.getLogger("chat-broker.workers")

READY = "chat-broker ready"
STOP_S = 60.0  # a worker not gone this long after the signal is killed


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that died is started again."""

    max_deaths: int = 5
    """Deaths of one worker within ``window_s`` after which the parent gives up."""
    window_s: float = 60.0
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    """Wait before the restart after the 1st, 2nd, ... recent death (the last value repeats). A worker
    killed hard leaves its node id's lease behind, and a new worker of that id is refused until
    the lease runs out (``cluster.lease_s``, 10 s): the first four waits add up to 15 s, so the
    restarts outlast the default lease before the parent gives up."""

    def delay(self, deaths: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting a worker whose deaths (monotonic times, the one at
        ``now`` included) are ``deaths``; None: too many within ``window_s``, give up."""
        recent = sum(1 for at in deaths if now - at < self.window_s)
        if recent >= self.max_deaths:
            return None
        return self.backoff_s[min(max(recent, 1), len(self.backoff_s)) - 1]


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse what ``--workers`` cannot do, in one line (ConfigError)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be 1 or more")
    if workers == 1:
        return
    if settings.cluster is None:
        raise ConfigError(
            f"--workers {workers} needs cluster mode: on SQLite one process owns the data folder "
            "(one SQLite file, one writer); give --cluster redis://HOST:PORT (or a cluster: section), "
            "or run one process")
    last = f"{settings.cluster.node_id}-{workers - 1}"
    if len(last) > 64:
        raise ConfigError(f"cluster.node_id: with --workers {workers} the workers' ids ({last}) would be "
                          "longer than 64 characters; give a shorter --node-id")
    for name in ("tls", "ws", "wss"):
        bind = getattr(settings.listeners, name).bind
        if bind is not None and parse_bind(bind)[1] == 0:
            raise ConfigError(f"listeners.{name}.bind: port 0 with --workers would give each worker "
                              "another port; give a port")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_overrides(settings: Settings, index: int) -> dict[str, Any]:
    """What worker ``index`` changes in the settings it was given (``--worker-index``)."""
    if settings.cluster is None or settings.cluster.node_id is None:
        raise ConfigError("a worker needs cluster mode and a node id")
    overrides: dict[str, Any] = {"listeners.reuse_port": True,
                                 "cluster.node_id": f"{settings.cluster.node_id}-{index}"}
    if settings.metrics.bind is not None:
        host, port = parse_bind(settings.metrics.bind)
        if port:
            overrides["metrics.bind"] = _host_port(host, port + index)
    return overrides


def reserve_port(host: str) -> tuple[socket.socket, int]:
    """A free port on ``host``, held by a bound SO_REUSEPORT socket that never listens (so the
    kernel gives it no connection) until the workers have bound theirs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


def ready_fields(line: str) -> dict[str, str]:
    """``chat-broker ready: tcp=H:P metrics=H:P data_dir=D`` -> ``{"tcp": "H:P", ...}``."""
    _, _, rest = line.partition(":")
    return dict(part.split("=", 1) for part in rest.split() if "=" in part)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    deaths: list[float] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


class Workers:
    """The parent: ``await run()`` returns the exit code. ``command(index)`` is a worker's argv."""

    def __init__(self, count: int, command: Callable[[int], list[str]], policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic, extra_ready: str = "") -> None:
        self._workers = [_Worker(i) for i in range(count)]
        self._command = command
        self._policy = policy
        self._clock = clock
        self._extra_ready = extra_ready
        self._stopping = asyncio.Event()
        self._failed = False
        self._announced = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            async with asyncio.TaskGroup() as group:
                for worker in self._workers:
                    group.create_task(self._keep(worker))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for worker in self._workers:  # left only if the parent itself failed: leave no orphan
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
        return 1 if self._failed else 0

    def _on_signal(self, sig: int) -> None:
        if not self._stopping.is_set():
            log.info("%s: stopping %d worker(s)", signal.Signals(sig).name, len(self._workers))
        self._stop(sig)

    def _stop(self, sig: int = signal.SIGTERM) -> None:
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker`` until the parent stops, restarting it as the policy allows."""
        while not self._stopping.is_set():
            code = await self._run_once(worker)
            if self._stopping.is_set():
                if code != 0:
                    log.warning("worker %d exited with %s while stopping", worker.index, code)
                    self._failed = True
                return
            now = self._clock()
            worker.deaths.append(now)
            delay = self._policy.delay(worker.deaths, now) if self._announced else None
            if delay is None:
                why = ("before all workers were ready" if not self._announced
                       else f"{len(worker.deaths)} times within {self._policy.window_s:g} s")
                print(f"chat-broker: error: worker {worker.index} exited with {code} {why}; stopping",
                      file=sys.stderr, flush=True)
                self._failed = True
                self._stop()
                return
            log.warning("worker %d exited with %s; restarting it in %g s", worker.index, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_once(self, worker: _Worker) -> int | None:
        process = worker.process = await asyncio.create_subprocess_exec(
            *self._command(worker.index), stdout=asyncio.subprocess.PIPE)
        worker.ready = False
        if self._stopping.is_set():  # a signal came while it was being started
            process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(READY) and not worker.ready:
                self._on_ready(worker, line)
            else:
                print(line, flush=True)
        try:
            return await asyncio.wait_for(process.wait(), STOP_S if self._stopping.is_set() else None)
        except TimeoutError:
            log.warning("worker %d did not stop within %g s: killing it", worker.index, STOP_S)
            process.kill()
            return await process.wait()

    def _on_ready(self, worker: _Worker, line: str) -> None:
        worker.ready = True
        worker.fields = ready_fields(line)
        again = " again" if worker.deaths else ""
        where = " ".join(f"{key}={value}" for key, value in worker.fields.items() if key != "data_dir")
        pid = worker.process.pid if worker.process is not None else 0
        print(f"worker {worker.index} ready{again}: pid={pid} {where}", flush=True)
        if not self._announced and all(w.ready for w in self._workers):
            self._announced = True
            shared = " ".join(f"{key}={value}" for key, value in self._workers[0].fields.items()
                              if key not in ("metrics", "data_dir", "node"))
            print(f"{READY}: {shared} workers={len(self._workers)}{self._extra_ready}", flush=True)
