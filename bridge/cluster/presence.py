"""Presence in cluster mode: ``PresenceService``'s face (heartbeats, device_offline, the presence,
privacy and contacts requests) over a store shared by every node (bridge/cluster/presence_state.py
has the model), so a user's devices and their watchers may be connected to different nodes.

The node runs a ``PresenceCore`` (bridge/presence/core.py, rules 1-8) for its own devices and as a
mirror of the users they watch or watch with; the wire behaviour is the core's. Around it:
- a local foreground starting or ending (``PresenceOutcome.foreground``) is written to the shared
  store (lease and ``last_seen``), then every node interested in the user is nudged; the leases
  of users who heartbeated are renewed every half window (``Leases``), in the same writer;
- a nudge, a lease elsewhere running out (``Rechecks``) and a periodic resync re-read mirrored
  users (``look``, which also renews this node's interest) and feed the core (``mirror``);
- privacy and contact requests write the shared store, then nudge the interested nodes (this one
  re-reads at once, so its own watchers are told before the answer goes out).
The bus (``NodeBus``) is started by the caller, who passes PRESENCE nudges to ``on_nudge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.cluster.nodes import NodeBus, Nudge, NudgeKind
from bridge.cluster.presence_state import Leases, Rechecks, SharedPresenceStore, SharedState
from bridge.links import LinkRegistry
from bridge.presence.core import LimitExceeded, PresenceCore, PresenceOutcome, View
from bridge.presence.shell import PresenceShell, privacy_arg, saved, user_args
from bridge.requests import OpError, check_args
from bridge.store import StoreError
from chatproto import Caller, ErrorCode

log = logging.getLogger(__name__)

RESYNC_S = 30.0  # every mirrored user is read again this often (a lost nudge delays at most this)
READS_AT_ONCE = 64


@dataclass(slots=True)
class Put:
    """A write of this node's foreground of one user, waiting for the writer."""

    online: bool
    last_seen: int | None
    nudge: bool  # a transition: the interested nodes are nudged once it is written

    def merge(self, newer: Put) -> Put:
        seen = [t for t in (self.last_seen, newer.last_seen) if t is not None]
        return Put(newer.online, max(seen) if seen else None, self.nudge or newer.nudge)


