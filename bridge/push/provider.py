"""What the push service needs of a push provider (issue #18): one platform's API behind one call.
The implementations live in providers/push/ (FCM, APNs, Web Push, UnifiedPush), the only code that
talks to those services; the wiring (chatserver/) picks them by platform.

A wake-up is content-free by default: it tells the phone to connect and fetch, nothing more
(docs/PUSH.md). A provider never raises for what the service answers: every answer is a
``PushResult`` the service acts on (retry after a back-off, drop a dead token)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

PLATFORMS = ("fcm", "apns", "webpush", "unifiedpush")


@dataclass(frozen=True, slots=True)
class PushTarget:
    """A device's registration. ``token`` is what the platform needs: the FCM registration token, the
    APNs device token (hex), the Web Push subscription (JSON: ``endpoint`` and ``keys`` ``p256dh``,
    ``auth``), or the UnifiedPush endpoint URL."""

    platform: str
    token: str
    client_id: str  # the device it wakes (logs and metrics; never sent)
    # The device's X25519 key for push previews and its Ed25519 signature of it (``push.register``):
    # handed to senders in the key directory when previews are on; never sent to a push service.
    preview_key: str | None = None
    preview_sig: str | None = None


@dataclass(frozen=True, slots=True)
class WakeUp:
    collapse_key: str  # the same for every wake-up of one device: the provider keeps only the latest
    expires_at_ms: int  # after this the provider need not deliver it (the items' expiry)
    preview: str | None = None  # only with ``push.include_preview``: what a sender's SDK encrypted for the device


class Outcome(enum.Enum):
    SENT = "sent"
    RETRY = "retry"  # 429, 5xx, a timeout or a refused connection: try again after a back-off
    GONE = "gone"  # the token is dead (APNs 410, FCM UNREGISTERED, Web Push 404/410): drop it
    REJECTED = "rejected"  # refused for good (a malformed token, bad credentials): not retried


@dataclass(frozen=True, slots=True)
class PushResult:
    outcome: Outcome
    retry_after_s: float | None = None  # RETRY: the service's Retry-After, when it gave one
    detail: str = ""  # what the service said, for the log


class PushProvider(Protocol):
    platform: str

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        """Deliver one wake-up; raises nothing but ``asyncio.CancelledError``."""

    async def close(self) -> None: ...
