"""The user and device commands in cluster mode: ``ClusterAccounts``, the ``AccountStore``
(chatserver/user_admin.py) on the Redis Cluster.

The users, devices and tokens are ``RedisUserStore``'s. Removing a device also takes what cluster
mode keeps of it elsewhere in Redis, with the scripts the nodes run for ``devices.remove``
(bridge/keys/service.py): its keys (``RedisKeyStore.remove_device``), its account and token, its
staged queue (``RedisQueueStore.remove_device``), in that order, each one Lua script on the user's
slot, then its push registration (``RedisPushStore.unregister``). Deleting a user deletes the
account first (no login, no message to them from then on), then closes their connections, then
drops each device's keys, queue and push registration, and the held queue of a user
without devices (``user.*``): closed first, a connection cannot publish keys again behind them.

Connections: the command is no node. It looks the devices up in the device -> node directory and
sends the node holding each a CLOSE nudge (``RedisNodeBus`` with ``node_id=""`` sends, holding no
lease), as a node does for ``devices.remove`` (bridge/cluster/messaging.py ``close_device``). A
nudge may be lost (a failover under the node's channel), so it is sent again every
``RESEND_S`` until the directory no longer names the device there, for up to ``CLOSE_WAIT_S``;
each connection closed, or still open after that, is said on stderr. One still open ends when
its device disconnects; its token no longer works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from bridge.cluster.nodes import Nudge, NudgeKind
from bridge.directory import PLACEHOLDER_DEVICE
from bridge.store import StoreError
from broker.users import DeviceInfo, UserInfo
from chatserver.cluster import ClusterStores
from chatserver.config import ClusterSettings
from chatserver.user_admin import AccountStore, Opener

ORIGIN = "chat-broker-admin"  # the nudges' origin, for the logs: a node obeys a CLOSE from anyone
CLOSE_WAIT_S = 5.0
RESEND_S = 1.0
POLL_S = 0.1


@dataclass
class ClusterAccounts:
    stores: ClusterStores
    say: Callable[[str], None]  # a line for the operator (stderr)

    @classmethod
    async def open(cls, cluster: ClusterSettings, say: Callable[[str], None]) -> ClusterAccounts:
        return cls(await ClusterStores.open(cluster, node_id=""), say)

    async def close(self) -> None:
        await self.stores.close()

    async def add_user(self, name: str, pw_hash: str) -> None:
        await self.stores.users.add_user(name, pw_hash)

    async def add_users(self, rows: Iterable[tuple[str, str]]) -> tuple[int, list[str]]:
        return await self.stores.users.add_users(rows)

    async def user_exists(self, name: str) -> bool:
        return await self.stores.users.user_exists(name)

    async def set_password(self, name: str, pw_hash: str) -> None:
        await self.stores.users.set_password(name, pw_hash)

    def iter_users(self) -> AsyncIterator[UserInfo]:
        return self.stores.users.iter_users()

    async def devices(self, user: str) -> list[DeviceInfo]:
        return await self.stores.users.devices(user)

    async def revoke_tokens(self, user: str, device: str | None = None) -> int:
        return await self.stores.users.revoke_tokens(user, device)

    async def delete_device(self, user: str, device: str) -> bool:
        stores = self.stores
        await stores.keys.remove_device(user, device)
        existed = await stores.users.delete_device(user, device)
        await stores.queues.remove_device(f"{user}.{device}")
        await stores.push.unregister(f"{user}.{device}")
        await self._close_connections([f"{user}.{device}"])
        return existed

    async def delete_user(self, name: str) -> None:
        stores = self.stores
        devices = await stores.users.devices(name)
        await stores.users.delete_user(name)
        await self._close_connections([f"{name}.{d.device}" for d in devices])
        # Keyed devices too: one the account lost (a removal cut short) still has its keys here.
        keyed = await stores.keys.device_keys(name)
        for device in sorted({d.device for d in devices} | set(keyed)):
            await stores.keys.remove_device(name, device)
            await stores.queues.remove_device(f"{name}.{device}")
            await stores.push.unregister(f"{name}.{device}")
        await stores.queues.remove_device(f"{name}.{PLACEHOLDER_DEVICE}")

    async def _close_connections(self, client_ids: list[str]) -> None:
        """Close each device's connection on the node holding it; say which closed and which did not."""
        try:
            where = await self.stores.bus.locate(client_ids)
            left = await self._nudge_until_closed(where)
        except StoreError as exc:
            self.say(f"cannot close the connections of {', '.join(client_ids)}: {exc}; an open one ends when its "
                     "device disconnects (its token no longer works)")
            return
        for client_id, node in where.items():
            if client_id in left:
                self.say(f"{client_id} is still connected to node {node} ({CLOSE_WAIT_S:g} s after it was asked "
                         "to close it): it ends when the device disconnects (its token no longer works)")
            else:
                self.say(f"{client_id}: its connection to node {node} is closed")

    async def _nudge_until_closed(self, where: dict[str, str]) -> dict[str, str]:
        """Send CLOSE to the node of each connection (again every ``RESEND_S``: a nudge may be lost)
        until the directory no longer names it there; returns those still open at ``CLOSE_WAIT_S``."""
        bus = self.stores.bus
        left = dict(where)
        deadline = time.monotonic() + CLOSE_WAIT_S
        next_send = 0.0
        while left and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                for client_id, node in left.items():
                    await bus.send(node, Nudge(NudgeKind.CLOSE, client_id, ORIGIN))
                next_send = time.monotonic() + RESEND_S
            await asyncio.sleep(POLL_S)
            still = await bus.locate(list(left))
            left = {client_id: node for client_id, node in still.items() if node == left[client_id]}
        return left


def opener(cluster: ClusterSettings, say: Callable[[str], None]) -> Opener:
    async def open_store(create: bool) -> AccountStore:  # the cluster is there or not: nothing to create
        return await ClusterAccounts.open(cluster, say)
    return open_store
