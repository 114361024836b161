"""Each device's uplinks in cluster mode (``out`` and ``seen``) in a lane of their own (the lane
itself: bridge/cluster/lanes.py), handled one at a time in the order they came, since every step
awaits Redis. A full lane refuses ``rate_limited``, answered in its turn; an uplink whose connection
is gone is dropped. ``ClusterMessaging`` (bridge/cluster/messaging.py) hands each uplink in and
handles it when its turn comes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from bridge.clock import Clock
from bridge.cluster.lanes import Lane, Uplink
from bridge.cluster.rules import ClusterRules, busy_error
from bridge.links import LinkRegistry
from bridge.messaging.admission import Holds, Refused
from chatproto import Caller, ChatMessage, DecodeError, ErrorCode, ErrorItem, Seen

log = logging.getLogger(__name__)

Handler = Callable[[Caller, bytes], Awaitable[None]]


class Uplinks:
    def __init__(self, lanes: dict[str, Lane], links: LinkRegistry, holds: Holds, rules: ClusterRules,
                 submit: Handler, seen: Handler, spawn: Callable[[Any], asyncio.Task[None]], *, clock: Clock) -> None:
        self._lanes = lanes
        self._links = links
        self._holds = holds
        self._rules = rules
        self._submit = submit
        self._seen = seen
        self._spawn = spawn
        self._now = clock.monotonic

    def enter(self, kind: str, caller: Caller, payload: bytes) -> None:
        uplink = Uplink(kind, caller, payload, self._links.get(caller.client_id))
        lane = self._lanes.get(caller.client_id)
        if lane is None:
            self._lanes[caller.client_id] = lane = Lane()
            lane.push(uplink)
            self._spawn(self._run(caller.client_id))
            return
        if kind == "out":  # a lane is waiting: a copy of a message waiting in it is not queued again
            uplink = replace(uplink, ref=self._message_id(payload))
            if lane.waiting(uplink):
                return
        if len(lane) >= self._rules.max_lane:
            self._refuse_busy(lane, uplink)
            return
        lane.push(uplink)

    def _message_id(self, payload: bytes) -> str | None:
        try:
            return ChatMessage.decode(payload, self._rules.max_body_bytes, self._rules.max_devices_per_message).id
        except DecodeError:  # answered in its turn
            return None

    def _refuse_busy(self, lane: Lane, uplink: Uplink) -> None:
        """The device's lane is full (Redis is slow, or the device floods): the uplink is refused
        ``rate_limited``. The refusal takes its place in the lane as a small ``busy`` entry holding
        the message id only (the payload is dropped), so it is answered -- and holds the device's later
        messages -- in order with the answers to the uplinks ahead of it, as a refusal for the send
        rate is (answered on arrival, a refusal let later messages overtake: tests/test_cluster.py).
        Such an entry is the id only; how fast they come is bounded by ``limits.publishes_per_s``."""
        item: ChatMessage | Seen
        try:
            item = (ChatMessage.decode(uplink.payload, self._rules.max_body_bytes, self._rules.max_devices_per_message)
                    if uplink.kind == "out" else Seen.decode(uplink.payload))
        except DecodeError as exc:
            self._links.send(uplink.caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        ref = item.id if isinstance(item, ChatMessage) else None
        lane.push(replace(uplink, kind="busy", payload=(ref or "").encode(), ref=ref))

    def _refuse_in_order(self, client_id: str, ref: str | None) -> None:
        """Refuse a device's uplink as ``rate_limited``, as a refusal for the send rate is: behind the
        device's messages refused before it (if any), else first of a new hold. A copy of a message
        answered ``sent`` meanwhile (the original was ahead of it in the lane) is not answered."""
        if ref is not None and self._holds.was_answered(client_id, ref, self._now()):
            return
        if ref is not None:
            try:
                self._holds.check(client_id, ref, self._now())
            except Refused as refused:  # others come first: it waits behind them
                self._links.send(client_id, refused.item)
                return
            self._holds.hold(client_id, ref, ErrorCode.RATE_LIMITED, self._now())
        self._links.send(client_id, busy_error(ref))

    async def _run(self, client_id: str) -> None:
        lane = self._lanes[client_id]
        try:
            while lane:
                kind, caller, payload = lane.head().kind, lane.head().caller, lane.head().payload
                if self._links.get(client_id) is not lane.head().link:
                    # Its connection is gone: nobody hears the answer, and the device re-sends what
                    # was not 'sent' on its new connection, in order. Staging it now could put it
                    # behind, or its refusal could hold (ADMISSION rule 4), what that round sends
                    # first (found by `bench chaos --cluster`: a stale hold stalled a device for a
                    # minute, and what it sent next overtook the held messages).
                    lane.pop()
                    continue
                if kind == "busy":  # refused on arrival (the lane was full), answered here in order
                    self._refuse_in_order(client_id, payload.decode() or None)
                    lane.pop()
                    continue
                try:
                    await (self._submit(caller, payload) if kind == "out" else self._seen(caller, payload))
                except Exception:
                    log.exception("%s uplink of %s failed", kind, client_id)
                    self._links.send(client_id, ErrorItem(ErrorCode.INTERNAL, "the server failed to handle this item"))
                lane.pop()
        finally:
            del self._lanes[client_id]
