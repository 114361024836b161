"""Bridge.device_online when a device's new connection subscribes before its old one was
detached (a late takeover clean-up): the old connection's presence state (foreground, watch
list) ends then, since the old one's detach finds itself replaced and does nothing."""

from __future__ import annotations

from typing import Any, cast

from bridge.links import LinkRegistry
from bridge.messaging.service import Messaging
from bridge.presence.service import PresenceService
from bridge.router import Bridge


class _Link:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def send(self, payload: bytes) -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def device_online(self, *args: Any) -> None:
        self.calls.append(("online", *args))

    def device_offline(self, *args: Any) -> None:
        self.calls.append(("offline", *args))


def _bridge() -> tuple[Bridge, _Recorder, _Recorder]:
    messaging, presence = _Recorder(), _Recorder()
    bridge = Bridge(LinkRegistry(), {}, cast(Messaging, messaging), cast(PresenceService, presence), 1024)
    return bridge, messaging, presence


def test_a_late_takeover_ends_the_old_connections_presence_state() -> None:
    bridge, messaging, presence = _bridge()
    old, new = _Link("bob.phone"), _Link("bob.phone")
    bridge.device_online("bob", old)
    bridge.device_online("bob", new)
    assert presence.calls == [("offline", "bob", "bob.phone")]
    bridge.device_offline("bob", old)  # the old one's clean-up, late: nothing more
    assert presence.calls == [("offline", "bob", "bob.phone")]
    assert messaging.calls == [("online", "bob.phone"), ("online", "bob.phone")]
    assert bridge.links.get("bob.phone") is new


def test_a_first_connection_or_the_same_link_again_ends_nothing() -> None:
    bridge, messaging, presence = _bridge()
    link = _Link("bob.phone")
    bridge.device_online("bob", link)
    bridge.device_online("bob", link)  # the same connection linked again (a repeated SUBSCRIBE)
    assert presence.calls == []
    assert messaging.calls == [("online", "bob.phone")], "a re-link sent the unacked items again"
