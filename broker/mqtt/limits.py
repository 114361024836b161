"""The configured bounds one connection is held to (the ``mqtt:`` and ``limits:`` config sections)."""

from __future__ import annotations

from dataclasses import dataclass

NO_KEEPALIVE_LIMIT = 65535
MAX_UNACKED = 8192
"""Default of ``limits.max_unacked_downlinks`` (broker/downlink.py explains the figure)."""


@dataclass(frozen=True, slots=True)
class WireLimits:
    max_packet_bytes: int
    keepalive_min_s: int = 0
    keepalive_max_s: int = NO_KEEPALIVE_LIMIT
    publishes_per_s: float = 0.0  # per connection; 0: unpaced
    publish_burst: int = 1
    max_connect_bytes: int = 65536
    """Largest CONNECT: refused on its fixed header, so an unauthenticated client holds little memory."""
    packet_deadline_s: float = 30.0
    """Time to complete a packet once its first byte arrived (an incomplete one is buffered meanwhile)."""
