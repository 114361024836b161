"""The shared driver: a mixed chat workload through the real SDK, checked against a ledger.

Used by ``python -m bench chaos`` (full sizes) and ``tests/chaos`` (small sizes).
A scenario builds a ``Workload`` on a running ``ChaosBroker``, calls ``start()``,
injects its fault while the senders run, calls ``finish()`` (which waits until
every accepted message has had its chance to arrive) and reads ``verdict()``.

The workload (``Plan``): ``pairs`` pairs of users ``a{i}``/``b{i}`` chatting both ways,
each user's ``phone`` always on; every other user also has a ``tablet`` that goes
offline and comes back (a new ``Client`` on the same store file) every few seconds,
so items are staged for offline devices and drained on reconnect. Optionally
``child_senders`` extra users ``c{i}`` send from SDK processes (``bench.chaos.child``)
that a scenario may SIGKILL and ``restart_child`` later from their local store.
"""

from __future__ import annotations

import logging
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.ledger import Ledger, Verdict
from bench.common import REPO
from client_sdk import Client
from client_sdk.errors import ChatError
from client_sdk.events import ErrorEvent, Message, Receipt

Progress = Callable[[str], None]


SETTLE_S = 90.0
"""How long, after the faults, every delivery may take to arrive (``--settle-s``). The SDK clients
run in the harness's process and write their SQLite stores with synchronous=FULL: on a disk
with slow fsyncs they drain their backlog slowly, and a window too short counts as lost what
is still on its way (staged, or in a client's inbox)."""


@dataclass(frozen=True)
class Plan:
    pairs: int = 3
    per_sender: int = 100  # messages each sending user sends
    rate: float = 20.0  # messages per second per sender
    tablets: bool = True  # every other user has a tablet that goes offline and back
    offline_s: tuple[float, float] = (0.5, 2.0)  # how long a tablet stays away / online
    child_senders: int = 0  # extra send-only users c{i} whose SDK runs in a killable process
    keepalive: int = 60
    resend_interval: float = 2.0
    pad_bytes: int = 0  # filler per body (the disk scenario needs the WAL to grow)
    settle_s: float = field(default_factory=lambda: SETTLE_S)  # after the fault: how long everything may take


def password(user: str) -> str:
    return f"{user}-chaos-pw"


class RefusalWatch(logging.Handler):
    """Counts the SDK's transient refusals by code (``internal``, ``queue_full``, ``rate_limited``).

    The SDK retries those silently (no ``on_error``) and only logs them, at INFO.
    """

    PATTERN = re.compile(r"^(\S+): message \S+: (\w+) \(")

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.INFO)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        found = self.PATTERN.match(record.getMessage())
        if found:
            self.counts[found.group(2)] += 1

    def __enter__(self) -> RefusalWatch:
        logger = logging.getLogger("client_sdk.engine")
        logger.addHandler(self)
        self._old = logger.level
        logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("client_sdk.engine")
        logger.removeHandler(self)
        logger.setLevel(self._old)


class Device:
    """One SDK client of the workload, re-creatable on its store file."""

    def __init__(self, work: Workload, user: str, name: str) -> None:
        self.work, self.user, self.name = work, user, name
        self.key = f"{user}.{name}"
        self.store = work.workdir / f"{self.key}.db"
        self.client: Client | None = None

    def open(self, timeout: float = 60.0) -> None:
        client = Client(self.user, password(self.user), device=self.name, port=self.work.connect_port,
                        store=self.store, keepalive=self.work.plan.keepalive,
                        resend_interval=self.work.plan.resend_interval, reconnect_delay=(0.05, 1.0))
        client.on_message = self._message
        client.on_receipt = self._receipt
        client.on_error = self._error
        self.client = client
        deadline = time.monotonic() + timeout
        while True:  # the broker may be down (being restarted) right now
            try:
                client.connect(timeout=max(1.0, deadline - time.monotonic()))
                return
            except ChatError:
                if time.monotonic() >= deadline or self.work.closed:
                    self.close()  # a client that never connected has stopped: finish() opens a new one
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _message(self, m: Message) -> None:
        if m.sender not in self.work.honest:  # an attacker's message (the hostile scenario): not in the ledger
            self.work.foreign[m.sender] += 1
            return
        self.work.ledger.delivered(self.key, m.sender, m.to, m.body)

    def _receipt(self, r: Receipt) -> None:
        if r.status == "sent":
            self.work.ledger.sent_receipt(list(r.ids))

    def _error(self, e: ErrorEvent) -> None:
        self.work.errors[e.code] += 1


