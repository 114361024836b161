"""The group benchmark's side of the load generator: ``GroupWorker`` adds commands to ``bench.loadgen.Worker``.

The members of one group are spread over the worker processes; one of them, the sender, also publishes.
A *unit* is what the sender publishes at once: one group message, or the same body sent one-to-one to
every other member (a batch of as many messages). For each unit a worker keeps how many of its members
got it, and the first and last arrival. ``time.perf_counter`` is CLOCK_MONOTONIC on Linux: one clock for
every process of the machine, so the coordinator (``bench.groups``) takes publish -> last member across
the workers.

Message ids: ``{tag}-{k}`` for group message k, ``{tag}-{k}_{r}`` for its one-to-one copy to recipient r;
the unit is the id up to ``_``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from bench.common import BenchError
from bench.conn import Conn
from bench.loadgen import CONNECT_PARALLEL, REPLY_TIMEOUT_S, Worker

perf = time.perf_counter


class GroupWorker(Worker):
    """A load generator worker holding group members (``connect_members``) and running measured phases."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.members: dict[str, Conn] = {}
        self.answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reset("", 0, 0)

    def _reset(self, tag: str, units: int, want: int) -> None:
        self.tag, self.prefix = tag, f"{tag}-"
        self.units: dict[str, list[float]] = {}  # unit -> [deliveries, first arrival, last arrival]
        self.want, self.expected_units, self.complete_units = want, units, 0
        self.complete = asyncio.Event()
        if want == 0 or units == 0:
            self.complete.set()
        self.seen: set[tuple[str, str]] = set()
        self.repeats = self.order_errors = self.late = 0  # late: arrivals of an earlier phase, seen in this one
        self.last_gseq: dict[str, int] = {}
        self.problems: list[str] = []
        self.sent_wait: dict[str, float] = {}  # message id -> publish time, until its 'sent'
        self.sent_ms: list[float] = []
        self.sent_event = asyncio.Event()

    # --- what arrives
    def _on_item(self, conn: Conn, payload: bytes) -> None:
        now = perf()
        item = json.loads(payload)
        seq = item.get("seq")
        if seq is not None:
            conn.seqs.append(seq)  # acked at the end of this read (Conn.data_received)
        kind = item.get("kind")
        if kind == "msg":
            self._arrived(conn.user, item, now)
        elif kind == "receipt" and item.get("status") in ("sent", "delivered"):  # rule 11: it may stand for 'sent'
            for mid in item["ids"]:
                published = self.sent_wait.pop(mid, None)
                if published is not None:
                    self.sent_ms.append((now - published) * 1000)
            self.sent_event.set()
        elif kind == "res":
            future = self.answers.pop(str(item.get("rid")), None)
            if future is not None and not future.done():
                future.set_result(item)
        elif kind == "error":
            self.problems.append(payload.decode(errors="replace")[:300])
            self.sent_event.set()

    def _arrived(self, user: str, item: dict[str, Any], now: float) -> None:
        mid = item["id"]
        if (user, mid) in self.seen:
            self.repeats += 1
            return
        self.seen.add((user, mid))
        gseq = item.get("gseq")
        if gseq is not None:
            if gseq <= self.last_gseq.get(user, 0):
                self.order_errors += 1
            self.last_gseq[user] = gseq
        if not mid.startswith(self.prefix):
            self.late += 1  # a late arrival of an earlier phase: counted (a stall would show here), not timed
            return
        unit = mid.split("_", 1)[0]
        entry = self.units.get(unit)
        if entry is None:
            entry = self.units[unit] = [0, now, now]
        entry[0] += 1
        entry[2] = now
        if entry[0] == self.want:
            self.complete_units += 1
            if self.complete_units >= self.expected_units:
                self.complete.set()

    # --- commands
    async def cmd_connect_members(self, host: str, port: int, users: list[str], source: str,
                                  keepalive: int) -> dict[str, Any]:
        self.keepalive = keepalive
        slots = asyncio.Semaphore(CONNECT_PARALLEL)

        async def one(user: str) -> None:
            async with slots:
                conn = await self._open("chat", user, host, port, source, self._on_item)
            self.members[user] = self.others[user] = conn

        await asyncio.gather(*(one(user) for user in users))
        return {"connected": len(users)}

    async def cmd_close_members(self, keep: list[str]) -> dict[str, Any]:
        """Members offline (their queues fill up from now on), except ``keep``."""
        gone = [user for user in self.members if user not in keep]
        for user in gone:
            self.members.pop(user).close()
            self.others.pop(user, None)
        await asyncio.sleep(0.2)  # the broker sees the connections go (its next items are staged, not sent)
        return {"closed": len(gone)}

    async def cmd_request(self, user: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        rid = f"b{len(self.answers)}{int(perf() * 1000)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[rid] = future
        self.members[user].publish(f"u/{user}/req".encode(), json.dumps({"rid": rid, "op": op, "args": args}).encode())
        answer = await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        if not answer.get("ok"):
            raise BenchError(f"{op} refused: {answer}")
        return dict(answer["result"])

    async def cmd_arm(self, tag: str, units: int, want: int) -> dict[str, Any]:
        """Count arrivals of phase ``tag`` from now on. Every worker is armed before the sender's worker
        gets ``phase``: armed by ``phase`` itself, a worker whose command came a few ms after the sender's
        took the first unit's arrivals for late ones of the previous phase and dropped them."""
        self._reset(tag, units, want)
        return {}

    async def cmd_phase(self, timeout_s: float, send: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait until each unit of the armed phase (``arm``) reached ``want`` of this worker's members (and
        publish them first if ``send``); what arrived, and for the sender the publish times and 'sent' latencies."""
        tag, units = self.tag, self.expected_units
        published: list[float] = []
        lag_ms: list[float] = []
        if send is not None:
            published, lag_ms = await asyncio.wait_for(self._send(tag, units, **send), timeout_s)
        with contextlib.suppress(TimeoutError):  # what did not arrive is reported as missing
            await asyncio.wait_for(self.complete.wait(), timeout_s)
        return {"units": self.units, "published": published, "lag_ms": lag_ms, "sent_ms": self.sent_ms,
                "missing_sent": len(self.sent_wait), "repeats": self.repeats, "order_errors": self.order_errors,
                "late": self.late,
                "problems": self.problems[:5], "problem_count": len(self.problems)}

    async def _send(self, tag: str, units: int, user: str, to: list[str], body_bytes: int, interval_s: float,
                    window: int) -> tuple[list[float], list[float]]:
        """Publish ``units`` units from ``user``: each is one message to every id in ``to`` (a group id, or
        the members one by one). Paced (``interval_s``: unit k is due at start + k * interval_s) or closed
        loop (at most ``window`` units' messages without 'sent'). Returns when every message got its 'sent'."""
        conn = self.members[user]
        topic = f"u/{user}/out".encode()
        body = b'","type":"text","body":"' + b"x" * body_bytes + b'"}'
        one = len(to) == 1
        published: list[float] = []
        lag_ms: list[float] = []
        start = perf()
        for k in range(units):
            if interval_s > 0:
                due = start + k * interval_s
                await asyncio.sleep(max(0.0, due - perf()))
                lag_ms.append((perf() - due) * 1000)
            else:
                while len(self.sent_wait) + len(to) > window * len(to):
                    self.sent_event.clear()
                    await self.sent_event.wait()
                    if self.problems:
                        raise BenchError(f"error items: {self.problems[:3]}")
            now = perf()
            published.append(now)
            for r, recipient in enumerate(to):
                mid = f"{tag}-{k}" if one else f"{tag}-{k}_{r}"
                self.sent_wait[mid] = now
                conn.publish(topic, b'{"id":"' + mid.encode() + b'","to":"' + recipient.encode() + body)
        while self.sent_wait:
            self.sent_event.clear()
            await self.sent_event.wait()
            if self.problems:
                raise BenchError(f"error items: {self.problems[:3]}")
        return published, lag_ms
