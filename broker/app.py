"""Wiring: settings -> stores, authenticator, messaging, presence, bridge, broker. Used by the CLI and the tests."""

from __future__ import annotations

import logging
import time

from bridge.directory import Directory
from bridge.key_service import KeyService
from bridge.key_store import SqliteKeyStore
from bridge.keys import KeyedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.links import LinkRegistry
from bridge.messaging import Messaging
from bridge.presence import PresenceCore, PresenceRules
from bridge.presence_service import PresenceService
from bridge.presence_store import SqlitePresenceStore
from bridge.requests import build_ops
from bridge.service import Bridge
from bridge.staging import Rules, Staging
from bridge.store import SqliteStagingStore
from broker.auth import Authenticator
from broker.config import Settings
from broker.login_guard import LoginGuard
from broker.server import ChatBroker
from broker.users import UserStore, load_or_create_secret

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


class BrokerApp:
    """One running chat broker. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._users: UserStore | None = None
        self._staging_store: SqliteStagingStore | None = None
        self._presence_store: SqlitePresenceStore | None = None
        self._key_store: SqliteKeyStore | None = None
        self._presence: PresenceService | None = None
        self._broker: ChatBroker | None = None

    @property
    def broker(self) -> ChatBroker:
        if self._broker is None:
            raise RuntimeError("the broker is not started")
        return self._broker

    @property
    def presence(self) -> PresenceService:
        if self._presence is None:
            raise RuntimeError("the broker is not started")
        return self._presence

    @property
    def users(self) -> UserStore:
        if self._users is None:
            raise RuntimeError("the broker is not started")
        return self._users

    async def start(self) -> None:
        settings = self.settings
        try:
            self._users = await UserStore.open(settings.data_path)
            self._staging_store = await SqliteStagingStore.open(settings.data_path)
            self._presence_store = await SqlitePresenceStore.open(settings.data_path)
            self._key_store = await SqliteKeyStore.open(settings.data_path)
            auth = settings.auth
            authenticator = Authenticator(
                self._users,
                LoginGuard(auth.free_failures, auth.base_delay_s, auth.max_delay_s, auth.forget_after_s),
                load_or_create_secret(settings.data_path),
                auth.hash_concurrency,
            )
            keyed = KeyedDevices(await self._key_store.keyed_devices())
            messaging = await self._start_messaging(self._users, self._staging_store, keyed)
            presence = self._presence = await self._start_presence(messaging.links, self._presence_store)
            keys = KeyService(self._key_store, keyed, self._users, messaging, self._close_session)
            ops = {**build_ops(authenticator), **presence.ops(), **keys.ops()}
            bridge = Bridge(messaging.links, ops, messaging, presence, settings.limits.max_request_bytes)
            self._broker = ChatBroker(settings, authenticator, bridge)
            await self._broker.start()
        except BaseException:
            if self._presence is not None:
                await self._presence.close()
            await self._close_stores()
            self._broker = None
            raise

    async def _close_session(self, client_id: str) -> None:
        if self._broker is not None:
            await self._broker.close_session(client_id)

    async def _start_messaging(self, users: UserStore, store: SqliteStagingStore, keyed: KeyedDevices) -> Messaging:
        settings = self.settings
        rules = Rules(
            flush_s=settings.staging.flush_ms / 1000,
            ttl_ms=int(settings.staging.ttl_days * 86_400_000),
            window=settings.delivery.window,
            redeliver_after_s=settings.delivery.redeliver_after_s,
            max_queue=settings.delivery.max_queue,
            dedup_window_ms=int(settings.dedup.window_s * 1000),
            require_encryption=settings.limits.require_encryption,
        )
        directory = Directory()
        directory.load(await users.all_devices())
        staging = Staging(
            rules, await store.next_boot(), directory,
            RateLimiter(settings.limits.send_rate_per_s, settings.limits.send_burst),
            RecentIds(settings.dedup.max_entries),
            keyed,
        )
        messages, items, remembered = await store.load(_now_ms())
        staging.restore(messages, items)
        staging.remember_ids(remembered)
        log.info("staging: %d message(s), %d item(s) restored", len(messages), len(items))
        links = LinkRegistry()
        messaging = Messaging(staging, store, links, links.send, users, settings.limits.max_body_bytes,
                              settings.staging.checkpoint_idle_s, settings.staging.sweep_s,
                              settings.limits.max_devices_per_message)
        await messaging.start()
        return messaging

    async def _start_presence(self, links: LinkRegistry, store: SqlitePresenceStore) -> PresenceService:
        config = self.settings.presence
        core = PresenceCore(PresenceRules(
            online_window_ms=int(config.online_window_s * 1000),
            coalesce_ms=config.coalesce_ms,
            max_contacts=config.max_contacts,
            max_watched=config.max_watched,
        ))
        presence = PresenceService(core, store, links, config.persist_s)
        await presence.start()
        return presence

    def addresses(self) -> dict[str, tuple[str, int]]:
        return self.broker.bound_addresses()

    async def stop(self) -> None:
        """Stop accepting, close every session, write what is staged in memory, close the stores."""
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        await self._close_stores()

    async def _close_stores(self) -> None:
        for store in (self._key_store, self._presence_store, self._staging_store, self._users):
            if store is not None:
                await store.close()
        self._key_store = None
        self._presence_store = None
        self._presence = None
        self._staging_store = None
        self._users = None
