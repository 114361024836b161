"""The bridge: the chat protocol's server side, fed by the broker.

The broker hands every publish on a ``u/{me}/...`` uplink topic to
``on_uplink`` (after the ACL), and tells the bridge when a device subscribes to
or leaves its inbox, and when a device logs in for the first time. Chat items
go to messaging, heartbeats to presence, requests to the ops table. The bridge
answers through ``LinkRegistry.send``; it never goes through amqtt's subscription
matching, so the cost of a message does not grow with the number of connected
users.

``on_uplink`` never awaits: work that must wait (the database) runs in tasks,
so one slow request cannot stall the sender's connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bridge.links import DeviceLink, LinkRegistry
from bridge.messaging.service import Messaging
from bridge.presence.service import PresenceService
from bridge.requests import Op, OpError
from chatproto import Caller, DecodeError, ErrorCode, ErrorItem, Request, ResItem

log = logging.getLogger(__name__)


class Bridge:
    def __init__(self, links: LinkRegistry, ops: dict[str, Op], messaging: Messaging, presence: PresenceService,
                 max_request_bytes: int) -> None:
        self.links = links
        self.messaging = messaging
        self.presence = presence
        self._ops = ops
        self._max_request = max_request_bytes
        self._tasks: set[asyncio.Task[None]] = set()

    # --- device lifecycle (called by the broker) ------------------------------

    def device_registered(self, user: str, device: str) -> None:
        self.messaging.device_registered(user, device)

    def device_online(self, user: str, link: DeviceLink) -> None:
        replaced = self.links.get(link.client_id)
        if replaced is link:
            return  # the same connection linked again (a repeated SUBSCRIBE): nothing changes
        self.links.attach(user, link)
        if replaced is not None:
            # A new connection of the device before the old one was detached (a takeover whose
            # clean-up is late): the old one's detach will find itself replaced and do nothing,
            # so its foreground and watch list end here; the new connection starts without them.
            self.presence.device_offline(user, link.client_id)
        self.messaging.device_online(link.client_id)

    def device_offline(self, user: str, link: DeviceLink) -> None:
        if self.links.detach(user, link):
            self.messaging.device_offline(link.client_id)
            # The disconnect of a foreground device ends its part in "online" at once
            # (also a keepalive timeout: broker/handler.py); its watch list ends too.
            self.presence.device_offline(user, link.client_id)

    # --- uplink ------------------------------------------------------------

    def on_uplink(self, caller: Caller, kind: str, payload: bytes) -> None:
        """A publish by ``caller`` on ``u/{caller.user}/{kind}``; never raises."""
        try:
            if kind == "out":
                self.messaging.on_out(caller, payload)
            elif kind == "ack":
                self.messaging.on_ack(caller, payload)
            elif kind == "seen":
                self.messaging.on_seen(caller, payload)
            elif kind == "hb":
                self.presence.on_heartbeat(caller, payload)
            elif kind == "req":
                self._on_request(caller, payload)
            else:  # the broker passes only the five uplink kinds
                self.links.send(caller.client_id, ErrorItem(ErrorCode.UNSUPPORTED, f"'{kind}' is not supported"))
        except Exception:  # a bug must cost one item, never the broker
            log.exception("uplink %s from %s failed", kind, caller.client_id)
            self.links.send(caller.client_id, ErrorItem(ErrorCode.INTERNAL, "the server failed to handle this item"))

    def refuse_topic(self, caller: Caller, topic: str) -> None:
        """A publish to a topic the caller may not use: answer, never drop silently."""
        self.links.send(
            caller.client_id,
            ErrorItem(ErrorCode.FORBIDDEN, f"publishing to {topic!r} is not allowed; see docs/PROTOCOL.md"),
        )

    def _on_request(self, caller: Caller, payload: bytes) -> None:
        try:
            request = Request.decode(payload, self._max_request)
        except DecodeError as exc:
            self.links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        op = self._ops.get(request.op)
        if op is None:
            self.links.send(caller.client_id,
                            ResItem.failure(request.rid, ErrorCode.UNKNOWN_OP, f"unknown op {request.op!r}"))
            return
        self._spawn(self._run_op(caller, request.rid, request.op, op, request.args))

    async def _run_op(self, caller: Caller, rid: str, name: str, op: Op, args: dict[str, Any]) -> None:
        try:
            item = ResItem.success(rid, await op(caller, args))
        except OpError as exc:
            item = ResItem.failure(rid, exc.code, exc.detail)
        except Exception:
            log.exception("op %s for %s failed", name, caller.client_id)
            item = ResItem.failure(rid, ErrorCode.INTERNAL, f"the server failed to run {name!r}")
        self.links.send(caller.client_id, item)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Finish running requests, then write what is staged only in memory and the last-seen times."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.messaging.close()
        await self.presence.close()