class ClusterPresence(PresenceShell):
    """Construct with the node's bus, then ``await start()``; feed it heartbeats, disconnects and
    PRESENCE nudges (``on_nudge``); ``await close()`` ends its devices' foreground in the store."""

    def __init__(self, core: PresenceCore, store: SharedPresenceStore, links: LinkRegistry, bus: NodeBus, *,
                 clock: Clock, supervisor: Supervisor, resync_s: float = RESYNC_S) -> None:
        super().__init__(core, links, clock=clock, supervisor=supervisor)  # steady_ms: leases are wall time
        self._store = store
        self._bus = bus
        self._me = bus.node_id
        self._leases = Leases(core.rules.online_window_ms)
        self._resync_s = resync_s
        self._interest_ms = int(resync_s * 3000)  # three resyncs: a node renews it well before it ends
        self._puts: dict[str, Put] = {}
        self._put_wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._next_renew = 0.0
        self._mirrored: dict[str, int] = {}  # user -> version last applied (-1: being read)
        self._to_read: set[str] = set()
        self._read_wake = asyncio.Event()
        self._next_resync = 0.0
        self._rechecks = Rechecks()
        self._tasks: list[asyncio.Task[None]] = []
        self._drops: set[asyncio.Task[None]] = set()
        self.rows_written = 0
        self.batches_written = 0
        self.reads = 0
        self.nudges_sent = 0
        self.nudges_received = 0

    async def start(self) -> None:
        self._next_renew = time.monotonic() + self._leases.renew_ms / 1000
        self._next_resync = time.monotonic() + self._resync_s
        self._tasks = [self._supervisor.spawn("presence_persist", self._write_round),
                       self._supervisor.spawn("presence_sync", self._read_round)]

    # --- heartbeats, devices, nudges -------------------------------------------------------------

    def device_offline(self, user: str, client_id: str) -> None:
        watched = self.core.watch_list(client_id)
        self._apply(self.core.device_offline(user, client_id, self._now()))
        self._release([*watched, user])

    def on_nudge(self, nudge: Nudge) -> None:
        """A PRESENCE nudge from the bus: read the user again if a device here needs it."""
        if nudge.kind == NudgeKind.PRESENCE and nudge.target in self._mirrored:
            self.nudges_received += 1
            self._to_read.add(nudge.target)
            self._read_wake.set()

    # --- outcomes, the timer ---------------------------------------------------------------------

    def _apply(self, out: PresenceOutcome) -> None:
        for client_id, item in out.items:
            self._links.send(client_id, item)
        for user, online in out.foreground:
            self._put(user, Put(online, self.core.last_seen(user), nudge=True))
            if not online:
                self.core.forget(user)
        self._arm()

    def _put(self, user: str, put: Put) -> None:
        known = self._puts.get(user)
        self._puts[user] = put if known is None else known.merge(put)
        self._put_wake.set()

    def _arm(self) -> None:
        times = [t for t in (self.core.next_deadline(), self._rechecks.next()) if t is not None]
        self._timer.arm(min(times) if times else None)

    def _fire(self) -> None:
        now = self._now()
        due = self._rechecks.due(now)
        if due:
            self._to_read.update(due)
            self._read_wake.set()
        self._apply(self.core.tick(now))

    # --- writing this node's foreground -------------------------------------------------------------

    async def _write_round(self) -> None:
        await _woken(self._put_wake, self._next_renew, bool(self._puts))
        if time.monotonic() >= self._next_renew:
            self._next_renew = time.monotonic() + self._leases.renew_ms / 1000
            for user, last_seen in self.core.take_dirty():  # who heartbeated since the last renewal
                if self.core.is_local_online(user):
                    self._put(user, Put(True, last_seen, nudge=False))
        await self.flush()

    async def flush(self) -> None:
        """Write the waiting puts and send their nudges. On return everything put before the call is
        in the store; on a failure the puts that failed wait for the next round, and it raises."""
        async with self._flush_lock:  # one batch at a time: a user's writes stay in order
            await self._flush_once()

    async def _flush_once(self) -> None:
        puts, self._puts = self._puts, {}
        if not puts:
            return
        now = self._now()
        results = await asyncio.gather(
            *(self._store.put_foreground(user, self._me, self._leases.until(now) if put.online else 0,
                                         put.last_seen, now) for user, put in puts.items()),
            return_exceptions=True)
        failed: BaseException | None = None
        for (user, put), result in zip(puts.items(), results, strict=True):
            if isinstance(result, BaseException):
                failed = result
                newer = self._puts.get(user)
                self._puts[user] = put if newer is None else put.merge(newer)
                continue
            self.rows_written += 1
            running, nodes = result
            if put.nudge or (put.online and not running):  # a renewal after the lease ran out: news too
                await self._nudge(user, nodes)
        self.batches_written += 1
        if failed is not None:
            raise failed

    async def _nudge(self, user: str, nodes: Iterable[str]) -> None:
        for node in nodes:
            if node != self._me:
                self.nudges_sent += 1
                await self._bus.send(node, Nudge(NudgeKind.PRESENCE, user, self._me))

    # --- reading mirrored users ---------------------------------------------------------------------

    async def _read_round(self) -> None:
        await _woken(self._read_wake, self._next_resync, bool(self._to_read))
        if time.monotonic() >= self._next_resync:
            self._next_resync = time.monotonic() + self._resync_s
            self._to_read.update(self._mirrored)
        users, self._to_read = self._to_read, set()
        try:
            await self._read([user for user in users if user in self._mirrored])
        except BaseException:
            self._to_read.update(users)
            raise

    async def _read(self, users: list[str]) -> None:
        """Read ``users`` (registering this node's interest) and mirror them into the core."""
        for start in range(0, len(users), READS_AT_ONCE):
            chunk = users[start:start + READS_AT_ONCE]
            interest = self._now() + self._interest_ms
            states = await asyncio.gather(*(self._store.look(user, self._me, interest) for user in chunk))
            self.reads += len(chunk)
            for user, state in zip(chunk, states, strict=True):
                self._mirror(user, state)

    def _mirror(self, user: str, state: SharedState) -> None:
        known = self._mirrored.get(user)
        if known is None or state.version < known:
            return  # released meanwhile, or a newer read was applied already
        self._mirrored[user] = state.version
        now = self._now()
        until = state.online_until(now, other_than=self._me)
        if until is None:
            self._rechecks.drop(user)
        else:
            self._rechecks.arm(user, until)
        self._apply(self.core.mirror(user, state.last_seen, state.setting, state.contacts, until is not None, now))

    async def _take(self, users: Iterable[str]) -> None:
        """Mirror ``users`` (those not mirrored yet are read first)."""
        new = [user for user in dict.fromkeys(users) if user not in self._mirrored]
        for user in new:
            self._mirrored[user] = -1  # being read: a release must not drop the interest it registers
        try:
            await self._read(new)
        except BaseException:
            self._release(new)
            raise

    def _release(self, users: Iterable[str]) -> None:
        """Users no device here needs any more: forget them, and this node's interest in them."""
        for user in dict.fromkeys(users):
            if user in self._mirrored and not self.core.involved(user):
                del self._mirrored[user]
                self._rechecks.drop(user)
                self.core.forget(user)
                task = asyncio.ensure_future(self._drop_interest(user))
                self._drops.add(task)
                task.add_done_callback(self._drops.discard)

    async def _drop_interest(self, user: str) -> None:
        """Best effort: an interest left behind only ends with its lease (a few useless nudges)."""
        try:
            if user not in self._mirrored:
                await self._store.drop_interest(user, self._me)
        except StoreError as exc:
            log.debug("presence: %s", exc)

    # --- shutdown -----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop; this node's devices leave the foreground in the store (their watchers elsewhere are
        told), and its interests are given up."""
        self._timer.close()
        await cancel(self._tasks)
        for user in self.core.local_users():
            self._put(user, Put(False, self.core.last_seen(user), nudge=True))
        for _ in range(3):
            try:
                await self.flush()
                break
            except Exception as exc:
                self._supervisor.failed("presence_persist", exc)
        mirrored, self._mirrored = list(self._mirrored), {}
        await asyncio.gather(*self._drops, *(self._drop_interest(user) for user in mirrored))

    # --- requests -----------------------------------------------------------------------------------

    async def _get(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        read = dict.fromkeys([caller.user, *users])
        states = await saved(asyncio.gather(*(self._store.look(user, self._me, 0) for user in read)))
        self.reads += len(read)
        shared = dict(zip(read, states, strict=True))
        now = self._now()
        return {"users": {user: self._shown(caller.user, shared[caller.user], user, shared[user], now).as_dict()
                          for user in users}}

    def _shown(self, viewer: str, viewer_state: SharedState, owner: str, state: SharedState, now: int) -> View:
        online = self.core.is_local_online(owner) or state.online_until(now, other_than=self._me) is not None
        local = self.core.last_seen(owner)  # this node's heartbeats may be newer than the store's
        if local is not None and (state.last_seen is None or local > state.last_seen):
            state = SharedState(state.version, local, state.setting, state.contacts, state.leases)
        return state.shown_to(viewer, viewer_state, owner, online)

    async def _subscribe(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        if self._links.get(caller.client_id) is None:
            return await self._get(caller, args)  # gone before its request ran: keep no watch list
        await saved(self._take([caller.user, *users]))
        try:
            views, out = self.core.subscribe(caller.client_id, caller.user, users, self._now())
        except LimitExceeded as exc:
            raise OpError(ErrorCode.TOO_LARGE, str(exc)) from None
        finally:
            self._release([caller.user, *users])
        self._apply(out)
        return {"users": {user: view.as_dict() for user, view in views.items()}}

    async def _unsubscribe(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        watching = self.core.unsubscribe(caller.client_id, users)
        self._release([*users, caller.user])
        return {"watching": watching}

    async def _privacy_get(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        state = await saved(self._store.look(caller.user, self._me, 0))
        self.reads += 1
        return {"last_seen": state.setting, "contacts": sorted(state.contacts)}

    async def _privacy_set(self, caller: Caller, args: dict[str, Any]) -> Any:
        setting = privacy_arg(args)
        await saved(self._store.set_privacy(caller.user, setting))
        await self._changed(caller.user)
        return {"last_seen": setting}

    async def _contacts_add(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = [user for user in user_args(args) if user != caller.user]
        result = await saved(self._store.change_contacts(caller.user, users, True, self.core.rules.max_contacts))
        if result is None:
            raise OpError(ErrorCode.TOO_LARGE, f"a user may have at most {self.core.rules.max_contacts} contacts")
        return await self._contacts_changed(caller.user, result)

    async def _contacts_remove(self, caller: Caller, args: dict[str, Any]) -> Any:
        result = await saved(self._store.change_contacts(caller.user, user_args(args), False, None))
        assert result is not None  # only adding has a limit
        return await self._contacts_changed(caller.user, result)

    async def _contacts_changed(self, user: str, result: tuple[int, int]) -> Any:
        changed, count = result
        if changed:
            await self._changed(user)
        return {"contacts": count}

    async def _changed(self, user: str) -> None:
        """``user``'s setting or contacts changed in the store: re-read it here at once (this node's
        watchers are told before the answer), and nudge the other interested nodes."""
        if user in self._mirrored:
            await saved(self._read([user]))
        nodes = await saved(self._store.interested(user, self._now()))
        await self._nudge(user, nodes)

    def stats(self) -> dict[str, int]:
        return {**self.core.stats(), "rows_written": self.rows_written, "batches_written": self.batches_written,
                "mirrored_users": len(self._mirrored), "rechecks": len(self._rechecks), "reads": self.reads,
                "nudges_sent": self.nudges_sent, "nudges_received": self.nudges_received}


async def _woken(wake: asyncio.Event, until: float, work: bool) -> None:
    """A background round's wait: none with ``work`` waiting, else until ``wake`` is set or the
    monotonic time ``until``; ``wake`` is cleared for the next round."""
    if not work:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), max(0.0, until - time.monotonic()))
    wake.clear()
