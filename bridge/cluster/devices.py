"""Devices linking to and leaving a cluster node: the node directory (which node holds each device:
registering a new link, a takeover by another node, closing a device's connection wherever it is)
and what account events do to a device's queue (its removal; a user's first device adopting what
was held for them). None of it runs per message. ``ClusterMessaging`` (bridge/cluster/messaging.py)
owns it, hands it the router's device events and is its ``DeviceHost``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.clock import Clock
from bridge.cluster.holding import Holding
from bridge.cluster.nodes import NodeBus, Nudge, NudgeKind
from bridge.cluster.round_health import RoundHealth
from bridge.cluster.store import QueueStore
from bridge.cluster.window import WindowOutcome, Windows
from bridge.links import LinkRegistry
from bridge.messaging.admission import Holds
from bridge.messaging.service import DeliveryWatch
from bridge.store import StoreError

log = logging.getLogger(__name__)


class DeviceHost(Protocol):
    """What the devices need of the messaging service that owns them."""

    windows: Windows
    watch: DeliveryWatch | None

    def apply(self, out: WindowOutcome) -> None: ...

    async def wake(self, targets: list[tuple[str, int]]) -> None: ...

    async def retrying(self, what: str, step: Callable[[], Awaitable[object]]) -> None: ...

    def spawn(self, coro: Any) -> asyncio.Task[None]: ...

    async def expire_queues(self, client_ids: list[str], now_ms: int) -> int: ...


class Devices:
    def __init__(self, host: DeviceHost, bus: NodeBus, queues: QueueStore, links: LinkRegistry, holds: Holds,
                 held: Holding, health: RoundHealth, close_session: Callable[[str], Awaitable[None]], *,
                 flush_ms: int, clock: Clock) -> None:
        self._host = host
        self._bus = bus
        self._queues = queues
        self._links = links
        self._holds = holds
        self._held = held
        self._health = health
        self._close_session = close_session
        self._flush_ms = flush_ms
        self._now_ms = clock.wall_ms
        self._now = clock.monotonic

    def online(self, client_id: str) -> None:
        # A new connection re-sends everything not 'sent' yet, oldest first: refusals on the old one no
        # longer say what must come first (its uplinks still waiting are dropped, ClusterMessaging._run_lane).
        host = self._host
        self._holds.forget(client_id)
        if host.watch is not None:
            host.watch.online(client_id)
        host.apply(host.windows.online(client_id, self._now()))
        host.spawn(self._register(client_id, host.windows.link(client_id) or 0))

    async def _register(self, client_id: str, link: int) -> None:
        host = self._host
        try:
            before = await self._bus.register(client_id)
        except StoreError as exc:
            log.error("cannot register %s in the node directory: %s", client_id, exc)
            return
        self._bus.report(len(host.windows))
        # The old node closes its connection first of all: until it does, that connection's uplinks
        # still run there beside this one's, and may overtake what this one re-sends (a takeover
        # sent after the seq block below waited out a failing WAIT: bench chaos --cluster).
        if before is not None:
            await self._bus.send(before, Nudge(NudgeKind.TAKEOVER, client_id, self._bus.node_id))
        # Read again: an item staged after the first read but before the directory named this node
        # had no one to nudge (found by tests/test_messaging.py on the cluster deployment). With a
        # block of local seqs first, so that read catches the device up for write-back (window rule 4).
        if self._flush_ms > 0:
            try:
                base = await self._queues.seq_block(client_id)
            except StoreError as exc:  # this link gets everything through Redis
                log.warning("no write-back for %s: %s", client_id, exc)
            else:
                host.apply(host.windows.set_base(client_id, link, base, self._now()))
        host.apply(host.windows.behind([client_id], self._now()))
        try:  # its queue may have missed the expiry index (a node died between a stage and its hint)
            await host.expire_queues([client_id], self._now_ms())
        except StoreError as exc:  # the next sweep or connection does it
            log.warning("cannot expire the queue of %s: %s", client_id, exc)

    def offline(self, client_id: str) -> None:
        host = self._host
        if host.watch is not None:
            host.watch.offline(client_id)
        host.windows.offline(client_id)
        self._held.gone(client_id)
        self._health.gone(client_id)
        host.spawn(self._unregister(client_id))

    async def _unregister(self, client_id: str) -> None:
        if client_id in self._host.windows:
            return  # linked again meanwhile
        try:
            await self._bus.unregister(client_id)
        except StoreError as exc:  # the entry dies with this node's lease, or the next register replaces it
            log.warning("cannot unregister %s: %s", client_id, exc)
        self._bus.report(len(self._host.windows))

    async def close(self, client_id: str) -> None:
        """Close the device's connection on whichever node holds it (``devices.remove``)."""
        if self._links.get(client_id) is not None:
            await self._close_session(client_id)
            return
        node = (await self._bus.locate([client_id])).get(client_id)
        if node is not None and node != self._bus.node_id:
            await self._bus.send(node, Nudge(NudgeKind.CLOSE, client_id, self._bus.node_id))

    async def taken_over(self, nudge: Nudge) -> None:
        """The device connected to another node: close our connection of it, unless the directory
        says it is here again (a late nudge must not close a newer connection)."""
        if self._links.get(nudge.target) is None:
            return
        where = await self._bus.locate([nudge.target])
        if where.get(nudge.target) != self._bus.node_id:
            log.info("%s connected through node %s: closing its connection here", nudge.target, nudge.origin)
            await self._close_session(nudge.target)

    def removed(self, user: str, device: str) -> None:
        client_id = f"{user}.{device}"
        self._holds.forget(client_id)
        if self._host.watch is not None:
            self._host.watch.removed(client_id)
        self._host.spawn(self._host.retrying(f"removal of {client_id}'s queue", lambda: self._drop_queue(client_id)))

    async def _drop_queue(self, client_id: str) -> None:
        await self._queues.remove_device(client_id)

    def registered(self, user: str, device: str) -> None:
        """A device logged in for the first time: a user's first device takes what was held for them."""
        self._host.spawn(self._host.retrying(f"adoption by {user}.{device}",
                                             lambda: self._adopt(user, f"{user}.{device}")))

    async def _adopt(self, user: str, client_id: str) -> None:
        if await self._queues.adopt_placeholder(user, client_id):
            await self._host.wake([(client_id, 0)])
