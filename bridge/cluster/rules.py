"""What a cluster node's messaging is configured with (``ClusterRules``, built from the settings by
chatserver/app.py) and the limits the nodes share through Redis: the send bucket, which group
messages (bridge/cluster/groups.py) draw from too, and the key-claim bucket. Apart from the
messaging shell (bridge/cluster/messaging.py) so those modules need not import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.cluster.store import QueueStore
from chatproto import DEFAULT_MAX_DEVICES_PER_MESSAGE, ErrorCode, ErrorItem

SEND_BUCKET = "send"


@dataclass(frozen=True, slots=True)
class ClusterRules:
    ttl_ms: int
    window: int
    redeliver_after_s: float
    max_queue: int
    dedup_window_ms: int
    send_rate_per_s: float
    send_burst: int
    max_body_bytes: int
    max_devices_per_message: int = DEFAULT_MAX_DEVICES_PER_MESSAGE
    require_encryption: bool = False
    poll_s: float = 300.0
    sweep_s: float = 60.0
    max_lane: int = 1024  # uplinks of one device waiting for Redis; beyond, refused (memory per device stays bounded)
    flush_ms: int = 50  # write-back: 0 writes everything to Redis first
    # A reserved message's pending mark lasts flush_ms + this: long enough for its node to write or
    # settle it, short enough that a re-send after that node died (or lost Redis) is not refused for
    # long. Its only job is to spare devices a second copy (the SDK drops one by (from, id) anyway).
    pending_hold_ms: int = 1000


def busy_error(ref: str | None) -> ErrorItem:
    return ErrorItem(ErrorCode.RATE_LIMITED, "too many items waiting to be stored; retry later", ref)


class SharedClaimLimit:
    """``bridge.keys.service.ClaimLimit`` held across nodes: a bucket per claimer and peer in Redis."""

    def __init__(self, queues: QueueStore, rate_per_s: float, burst: int, now_ms: Callable[[], int]) -> None:
        self._queues = queues
        self._rate = rate_per_s
        self._burst = burst
        self._now_ms = now_ms

    async def allow(self, claimer: str, peer: str) -> bool:
        return await self._queues.allow(claimer, f"claim:{peer}", self._rate, self._burst, self._now_ms())
