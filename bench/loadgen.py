"""The load generator: worker processes, each holding many MQTT connections on one uvloop.

A ``LoadGen`` (in the coordinating process) spawns ``workers`` processes and sends
them commands over pipes; each command runs in every worker it is sent to and
answers with a dict (and progress lines on the way). A connection is an
``asyncio.Protocol`` that parses MQTT 3.1.1 itself: no per-packet coroutine, no
thread, writes gathered per loop iteration (``bench.clientcost`` measures this
against paho in threads).

Two dialects, the same traffic shape:

- ``chat``: PROTOCOL.md, as a real client speaks it. CONNECT ``{user}.bench`` with
  the device token, SUBSCRIBE ``u/{me}/in`` at QoS 0 (the recommended mode, PROTOCOL.md
  section 3: the app-level ack and the server's redelivery make PUBACKs redundant); a
  message is a JSON chat message on ``u/{me}/out`` at QoS 1; the recipient acks the
  ``seq``s of ``msg`` and staged ``receipt`` items it received in one read with one
  ``u/{me}/ack {"seqs":[...]}`` at QoS 0; the sender gets ``receipt sent``, or only
  ``delivered`` when that stands for it (rule 11).
- ``mqtt``: plain MQTT, the baselines. CONNECT with client id ``{user}`` (no
  credentials), SUBSCRIBE ``bench/{me}`` (QoS 1); a message is the same JSON bytes
  published with QoS 1 to ``bench/{peer}``; the recipient PUBACKs it.

Latency is measured in the worker that holds both ends of a pair (one clock):
publish -> recipient's receipt, publish -> ``receipt sent`` (chat) and publish ->
PUBACK (both).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    PINGREQ_BYTES,
    BenchError,
    connect_packet,
)
from bench.conn import Conn, identity, message_parts

REPLY_TIMEOUT_S = 30.0
CONNECT_PARALLEL = 48  # connection attempts in flight per worker
DRAIN_TIMEOUT_S = 20.0  # after a measurement: time allowed for what is in flight to arrive

perf = time.perf_counter


# --- the worker process ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Pair:
    index: int
    sender: Conn
    recipient: Conn
    topic: bytes
    prefix: bytes
    suffix: bytes
    tag: str
    count: int = 0
    inflight: int = 0


@dataclass(slots=True)
class _LoginWindow:
    next: int = 0  # the next login of the plan to start
    open: int = 0  # logins started, not settled
    last_connack: float = 0.0
    last_ready: float = 0.0
    last_report: float = 0.0  # the last progress line (``progress``)


@dataclass
class RunState:
    mode: str = "max"
    running: bool = False
    window_start: float = 0.0
    window_end: float = 0.0
    inflight_per_pair: int = 1
    delivered_in_window: int = 0
    published_in_window: int = 0
    published: int = 0
    skipped: int = 0
    duplicates: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    deliver_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    sent_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    puback_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    lag_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]


class Worker:
    def __init__(self, pipe: multiprocessing.connection.Connection, index: int) -> None:
        self.pipe = pipe
        self.index = index
        self.lost = 0
        self.idle: list[Conn] = []
        self.pairs: list[Pair] = []
        self.others: dict[str, Conn] = {}
        self.keepalive = 60
        self.run = RunState()
        self.waiting: dict[str, tuple[float, Pair | None]] = {}  # message id -> (publish time, pair)
        self.waiting_sent: dict[str, float] = {}
        self.by_mid: dict[str, Pair] = {}
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()  # set when nothing published is still awaited (after a run)
        self._tasks: set[asyncio.Task[None]] = set()
        self.stage: dict[str, Any] = {}
        self.drain: dict[str, Any] = {}
        self._login_plan: list[tuple[str, str, bytes, str]] = []  # (user, source address, CONNECT, inbox topic)

    # --- command loop
    async def serve(self) -> None:
        # Commands are read by a thread: a pipe registered with the event loop
        # becomes non-blocking, and sending a large result on it then fails (EAGAIN).
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_pipe, args=(loop,), daemon=True, name="commands").start()
        keepalive = asyncio.ensure_future(self._keepalive_loop())
        await self._stop.wait()
        keepalive.cancel()
        for conn in self._all_conns():
            conn.close()
        await asyncio.sleep(0.05)

    def _read_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                command, args = self.pipe.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(self._stop.set)
                return
            loop.call_soon_threadsafe(self._start_command, command, args)
            if command == "quit":
                return

    def _start_command(self, command: str, args: dict[str, Any]) -> None:
        task = asyncio.ensure_future(self._run_command(command, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_command(self, command: str, args: dict[str, Any]) -> None:
        try:
            handler = getattr(self, f"cmd_{command}")
            result = await handler(**args)
            self.pipe.send(("done", result))
        except Exception as exc:
            self.pipe.send(("error", f"worker {self.index}: {command}: {exc!r}\n{traceback.format_exc(limit=6)}"))

    def progress(self, key: str, value: Any) -> None:
        self.pipe.send(("progress", (key, value)))

    def _all_conns(self) -> list[Conn]:
        conns = list(self.idle) + list(self.others.values())
        for pair in self.pairs:
            conns += [pair.sender, pair.recipient]
        return conns

    async def _keepalive_loop(self) -> None:
        # Like paho: a PINGREQ when nothing was sent for a whole keepalive period.
        while True:
            await asyncio.sleep(1.0)
            limit = time.monotonic() - self.keepalive
            for conn in self._all_conns():
                if conn.last_tx <= limit and not conn.closed:
                    conn.send(PINGREQ_BYTES)

    # --- connecting
    async def _open(self, dialect: str, user: str, host: str, port: int, source: str | None,
                    on_message: Callable[[Conn, bytes], None]) -> Conn:
        client_id, username, password, topic = identity(dialect, user)
        loop = asyncio.get_running_loop()
        connect = connect_packet(client_id, username, password, self.keepalive)

        def factory() -> Conn:
            conn = Conn(self, user, connect, topic, dialect == "chat")
            conn.on_message = on_message
            return conn

        _, conn = await loop.create_connection(factory, host, port, local_addr=(source, 0) if source else None)
        try:
            await asyncio.wait_for(conn.ready, REPLY_TIMEOUT_S)
        except BaseException:
            conn.close()
            raise
        return conn

    async def cmd_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def cmd_connect_idle(self, dialect: str, host: str, port: int, users: Sequence[str],
                               sources: Sequence[str], per_source: int, keepalive: int,
                               parallel: int = CONNECT_PARALLEL) -> dict[str, Any]:
        """Idle users log in as in a login storm (``cmd_run_logins``, with progress) and stay connected."""
        started = perf()
        await self.cmd_prepare_logins(dialect, users, sources, per_source, keepalive)
        result = await self.cmd_run_logins(dialect, host, port, parallel, progress=True)
        if result["failures"]:
            raise BenchError(f"{result['failures']} of {len(users)} connections failed, e.g."
                             f" {result['failure_samples']}")
        return {"connected": result["logins"], "seconds": perf() - started, "total_idle": len(self.idle)}

    # --- login storms (bench/logins.py)
    async def cmd_prepare_logins(self, dialect: str, users: Sequence[str], sources: Sequence[str],
                                 per_source: int, keepalive: int) -> dict[str, Any]:
        """What each login sends, made before the measured window: the token (an HMAC here) and the CONNECT."""
        self.keepalive = keepalive
        plan = []
        for i, user in enumerate(users):
            client_id, username, password, topic = identity(dialect, user)
            plan.append((user, sources[i // per_source], connect_packet(client_id, username, password, keepalive),
                         topic))
        self._login_plan = plan
        return {"prepared": len(plan)}

    async def cmd_run_logins(self, dialect: str, host: str, port: int, parallel: int,
                             progress: bool = False, pipelined: bool = False) -> dict[str, Any]:
        """The prepared logins, ``parallel`` at a time, each one a new connection: TCP connect, CONNECT,
        CONNACK, SUBSCRIBE ``u/{me}/in``, SUBACK (a phone's reconnect). The connections stay (``idle``).

        No task or timer per login beyond ``create_connection``'s: a login that completes starts the next.
        Returns the window (perf_counter: one clock for all workers) and per-login latencies."""
        loop = asyncio.get_running_loop()
        plan, self._login_plan = self._login_plan, []
        chat = dialect == "chat"
        to_connack, to_ready = array("d"), array("d")
        failures: list[str] = []
        finished = loop.create_future()
        state = _LoginWindow()
        tasks: set[asyncio.Task[None]] = set()

        def start_next() -> None:
            k = state.next
            if k >= len(plan):
                if not state.open and not finished.done():
                    finished.set_result(None)
                return
            state.next = k + 1
            state.open += 1
            task = loop.create_task(one(*plan[k]))
            tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(tasks.discard)

        def settled() -> None:
            state.open -= 1
            start_next()

        async def one(user: str, source: str, connect: bytes, topic: str) -> None:
            began = perf()
            try:
                _, conn = await loop.create_connection(lambda: Conn(self, user, connect, topic, chat, pipelined),
                                                       host, port, local_addr=(source, 0))
            except OSError as exc:
                failures.append(f"{user}: {exc!r}")
                settled()
                return

            def ready(future: asyncio.Future[None]) -> None:
                if future.exception() is not None:
                    failures.append(f"{user}: {future.exception()!r}")
                else:
                    now = perf()
                    to_connack.append((conn.connacked - began) * 1000)
                    to_ready.append((now - began) * 1000)
                    state.last_connack = max(state.last_connack, conn.connacked)
                    state.last_ready = now
                    self.idle.append(conn)
                    if progress and now - state.last_report >= 1.0:
                        state.last_report = now
                        self.progress("connected", len(to_ready))
                settled()

            conn.ready.add_done_callback(ready)

        started = perf()
        for _ in range(min(parallel, len(plan))):
            start_next()
        try:
            await asyncio.wait_for(finished, REPLY_TIMEOUT_S + len(plan) / 10)  # plain amqtt: ~40/s a process
        finally:
            gc.collect()
            gc.freeze()  # the generator's own collector must not scan 10,000 connections during runs
        return {"logins": len(to_ready), "failures": len(failures), "failure_samples": failures[:3],
                "started": started, "last_connack": state.last_connack, "last_ready": state.last_ready,
                "connack_ms": to_connack.tobytes(), "ready_ms": to_ready.tobytes()}

    async def cmd_close_idle(self) -> dict[str, Any]:
        count = len(self.idle)
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        await asyncio.sleep(0.1)
        gc.unfreeze()
        gc.collect()
        return {"closed": count}

    async def cmd_close_all(self) -> dict[str, Any]:
        conns = self._all_conns()
        for conn in conns:
            conn.close()
        self.idle.clear()
        self.pairs.clear()
        self.others.clear()
        self.waiting.clear()
        self.waiting_sent.clear()
        await asyncio.sleep(0.1)
        gc.unfreeze()
        gc.collect()
        return {"closed": len(conns)}

    async def cmd_quit(self) -> dict[str, Any]:
        self._stop.set()
        return {}

    # --- pairs: throughput and latency
    async def cmd_connect_pairs(self, dialect: str, host: str, port: int, pairs: Sequence[tuple[str, str]],
                                source: str, body_bytes: int, keepalive: int) -> dict[str, Any]:
        self.keepalive = keepalive
        on_message = self._on_chat if dialect == "chat" else self._on_mqtt
        started = perf()
        for index, (sender, recipient) in enumerate(pairs):
            s_conn = await self._open(dialect, sender, host, port, source, on_message)
            r_conn = await self._open(dialect, recipient, host, port, source, on_message)
            topic, prefix, suffix = message_parts(dialect, sender, recipient, body_bytes)
            self.pairs.append(Pair(index, s_conn, r_conn, topic, prefix, suffix, f"w{self.index}p{index}m"))
        return {"pairs": len(self.pairs), "seconds": perf() - started}

    def _publish(self, pair: Pair, now: float) -> None:
        pair.count += 1
        mid = f"{pair.tag}{pair.count}"
        run = self.run
        pair.inflight += 1
        run.published += 1
        in_window = run.window_start <= now < run.window_end
        if in_window:
            run.published_in_window += 1
        self.waiting[mid] = (now if in_window else -now, pair)
        chat = bool(pair.sender.out_topic)
        if chat and in_window:
            self.waiting_sent[mid] = now
        pair.sender.publish(pair.topic, pair.prefix + mid.encode() + pair.suffix, track_puback=in_window)

    def _delivered(self, mid: str, now: float) -> None:
        entry = self.waiting.pop(mid, None)
        run = self.run
        if entry is None:
            run.duplicates += 1
            return
        sent, pair = entry
        if run.window_start <= now < run.window_end:
            run.delivered_in_window += 1
        if sent > 0:
            run.deliver_ms.append((now - sent) * 1000)
        if pair is not None:
            pair.inflight -= 1
            if run.running and run.mode == "max" and pair.inflight < run.inflight_per_pair:
                self._publish(pair, now)
        if not run.running:
            self._check_settled()

    def _check_settled(self) -> None:
        if not self.waiting and not self.waiting_sent:
            self._settled.set()

    def record_puback(self, sent: float) -> None:
        self.run.puback_ms.append((perf() - sent) * 1000)

    def _on_mqtt(self, conn: Conn, payload: bytes) -> None:
        now = perf()
        start = payload.find(b'"id":"') + 6
        self._delivered(payload[start:payload.index(b'"', start)].decode(), now)

    def _on_chat(self, conn: Conn, payload: bytes) -> None:
        now = perf()
        item = json.loads(payload)
        kind = item.get("kind")
        seq = item.get("seq")
        if seq is not None:
            conn.seqs.append(seq)
        if kind == "msg":
            if self.drain and conn.user == self.drain["user"]:
                self._drain_item(item, now)
            else:
                self._delivered(item["id"], now)
        elif kind == "receipt":
            if item.get("status") in ("sent", "delivered"):  # 'delivered' stands for 'sent' (rule 11)
                for mid in item["ids"]:
                    sent = self.waiting_sent.pop(mid, None)
                    if sent is not None:
                        self.run.sent_ms.append((now - sent) * 1000)
                        if not self.run.running:
                            self._check_settled()
                    if self.stage:
                        self._stage_sent(mid)
        elif kind == "error":
            run = self.run
            run.errors += 1
            if len(run.error_samples) < 5:
                run.error_samples.append(payload.decode(errors="replace")[:300])
            if self.stage:
                self.stage["errors"] += 1
                if not self.stage["done"].done():
                    self.stage["done"].set_exception(BenchError(f"error item while staging: {payload[:300]!r}"))

    async def cmd_run_pairs(self, mode: str, warmup_s: float, measure_s: float, inflight: int = 1,
                            rate: float = 0.0, drain_s: float = DRAIN_TIMEOUT_S) -> dict[str, Any]:
        if not self.pairs:
            raise BenchError("no pairs connected")
        run = self.run = RunState(mode=mode, inflight_per_pair=inflight, running=True)
        self.waiting.clear()
        self.waiting_sent.clear()
        start = perf()
        run.window_start, run.window_end = start + warmup_s, start + warmup_s + measure_s
        saturated = False
        if mode == "max":
            for pair in self.pairs:
                pair.inflight = 0
                for _ in range(inflight):
                    self._publish(pair, start)
            await asyncio.sleep(warmup_s + measure_s)
        else:
            # Open loop: messages are due at start + k / rate, round robin over the pairs.
            # A message published late counts its lateness as generator lag (reported).
            interval = 1.0 / rate
            cap = max(2000, int(rate * 5))
            k = 0
            end = run.window_end
            while True:
                now = perf()
                if now >= end:
                    break
                due = int((now - start) * rate) + 1  # messages 0..due-1 are due by now
                while k < due:
                    intended = start + k * interval
                    pair = self.pairs[k % len(self.pairs)]
                    k += 1
                    if len(self.waiting) >= cap:
                        run.skipped += 1
                        saturated = True
                        continue
                    if run.window_start <= intended < run.window_end:
                        run.lag_ms.append((now - intended) * 1000)
                    self._publish(pair, now)
                next_due = start + k * interval
                await asyncio.sleep(max(0.0, next_due - perf()))
        run.running = False
        self._settled.clear()
        self._check_settled()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), drain_s)
        lost = len(self.waiting)
        return {
            "pairs": len(self.pairs), "mode": mode, "measure_s": measure_s,
            "delivered_in_window": run.delivered_in_window, "published_in_window": run.published_in_window,
            "published": run.published, "skipped": run.skipped, "saturated": saturated,
            "lost_or_late": lost, "missing_sent": len(self.waiting_sent), "duplicates": run.duplicates,
            "errors": run.errors, "error_samples": run.error_samples,
            "deliver_ms": run.deliver_ms.tobytes(), "sent_ms": run.sent_ms.tobytes(),
            "puback_ms": run.puback_ms.tobytes(), "lag_ms": run.lag_ms.tobytes(),
        }

    # --- offline staging and drain (chat only)
    async def cmd_stage(self, host: str, port: int, sender: str, recipient: str, count: int, window: int,
                        body_bytes: int, keepalive: int) -> dict[str, Any]:
        self.keepalive = keepalive
        conn = self.others.get(sender)
        if conn is None or conn.closed:
            conn = await self._open("chat", sender, host, port, None, self._on_chat)
            self.others[sender] = conn
        topic, prefix, suffix = message_parts("chat", sender, recipient, body_bytes)
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"outstanding": set(), "acked": 0, "errors": 0, "done": loop.create_future(),
                                 "count": count, "next": 0, "window": window, "conn": conn, "topic": topic,
                                 "prefix": prefix, "suffix": suffix, "tag": f"st{int(time.time())}n"}
        self.stage = state
        started = perf()
        last = started
        try:
            self._stage_fill()
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(state["done"]), 1.0)
                    break
                except TimeoutError:
                    pass
                now = perf()
                if now - last >= 2.0:
                    last = now
                    self.progress("staged", state["acked"])
                if conn.closed:
                    raise BenchError("sender connection lost while staging")
        finally:
            self.stage = {}
        seconds = perf() - started
        return {"staged": state["acked"], "seconds": seconds, "rate": state["acked"] / seconds}

    def _stage_fill(self) -> None:
        state = self.stage
        conn: Conn = state["conn"]
        while len(state["outstanding"]) < state["window"] and state["next"] < state["count"]:
            state["next"] += 1
            mid = f"{state['tag']}{state['next']}"
            state["outstanding"].add(mid)
            conn.publish(state["topic"], state["prefix"] + mid.encode() + state["suffix"])

    def _stage_sent(self, mid: str) -> None:
        state = self.stage
        if mid in state["outstanding"]:
            state["outstanding"].discard(mid)
            state["acked"] += 1
            if state["acked"] >= state["count"]:
                if not state["done"].done():
                    state["done"].set_result(None)
            else:
                self._stage_fill()

    async def cmd_drain(self, host: str, port: int, recipient: str, expected: int, timeout_s: float,
                        keepalive: int, retry_s: float = 0.0) -> dict[str, Any]:
        """Connect ``recipient``, receive and ack until ``expected`` messages arrived; time it."""
        self.keepalive = keepalive
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"seen": set(), "last_seq": 0, "order_errors": 0, "duplicates": 0,
                                 "first": None, "done": loop.create_future(), "expected": expected, "user": recipient}
        self.drain = state
        started = perf()
        attempts = 0
        try:
            while True:
                attempts += 1
                try:
                    # Items may arrive in the same read as the SUBACK: they are routed by
                    # user name (self.drain["user"]), so none is missed.
                    conn = await self._open("chat", recipient, host, port, None, self._on_chat)
                    break
                except (OSError, BenchError) as exc:
                    if perf() - started >= retry_s:
                        raise BenchError(f"drain: cannot connect {recipient}: {exc!r}") from None
                    await asyncio.sleep(0.01)
            subscribed = perf()
            last = subscribed
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(state["done"]), 1.0)
                    break
                except TimeoutError:
                    pass
                now = perf()
                if now - started > timeout_s:
                    raise BenchError(f"drain: {len(state['seen'])}/{expected} after {timeout_s:.0f}s")
                if now - last >= 2.0:
                    last = now
                    self.progress("drained", len(state["seen"]))
                if conn.closed:
                    raise BenchError("drain: connection lost")
            finished = perf()
            self.others[recipient] = conn
        finally:
            self.drain = {}
        first = state["first"]
        return {"received": len(state["seen"]), "connect_s": subscribed - started,
                "first_item_s": (first - started) if first else None, "all_acked_s": finished - started,
                "order_errors": state["order_errors"], "duplicates": state["duplicates"], "attempts": attempts}

    def _drain_item(self, item: dict[str, Any], now: float) -> None:
        state = self.drain
        seq = item["seq"]
        if state["first"] is None:
            state["first"] = now
        if seq in state["seen"]:
            state["duplicates"] += 1
            return
        if seq < state["last_seq"]:
            state["order_errors"] += 1
        state["last_seq"] = seq
        state["seen"].add(seq)
        if len(state["seen"]) >= state["expected"] and not state["done"].done():
            # The ack for this read goes out at the end of data_received, before the
            # loop runs the waiter: "done" is after the last ack was written.
            asyncio.get_running_loop().call_soon(_set_done, state["done"])

    async def cmd_rss(self) -> dict[str, Any]:
        return {"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def worker_main(pipe: multiprocessing.connection.Connection, index: int, worker_class: type[Worker] = Worker) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    worker = worker_class(pipe, index)
    try:
        import uvloop  # noqa: PLC0415

        uvloop.run(worker.serve())
    except ImportError:
        asyncio.run(worker.serve())
    except KeyboardInterrupt:
        pass


# --- the coordinating side ---------------------------------------------------------------------------


class LoadGen:
    """``workers`` generator processes; ``call`` runs a command in some of them and gathers the answers.
    ``worker_class``: a ``Worker`` subclass with more commands (e.g. ``bench.groupload``)."""

    def __init__(self, workers: int, worker_class: type[Worker] = Worker) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(workers):
            parent, child = context.Pipe()
            proc = context.Process(target=worker_main, args=(child, index, worker_class),
                                   name=f"bench-gen-{index}", daemon=True)
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)
        self.pids = [p.pid for p in self._procs if p.pid is not None]
        self.call(range(workers), "ping", [{}] * workers, timeout=60)

    @property
    def size(self) -> int:
        return len(self._pipes)

    def call(self, which: Sequence[int] | range, command: str, args: Sequence[dict[str, Any]], timeout: float,
             on_progress: Callable[[dict[int, Any]], None] | None = None) -> list[dict[str, Any]]:
        which = list(which)
        for index, arguments in zip(which, args, strict=True):
            self._pipes[index].send((command, arguments))
        results: dict[int, dict[str, Any]] = {}
        progress: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        pending = {self._pipes[i]: i for i in which}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load generator: {command} took longer than {timeout:.0f}s")
            for ready in multiprocessing.connection.wait(list(pending), min(remaining, 1.0)):
                assert isinstance(ready, multiprocessing.connection.Connection)
                index = pending[ready]
                try:
                    kind, payload = ready.recv()
                except EOFError:
                    raise BenchError(f"load generator worker {index} died during {command}") from None
                if kind == "progress":
                    progress[index] = payload[1]
                    if on_progress is not None:
                        on_progress(progress)
                elif kind == "done":
                    results[index] = payload
                    del pending[ready]
                else:
                    errors.append(payload)
                    del pending[ready]
        if errors:
            raise BenchError("load generator failed:\n" + "\n".join(errors))
        return [results[i] for i in which]

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(("quit", {}))
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self._pipes:
            pipe.close()


def samples(blob: bytes) -> array:  # type: ignore[type-arg]
    values = array("d")
    values.frombytes(blob)
    return values


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run the suite: python -m bench --help")
