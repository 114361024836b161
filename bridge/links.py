"""The seam between the bridge and the broker: a link to one connected device.

The broker implements ``DeviceLink`` on top of an amqtt session; the bridge
reaches a device only through ``LinkRegistry.send`` (a typed downlink item in,
its bytes to ``DeviceLink.send``, which must not block and must keep call order).
"""

from __future__ import annotations

import logging
from typing import Protocol

from bridge.counters import BridgeCounters
from chatproto import DownlinkItem

log = logging.getLogger(__name__)


class DeviceLink(Protocol):
    @property
    def client_id(self) -> str: ...

    def send(self, payload: bytes) -> None:
        """Queue ``payload`` for the device's inbox topic, after everything queued before."""


class LinkRegistry:
    """Connected devices that subscribed to their inbox, by client id and by user."""

    def __init__(self, counters: BridgeCounters | None = None) -> None:
        self.counters = counters if counters is not None else BridgeCounters()
        self._by_client: dict[str, DeviceLink] = {}
        self._by_user: dict[str, dict[str, DeviceLink]] = {}

    def attach(self, user: str, link: DeviceLink) -> None:
        self._by_client[link.client_id] = link
        self._by_user.setdefault(user, {})[link.client_id] = link

    def detach(self, user: str, link: DeviceLink) -> bool:
        """Remove ``link`` if it is still the current one for its client id (not after a takeover)."""
        if self._by_client.get(link.client_id) is not link:
            return False
        del self._by_client[link.client_id]
        devices = self._by_user.get(user)
        if devices is not None:
            devices.pop(link.client_id, None)
            if not devices:
                del self._by_user[user]
        return True

    def get(self, client_id: str) -> DeviceLink | None:
        return self._by_client.get(client_id)

    def of_user(self, user: str) -> list[DeviceLink]:
        return list(self._by_user.get(user, {}).values())

    def send(self, client_id: str, item: DownlinkItem) -> bool:
        """Send ``item`` to one connected device; False if it is not connected (a staged
        item then waits for the device's next connection, any other is dropped)."""
        link = self._by_client.get(client_id)
        if link is None:
            log.debug("no link to %s: %s item not sent", client_id, item.KIND)
            return False
        self.counters.count_downlink(item)
        link.send(item.encode())
        return True

    def __len__(self) -> int:
        return len(self._by_client)
