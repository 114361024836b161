"""Wiring of push (docs/PUSH.md): the configured providers, the push store and service.

Each provider's module is imported only when its section of ``push:`` is present, by name, so a
build without a provider's module (or its dependencies) runs without it; the module's
``from_settings(settings)`` builds the provider from the section's keys (docs/PUSH-PROVIDERS.md).
A section present whose module is missing, or whose provider refuses its settings (a key file that
cannot be read), stops the start with a ``ConfigError`` saying which.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from bridge.background import Supervisor
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.messaging.core import Staging
from bridge.push.cluster import ClusterPush
from bridge.push.cluster_store import ClusterPushStore
from bridge.push.core import PushCore, PushRules
from bridge.push.provider import PushProvider
from bridge.push.service import PushService
from chatserver.config import ConfigError
from chatserver.push_config import PushSettings
from storage.sqlite.push import SqlitePushStore

log = logging.getLogger(__name__)

PROVIDER_MODULES = {platform: f"providers.push.{platform}" for platform in ("fcm", "apns", "webpush", "unifiedpush")}


def build_providers(settings: PushSettings) -> dict[str, PushProvider]:
    """One provider per configured platform; ConfigError naming the first that cannot be built."""
    providers: dict[str, PushProvider] = {}
    for platform, kwargs in settings.platforms().items():
        name = PROVIDER_MODULES[platform]
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"push.{platform} is configured but {name} cannot be imported ({exc}); install "
                              "chat-broker with the 'server' extra, or remove the section") from None
        build = getattr(module, "from_settings", None)
        if build is None:
            raise ConfigError(f"push.{platform}: {name} has no from_settings(settings)")
        try:
            providers[platform] = build(kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"push.{platform}: {exc}") from None
    return providers


def push_rules(settings: PushSettings) -> PushRules:
    return PushRules(grace_ms=int(settings.grace_s * 1000), min_interval_ms=int(settings.min_interval_s * 1000),
                     max_queue=settings.max_queue, retry_min_ms=int(settings.retry_min_s * 1000),
                     retry_max_ms=int(settings.retry_max_s * 1000), max_attempts=settings.max_attempts,
                     wake_ttl_ms=int(settings.wake_ttl_s * 1000))


async def open_push(settings: PushSettings, data_dir: Path, devices: Iterable[str], links: LinkRegistry,
                    staging: Staging, *, clock: Clock, supervisor: Supervisor) -> tuple[PushService, SqlitePushStore]:
    """The push service on ``push.db``, started; ``devices``: the client ids users.db knows (a
    registration of any other device is dropped: it was removed while the broker was down)."""

    def pending(client_id: str) -> int:
        box = staging.boxes.get(client_id)
        return 0 if box is None else len(box.items)

    providers = build_providers(settings)
    store = await SqlitePushStore.open(data_dir)
    try:
        known = set(devices)
        targets, wakes, gone = await store.load()
        registered = {t.client_id for t in targets}
        for client_id in registered | set(gone):
            if client_id not in known:
                await store.unregister(client_id)
                log.info("push: device %s is gone from users.db: its registration is dropped", client_id)
        # A wake-up written just as its device unregistered (the round and the request raced).
        await store.delete_wakes([w.client_id for w in wakes if w.client_id not in registered & known])
        service = PushService(PushCore(push_rules(settings)), store, providers, links, pending,
                              allow_loopback=settings.allow_loopback_endpoints, concurrency=settings.concurrency,
                              clock=clock, supervisor=supervisor, include_preview=settings.include_preview)
        await service.start()
    except BaseException:
        for provider in providers.values():
            await provider.close()
        await store.close()
        raise
    log.info("push: providers %s", ", ".join(sorted(providers)) or "none (push.register is refused)")
    return service, store


async def open_cluster_push(settings: PushSettings, store: ClusterPushStore, links: LinkRegistry,
                            locate: Callable[[list[str]], Awaitable[dict[str, str]]],
                            pending: Callable[[str], Awaitable[int]], *, clock: Clock,
                            supervisor: Supervisor) -> ClusterPush:
    """Push on a cluster node, over the shared store (the store's client is the node's: not closed here)."""
    providers = build_providers(settings)
    push = ClusterPush(push_rules(settings), store, providers, links, locate, pending,
                       allow_loopback=settings.allow_loopback_endpoints, concurrency=settings.concurrency,
                       clock=clock, supervisor=supervisor, include_preview=settings.include_preview)
    await push.start()
    log.info("push: providers %s", ", ".join(sorted(providers)) or "none (push.register is refused)")
    return push