class Child:
    """A send-only user whose SDK client runs in its own process (``bench.chaos.child``)."""

    def __init__(self, work: Workload, user: str, to: str) -> None:
        self.work, self.user, self.to = work, user, to
        self.store = work.workdir / f"{user}.phone.db"
        self.next_n = 0
        self.proc: subprocess.Popen[str] | None = None
        self.done = threading.Event()
        self.kills = 0

    def start(self) -> None:
        plan = self.work.plan
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.chaos.child", self.user, password(self.user), str(self.work.child_port
                                                                                   or self.work.connect_port),
             str(self.store), self.to, str(self.next_n), str(plan.per_sender), str(plan.rate)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        ledger, targets = self.work.ledger, self.work.targets(self.to, self.user)
        assert proc.stdout is not None
        for line in proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "I":
                n = int(rest)
                ledger.intend(self.user, n, self.to, targets)
                self.next_n = n + 1  # an intended n may or may not be stored: never reuse it
            elif word == "A":
                n_text, mid = rest.split()
                ledger.accepted(self.user, int(n_text), mid)
            elif word == "S":
                ledger.sent_receipt(rest.split(","))
            elif word == "DONE":
                self.done.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
            self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Workload:
    def __init__(self, plan: Plan, workdir: Path, connect_port: int, progress: Progress = print,
                 seed: int | None = None) -> None:
        self.plan, self.workdir, self.connect_port, self.progress = plan, workdir, connect_port, progress
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger()
        self.errors: Counter[str] = Counter()  # permanent refusals (on_error) and transient ones (logged)
        self._watch = RefusalWatch(self.errors).__enter__()
        self.rng = random.Random(seed)
        self.users = [f"{side}{i}" for i in range(plan.pairs) for side in "ab"]
        self.devices: dict[str, list[Device]] = {}
        for index, user in enumerate(self.users):
            names = ["phone", "tablet"] if plan.tablets and index % 2 == 0 else ["phone"]
            self.devices[user] = [Device(self, user, name) for name in names]
        self.children = [Child(self, f"c{i}", f"b{i % plan.pairs}") for i in range(plan.child_senders)]
        self.honest = set(self.all_users())
        self.foreign: Counter[str] = Counter()  # messages from users outside the workload, by sender
        self.child_port: int | None = None  # where the children connect, if not connect_port
        self._stop = threading.Event()
        self.closed = False  # set by close(): connect attempts still retrying give up
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0

    def all_users(self) -> list[str]:
        return self.users + [child.user for child in self.children]

    def targets(self, to: str, sender: str) -> tuple[str, ...]:
        """Every device of ``to``, and the sender's other devices: with end-to-end encryption (the
        SDK's default) they get a history copy of what the sender's phone sends (PROTOCOL.md section 9)."""
        own = tuple(d.key for d in self.devices.get(sender, []) if d.name != "phone")
        return tuple(d.key for d in self.devices[to]) + own

    @staticmethod
    def partner(user: str) -> str:
        return ("b" if user[0] == "a" else "a") + user[1:]

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect every device once (so all are known targets), then start senders and flappers."""
        for devices in self.devices.values():
            for device in devices:
                device.open()
        self.started_at = time.monotonic()
        for user in self.users:
            self._spawn(self._send_loop, user)
        for devices in self.devices.values():
            for device in devices[1:]:
                self._spawn(self._flap_loop, device)
        for child in self.children:
            child.start()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"chaos-{target.__name__}")
        thread.start()
        self._threads.append(thread)

    def _send_loop(self, user: str) -> None:
        phone = self.devices[user][0]
        to = self.partner(user)
        targets = self.targets(to, user)
        interval = 1.0 / self.plan.rate
        due = time.monotonic()
        for n in range(self.plan.per_sender):
            if self._stop.is_set():
                return
            body = self.ledger.intend(user, n, to, targets, self.plan.pad_bytes)
            assert phone.client is not None
            self.ledger.accepted(user, n, phone.client.send(to, body))
            due += interval * self.rng.uniform(0.5, 1.5)
            time.sleep(max(0.0, due - time.monotonic()))

    def _flap_loop(self, device: Device) -> None:
        low, high = self.plan.offline_s
        while not self._stop.is_set():
            if self._stop.wait(self.rng.uniform(low, high)):
                return
            device.close()
            if self._stop.wait(self.rng.uniform(low, high)):
                break
            device.open()
        if device.client is None:
            device.open()

    def senders_done(self) -> bool:
        return all(not t.is_alive() for t in self._threads if t.name == "chaos-_send_loop") and \
            all(c.done.is_set() for c in self.children)

    def wait_senders(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        """Wait until every sender has sent everything (``tick`` runs every 0.2 s meanwhile)."""
        deadline = time.monotonic() + timeout
        while not self.senders_done() and time.monotonic() < deadline:
            if tick is not None:
                tick()
            time.sleep(0.2)

    def finish(self) -> Verdict:
        """Stop the flappers, bring every device online, wait until nothing is missing, close all."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        for devices in self.devices.values():  # a flapper that could not reconnect in time gave up: bring it back
            for device in devices:
                if device.client is None:
                    self.progress(f"  {device.key} was left offline by its flapper: connecting it again")
                    device.open()
        deadline = time.monotonic() + self.plan.settle_s
        last = -1
        while time.monotonic() < deadline:
            missing = self.ledger.missing()
            if missing == 0 and self.outboxes_empty():
                break
            if missing != last:
                self.progress(f"  settling: {missing} deliveries missing")
                last = missing
            time.sleep(0.25)
        verdict = self.ledger.verdict()
        self.close()
        return verdict

    def outboxes_empty(self) -> bool:
        return all(d.client is None or not d.client.outbox() for ds in self.devices.values() for d in ds)

    def close(self) -> None:
        self._stop.set()
        self.closed = True
        self._watch.__exit__()
        for child in self.children:
            child.stop()
        for devices in self.devices.values():
            for device in devices:
                device.close()
