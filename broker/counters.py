"""Counters the broker layer keeps for the metrics endpoint: plain ints, read at scrape time.

Incremented on the hot path (one dict update per connection, login or
publish); ``chatserver.metrics`` turns them into Prometheus families. Labels are
small fixed sets (listener names, uplink kinds, login results), never a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BrokerCounters:
    accepted: dict[str, int] = field(default_factory=dict)
    """Connections accepted (TCP/WebSocket), by listener."""
    uplink: dict[str, int] = field(default_factory=dict)
    """Publishes received, by kind: the five chat uplinks, ``forbidden`` (refused topic), ``generic``."""
    downlink_dropped: int = 0
    """Chat downlinks not sent to a connection that left ``MAX_CHAT_INFLIGHT`` of them without PUBACK, or (lean
    path) that does not read while over ``limits.max_unread_downlink_bytes`` wait for it."""
    refused_unauthenticated: int = 0
    """Connections closed at once: their address had ``limits.max_unauthenticated_per_address`` not logged in."""
    refused_proxy: int = 0
    """Connections closed before MQTT on a listener behind a load balancer: not from a trusted proxy, or
    without a valid PROXY header (X-Forwarded-For on WebSocket) in time."""

    def connection(self, listener: str) -> None:
        self.accepted[listener] = self.accepted.get(listener, 0) + 1

    def publish(self, kind: str) -> None:
        self.uplink[kind] = self.uplink.get(kind, 0) + 1


LOGIN_RESULTS = ("ok", "anonymous", "bad_password", "bad_username", "bad_client_id", "throttled", "bad_will",
                 "too_many_devices")
