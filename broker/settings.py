"""What the broker needs of the configuration: frozen values, built by the application from its config.

The broker never reads the config file or its model (``chatserver.config``);
``chatserver/app.py`` turns the validated settings into these.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.acl import RuleLike
from broker.downlink import UNREAD_DOWNLINK_MAX
from broker.mqtt.limits import WireLimits


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    name: str
    """``tcp``, ``tls``, ``ws`` or ``wss``: the transport, and the config key named in error messages."""
    bind: str
    """``HOST:PORT`` as configured (for messages); ``host`` and ``port`` are what it parses to."""
    host: str
    port: int
    max_connections: int
    certfile: str | None = None
    keyfile: str | None = None
    reuse_port: bool = False
    """Bind with SO_REUSEPORT: several processes share the port (``chat-broker run --workers``)."""
    proxy_protocol: bool = False
    """tcp, tls: every connection starts with a PROXY header from a trusted proxy (broker/front.py)."""
    forwarded_for: bool = False
    """ws, wss: every connection comes from a trusted proxy, the client named by X-Forwarded-For."""
    backlog: int = 1024
    """``listen()``'s backlog: connections queued by the kernel until the broker accepts them."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    listeners: tuple[ListenerSettings, ...]
    """The listeners to open, in this order (a listener that is off is not here)."""
    wire: WireLimits
    max_queued_messages: int
    """QoS 1/2 messages on generic topics held per session."""
    allow_anonymous: bool
    acl: tuple[RuleLike, ...]
    anonymous_acl: tuple[RuleLike, ...]
    max_unauthenticated_per_address: int
    connect_timeout_s: float
    max_unacked_downlinks: int
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of the load balancers that may name the client (``proxy_protocol``, ``forwarded_for``)."""
    lean_sessions: bool = True
    """Chat sessions on every listener run on the sans-IO core, one asyncio.Protocol each (broker/lean.py)."""
    max_unread_downlink_bytes: int = UNREAD_DOWNLINK_MAX
    """Lean path: bytes waiting for a chat device that does not read past which its downlinks are dropped."""
