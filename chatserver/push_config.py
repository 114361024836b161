"""The ``push:`` section of the config (docs/PUSH.md): when devices are woken, and each provider's
settings. A provider is on when its sub-section is present; its keys are what the provider's
module's ``from_settings`` reads (chatserver/push.py, docs/PUSH-PROVIDERS.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _ProviderSettings(_Section):
    """What every provider takes (docs/PUSH-PROVIDERS.md)."""

    timeout_s: float = Field(default=10.0, gt=0)
    """Connect, read, write and pool timeout of a request; past it the wake-up is retried."""
    verify: bool | str = True
    """TLS verification: true (the system's CAs), or a CA bundle's path (a private service, tests)."""


class FcmSettings(_ProviderSettings):
    """Firebase Cloud Messaging HTTP v1 (providers/push/fcm.py)."""

    project_id: str = Field(min_length=1)
    service_account_file: str = Field(min_length=1)
    """The service account's JSON key (from the Firebase console); read at start, never logged."""
    base_url: str | None = None
    """Instead of https://fcm.googleapis.com (tests)."""


class ApnsSettings(_ProviderSettings):
    """Apple Push Notification service, token authentication (providers/push/apns.py)."""

    team_id: str = Field(min_length=1)
    key_id: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    """The .p8 signing key (ES256) from the Apple developer account."""
    topic: str = Field(min_length=1)
    """The app's bundle id."""
    base_url: str | None = None
    """Instead of https://api.push.apple.com (api.sandbox.push.apple.com for development builds; tests)."""


class WebPushSettings(_ProviderSettings):
    """Web Push with VAPID (providers/push/webpush.py)."""

    vapid_private_key_file: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    """A ``mailto:`` or ``https:`` contact for the push services (RFC 8292)."""


class UnifiedPushSettings(_ProviderSettings):
    """UnifiedPush: a POST to the endpoint of the device's distributor (providers/push/unifiedpush.py)."""


class PushSettings(_Section):
    """Wake-ups for devices that are away (docs/PUSH.md): on one process, and in cluster mode."""

    enabled: bool = False
    grace_s: float = Field(default=10.0, gt=0)
    """A message delivered to a connected device and not acked within this wakes it (a dead connection)."""
    min_interval_s: float = Field(default=60.0, ge=0)
    """At most one wake-up per device this often while it stays away (an ack ends the wait)."""
    include_preview: bool = False
    """Carry the preview a sender's SDK encrypted for the device in its wake-up (docs/PUSH.md "Privacy");
    off: previews are dropped on arrival and preview keys are not handed out."""
    max_queue: int = Field(default=100_000, ge=1)
    """Devices with a wake-up waiting to go out; more are dropped (``chat_push_dropped``)."""
    retry_min_s: float = Field(default=1.0, gt=0)
    """The first back-off after a failed attempt without Retry-After; it doubles each time."""
    retry_max_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    wake_ttl_s: float = Field(default=86_400.0, gt=0)
    """How long a wake-up is worth delivering: the providers' TTL, and when retrying stops."""
    concurrency: int = Field(default=32, ge=1)
    """Wake-ups sent at once."""
    allow_loopback_endpoints: bool = False
    """Take endpoints on this machine (http too): for tests with a local distributor. Never in production."""
    fcm: FcmSettings | None = None
    apns: ApnsSettings | None = None
    webpush: WebPushSettings | None = None
    unifiedpush: UnifiedPushSettings | None = None

    @model_validator(mode="after")
    def _check(self) -> PushSettings:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("push.retry_max_s must be at least push.retry_min_s")
        return self

    def platforms(self) -> dict[str, dict[str, object]]:
        """The configured providers: platform -> the settings its ``from_settings`` reads."""
        sections = {"fcm": self.fcm, "apns": self.apns, "webpush": self.webpush, "unifiedpush": self.unifiedpush}
        platforms = {name: section.model_dump(exclude_none=True) for name, section in sections.items()
                     if section is not None}
        for name in ("webpush", "unifiedpush"):  # their URLs are clients' choice: checked at each connection
            if name in platforms:
                platforms[name]["allow_loopback_endpoints"] = self.allow_loopback_endpoints
        return platforms
