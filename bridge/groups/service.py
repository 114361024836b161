"""Groups on one process (SQLite): the ``group.*`` requests and who is in a group for a group message;
the thin shell around the rules (bridge/groups/core.py), the store (a ``LoggedGroupStore``) and the
staging core, which stages group events and messages like one-to-one items
(bridge/messaging/groups.py).

Decisions (docs/PROTOCOL.md section 11):
1. One order: each group has an asyncio lock. A change holds it from its load to the staging of its
   events; a group message takes its gseq and is staged without awaiting anything, so it cannot land
   inside a change. A message to a group that is being changed, or not in memory yet, waits behind
   the lock in its device's lane (bridge/messaging/service.py): the device's later uplinks wait too.
2. gseqs of messages are taken in memory (the staging core's ``gseqs``), not by a store transaction
   per message (an fsync each): the staging commit writes each group's highest gseq with the items,
   and a start resumes from the higher of it and the group's stored gseq. A change is decided on the
   group with that gseq, so its events come after every message, and it stores that gseq.
3. Durable events: a change's events are written with the change (``commit_logged``: the outbox,
   one transaction) before it is answered; staged right after. At a start, logged events above a
   group's written gseq (a crash before their staging commit) are staged again; logged events at or
   below it are dropped then and every ``sweep_s``. A group item goes to a device only once written
   (bridge/messaging/groups.py), with its group's gseq mark: an event a device has seen is never
   staged again.
4. Groups are kept in memory once read (this process is their only writer: chatserver/data_dir.py
   locks the data directory); a group that does not exist is not remembered.
5. A change that emits events costs its actor one send token (``rate_limited``, nothing changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.directory import Directory
from bridge.groups import core
from bridge.groups.core import Decision, Group, GroupLimits
from bridge.groups.store import LoggedGroupStore
from bridge.locks import KeyedLocks
from bridge.messaging.groups import GroupStaging
from bridge.messaging.records import StagingOutcome
from bridge.messaging.store import UserLookup
from bridge.requests import Op, OpError
from bridge.store import StoreError
from chatproto import (
    GROUP_OPS,
    Caller,
    DecodeError,
    ErrorCode,
    GroupAdd,
    GroupCreate,
    GroupInfo,
    GroupList,
    GroupReceipts,
    parse_group_request,
)

log = logging.getLogger(__name__)


class GroupService:
    def __init__(self, store: LoggedGroupStore, staging: GroupStaging, users: UserLookup, limits: GroupLimits,
                 carry_out: Callable[[StagingOutcome], None], sweep_s: float, *, clock: Clock,
                 supervisor: Supervisor) -> None:
        self._store = store
        self._staging = staging
        self._users = users
        self._limits = limits
        self._carry_out = carry_out  # Messaging.carry_out: send what an outcome says, wake the commit
        self._sweep_s = sweep_s
        self._clock = clock
        self._supervisor = supervisor
        self._groups: dict[str, Group] = {}  # as stored (gseq: the last change's; messages' are in staging)
        self._locks = KeyedLocks()  # one per group
        self._loops: list[asyncio.Task[None]] = []

    async def start(self, written: dict[str, int]) -> None:
        """Resume from each group's highest gseq the staging store wrote, and stage the logged events
        above it (decision 3)."""
        self._staging.gseqs.update(written)
        self._staging.written_gseqs.update(written)
        again = [(event, users) for event, users in await self._store.logged()
                 if event.gseq > written.get(event.group, 0)]
        for event, users in again:
            self._carry_out(self._staging.stage_group_events((event,), users, self._clock.wall_ms(),
                                                             self._clock.monotonic()))
        if again:
            log.info("groups: %d logged event(s) staged again", len(again))
        await self._store.forget_logged(written)
        self._loops = [self._supervisor.spawn("group_log", self._forget_round)]

    async def _forget_round(self) -> None:
        await asyncio.sleep(self._sweep_s)
        await self._store.forget_logged(dict(self._staging.written_gseqs))

    async def close(self) -> None:
        await cancel(self._loops)

    def ops(self) -> dict[str, Op]:
        return {op: functools.partial(self._request, op=op) for op in GROUP_OPS}

    # --- group messages (bridge/messaging/service.py asks) ------------------------------------

    def members_now(self, group: str) -> tuple[str, ...] | None:
        """The members of ``group`` if it is in memory and not being changed; None: ``settled`` first."""
        found = self._groups.get(group)
        return None if found is None or group in self._locks else found.members

    @contextlib.asynccontextmanager
    async def settled(self, group: str) -> AsyncIterator[tuple[str, ...]]:
        """Hold changes of ``group`` off; yields its members (none: no such group)."""
        async with self._locks.hold(group):
            found = await self._load(group)
            yield found.members if found is not None else ()

    # --- requests -----------------------------------------------------------------------------

    async def _request(self, caller: Caller, args: dict[str, Any], op: str) -> Any:
        try:
            request = parse_group_request(op, args)
        except DecodeError as exc:
            raise OpError(exc.code, exc.detail) from None
        match request:
            case GroupList():
                found = [await self._load(gid) for gid in await self._store.groups_of(caller.user)]
                return {"groups": [lifted.summary(caller.user) for g in found if (lifted := self._lifted(g))]}
            case GroupInfo():
                return core.info(self._lifted(await self._load(request.group)), caller.user)
            case GroupReceipts():
                return core.receipts(await self._load(request.group), caller.user, request,
                                     self._staging.receipts.find(request.group, request.id))
            case GroupCreate():
                await self._check_users(request.members)
                group = core.new_group_id()
                return await self._change(group, caller.user, lambda _: core.create(
                    group, caller.user, request, self._limits, self._clock.wall_ms()))
            case _:
                if isinstance(request, GroupAdd):
                    await self._check_users(request.members)
                change = request
                return await self._change(change.group, caller.user, lambda before: core.decide(
                    self._lifted(before), caller.user, change, self._limits, self._clock.wall_ms()))

    async def _change(self, group: str, actor: str, decide: Callable[[Group | None], Decision]) -> Any:
        async with self._locks.hold(group):
            before = await self._load(group)
            decision = decide(before)
            if not decision.events:
                return decision.result
            if not self._staging.charge(actor, self._clock.monotonic()):
                raise OpError(ErrorCode.RATE_LIMITED, "changing groups too fast; retry later")
            if not await self._store.commit_logged(before, decision, self._limits.max_groups_per_user):
                raise StoreError(f"group {group} was changed outside this broker")  # it is the only writer
            if decision.after is None:
                self._groups.pop(group, None)
            else:
                self._groups[group] = decision.after
            self._carry_out(self._staging.stage_group_events(decision.events, decision.notify, self._clock.wall_ms(),
                                                             self._clock.monotonic()))
            return decision.result

    async def _check_users(self, users: tuple[str, ...]) -> None:
        """``unknown_recipient`` naming the users that do not exist (section 7, "Which users exist")."""
        directory: Directory = self._staging.directory
        unknown = []
        for user in users:
            if directory.exists(user):
                continue
            devices = await self._users.user_devices(user)  # made by the operator since the start
            if devices is None:
                unknown.append(user)
            else:
                directory.add_user(user, devices)
        if unknown:
            raise OpError(ErrorCode.UNKNOWN_RECIPIENT, f"no user(s) {', '.join(unknown)}")

    # --- state --------------------------------------------------------------------------------

    async def _load(self, group: str) -> Group | None:
        found = self._groups.get(group)
        if found is None:
            found = await self._store.load(group)
            if found is not None:
                self._groups.setdefault(group, found)  # another load may have won meanwhile: the same
        return self._groups.get(group, found)

    def _lifted(self, group: Group | None) -> Group | None:
        """``group`` with its gseq after the messages staged since its last change (decision 2)."""
        return group and replace(group, gseq=max(group.gseq, self._staging.gseqs.get(group.id, 0)))
