"""The one port through which the broker hands chat traffic on: what it calls, and nothing more.

The bridge (``bridge.router.Bridge``) implements ``ChatPort`` structurally; the
broker never imports it, so it knows no chat feature. What crosses the port:
- lifecycle: a device's first login, and when it links or unlinks its inbox
  (an ``InboxLink``: the bridge writes the device's downlink through it);
- uplink: each publish of a chat device on one of its five uplink topics, after
  the ACL, in arrival order, and each publish to a chat topic it may not use;
- shutdown: ``close`` once the sessions are closed.
Every call but ``close`` returns at once and never raises (the bridge spawns
what must wait, such as the database).
"""

from __future__ import annotations

from typing import Protocol

from chatproto import Caller


class InboxLink(Protocol):
    """A connected device's inbox (``bridge.links.DeviceLink``): ``SessionLink`` on amqtt's path,
    ``ChatSession`` on the lean one (broker/lean.py)."""

    @property
    def client_id(self) -> str: ...

    def send(self, payload: bytes) -> None:
        """Queue ``payload`` for the device's inbox topic, after everything queued before; never blocks."""


class ChatPort(Protocol):
    def device_registered(self, user: str, device: str) -> None:
        """``user.device`` logged in for the first time (it is a known device from now on)."""

    def device_online(self, user: str, link: InboxLink) -> None:
        """The device subscribed to its inbox: send its items through ``link``."""

    def device_offline(self, user: str, link: InboxLink) -> None:
        """The device left (unsubscribed, disconnected, taken over): ``link`` is not to be used."""

    def on_uplink(self, caller: Caller, kind: str, payload: bytes) -> None:
        """A publish by ``caller`` on ``u/{caller.user}/{kind}``, ``kind`` one of ``chatproto.UPLINKS``."""

    def refuse_topic(self, caller: Caller, topic: str) -> None:
        """``caller`` published to ``topic``, a chat topic it may not use (the broker counted and logged it)."""

    async def close(self) -> None:
        """Finish what is in flight and write what is only in memory (after every session is closed)."""
