"""Presence: the thin shell around the presence core (``bridge/presence/core.py``).

It reads heartbeats, runs the presence and privacy requests, sends the core's
``presence`` items through the link registry, keeps one timer armed at the
core's next deadline (window expiry, coalesced items), and writes changed
``last_seen`` times in batches every ``persist_s`` (and on shutdown). Privacy
settings and contacts are written before their request is answered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bridge.background import Supervisor, cancel
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.presence.core import LimitExceeded, PresenceCore, PresenceOutcome
from bridge.presence.shell import PresenceShell, privacy_arg, saved, user_args
from bridge.presence.store import PresenceStore
from bridge.requests import OpError, check_args
from chatproto import Caller, ErrorCode

log = logging.getLogger(__name__)


class PresenceService(PresenceShell):
    def __init__(
        self,
        core: PresenceCore,
        store: PresenceStore,
        links: LinkRegistry,
        persist_s: float,
        *,
        clock: Clock,
        supervisor: Supervisor,
    ) -> None:
        super().__init__(core, links, clock=clock, supervisor=supervisor)
        self._store = store
        self._persist_s = persist_s
        self._write_lock = asyncio.Lock()  # one transaction at a time on the store's connection
        self._loop_task: asyncio.Task[None] | None = None
        self.rows_written = 0
        self.batches_written = 0

    async def start(self) -> None:
        snapshot = await self._store.load()
        self.core.load(snapshot.last_seen, snapshot.settings, snapshot.contacts)
        log.info("presence: %d last-seen time(s), %d privacy setting(s), %d contact(s) loaded",
                 len(snapshot.last_seen), len(snapshot.settings), len(snapshot.contacts))
        self._loop_task = self._supervisor.spawn("presence_persist", self._persist_round)

    # --- heartbeats and devices ---------------------------------------------------------------

    def device_offline(self, user: str, client_id: str) -> None:
        """The device's connection ended (or it left its inbox): its foreground and watch list end."""
        self._apply(self.core.device_offline(user, client_id, self._now()))

    # --- carrying out outcomes; the timer -------------------------------------------------------

    def _apply(self, out: PresenceOutcome) -> None:
        for client_id, item in out.items:
            self._links.send(client_id, item)
        self._timer.arm(self.core.next_deadline())

    def _fire(self) -> None:
        self._apply(self.core.tick(self._now()))

    # --- persistence ------------------------------------------------------------------------

    async def _persist_round(self) -> None:
        await asyncio.sleep(self._persist_s)
        await self._persist_once()

    async def _persist_once(self) -> None:
        """Write the changed last-seen times; on any failure they are kept for the next batch, and it raises."""
        async with self._write_lock:
            rows = self.core.take_dirty()
            if not rows:
                return
            try:
                await self._store.save_last_seen(rows)
            except BaseException:  # cancelled too: the rows were taken, they must go back
                self.core.write_failed(rows)
                raise
        self.rows_written += len(rows)
        self.batches_written += 1

    async def close(self) -> None:
        """Stop the timer and the batch writer, then write every changed ``last_seen``."""
        self._timer.close()
        if self._loop_task is not None:
            await cancel([self._loop_task])
        for _ in range(3):
            try:
                await self._persist_once()
                break
            except Exception as exc:
                self._supervisor.failed("presence_persist", exc)

    # --- requests ------------------------------------------------------------------------------

    async def _get(self, caller: Caller, args: dict[str, Any]) -> Any:
        views, out = self.core.get(caller.user, user_args(args), self._now())
        self._apply(out)
        return {"users": {user: view.as_dict() for user, view in views.items()}}

    async def _subscribe(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        now = self._now()
        if self._links.get(caller.client_id) is None:
            # Gone before its request ran: answer (the answer is lost anyway), keep no watch list.
            views, out = self.core.get(caller.user, users, now)
        else:
            try:
                views, out = self.core.subscribe(caller.client_id, caller.user, users, now)
            except LimitExceeded as exc:
                raise OpError(ErrorCode.TOO_LARGE, str(exc)) from None
        self._apply(out)
        return {"users": {user: view.as_dict() for user, view in views.items()}}

    async def _unsubscribe(self, caller: Caller, args: dict[str, Any]) -> Any:
        return {"watching": self.core.unsubscribe(caller.client_id, user_args(args))}

    async def _privacy_get(self, caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        return {"last_seen": self.core.setting(caller.user), "contacts": sorted(self.core.contacts(caller.user))}

    async def _privacy_set(self, caller: Caller, args: dict[str, Any]) -> Any:
        setting = privacy_arg(args)
        async with self._write_lock:
            await saved(self._store.set_privacy(caller.user, setting))
            self._apply(self.core.set_privacy(caller.user, setting, self._now()))
        return {"last_seen": setting}

    async def _contacts_add(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        async with self._write_lock:
            try:
                new = self.core.check_add_contacts(caller.user, users)
            except LimitExceeded as exc:
                raise OpError(ErrorCode.TOO_LARGE, str(exc)) from None
            if new:
                await saved(self._store.add_contacts(caller.user, new))
                self._apply(self.core.add_contacts(caller.user, new, self._now()))
        return {"contacts": len(self.core.contacts(caller.user))}

    async def _contacts_remove(self, caller: Caller, args: dict[str, Any]) -> Any:
        users = user_args(args)
        async with self._write_lock:
            gone = sorted(self.core.contacts(caller.user).intersection(users))
            if gone:
                await saved(self._store.remove_contacts(caller.user, gone))
                self._apply(self.core.remove_contacts(caller.user, gone, self._now()))
        return {"contacts": len(self.core.contacts(caller.user))}

    def stats(self) -> dict[str, int]:
        return {**self.core.stats(), "rows_written": self.rows_written, "batches_written": self.batches_written}
