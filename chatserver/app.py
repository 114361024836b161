"""Wiring: settings -> stores, authenticator, messaging, presence, bridge, broker. Used by the CLI and the tests."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypedDict

from bridge.clock import Clock
from bridge.cluster.groups import SWEEP_S as GROUP_SWEEP_S
from bridge.cluster.groups import ClusterGroups
from bridge.cluster.messaging import ClusterMessaging
from bridge.cluster.nodes import Nudge, NudgeKind
from bridge.cluster.presence import ClusterPresence
from bridge.cluster.rules import ClusterRules
from bridge.directory import Directory
from bridge.groups.core import GroupLimits
from bridge.groups.service import GroupService
from bridge.keys.core import KeyedDevices
from bridge.keys.service import ClaimLimit, KeyService, LocalClaimLimit, StagedDevices
from bridge.limits import RateLimiter, RecentIds
from bridge.links import LinkRegistry
from bridge.messaging.group_receipts import GroupReceipts
from bridge.messaging.groups import GroupStaging
from bridge.messaging.records import Rules
from bridge.messaging.service import Messaging
from bridge.messaging.store import GroupReceiptStore
from bridge.presence.core import PresenceCore, PresenceRules
from bridge.presence.service import PresenceService
from bridge.push.cluster import ClusterPush
from bridge.push.service import PushService
from bridge.push.service import unsupported_ops as push_unsupported_ops
from bridge.requests import build_ops
from bridge.router import Bridge
from bridge.store import StoreError
from broker.auth import Authenticator
from broker.front import ListenerError
from broker.login_guard import LoginGuard
from broker.login_throttle import LoginThrottle, MemoryThrottle
from broker.mqtt.limits import WireLimits
from broker.server import ChatBroker
from broker.settings import BrokerSettings, ListenerSettings
from chatserver.binds import parse_bind
from chatserver.config import ClusterSettings, Settings, resolve_node_id
from chatserver.data_dir import BrokerLock, make_private
from chatserver.http import HttpServer, ops_app
from chatserver.media import AlsoMedia, MediaParts
from chatserver.metrics import LoopLag, Sources, StagingFigures, build_registry
from chatserver.push import open_cluster_push, open_push
from chatserver.supervisor import Supervisor
from storage.sqlite.groups import SqliteGroupStore
from storage.sqlite.keys import SqliteKeyStore
from storage.sqlite.messages import SqliteMessageStore
from storage.sqlite.presence import SqlitePresenceStore
from storage.sqlite.push import SqlitePushStore
from storage.sqlite.users import SqliteUserStore, load_or_create_secret

if TYPE_CHECKING:  # redis-py is imported in cluster mode only (one process on SQLite never loads it)
    from chatserver.cluster import ClusterStores
    from storage.redis.keys import RedisKeyStore
    from storage.redis.users import RedisUserStore

log = logging.getLogger(__name__)

PROBE_WAIT_S = 1.0  # /readyz answers within this (the listener's own deadline is longer)
PROBE_END_S = 6.0  # longer than SQLite's busy_timeout (5 s, storage/sqlite/db.py): a probe always ends by then


class DeliveryTerms(TypedDict):
    """What one node on SQLite and a cluster node read alike from the settings."""

    ttl_ms: int
    window: int
    redeliver_after_s: float
    max_queue: int
    dedup_window_ms: int
    require_encryption: bool


def delivery_terms(settings: Settings) -> DeliveryTerms:
    return DeliveryTerms(ttl_ms=int(settings.staging.ttl_days * 86_400_000), window=settings.delivery.window,
                         redeliver_after_s=settings.delivery.redeliver_after_s, max_queue=settings.delivery.max_queue,
                         dedup_window_ms=int(settings.dedup.window_s * 1000),
                         require_encryption=settings.limits.require_encryption)


def broker_settings(settings: Settings) -> BrokerSettings:
    """What the broker needs of the validated config (the broker does not read the config itself)."""
    mqtt, limits, lst = settings.mqtt, settings.limits, settings.listeners
    listeners = tuple(
        ListenerSettings(name, bind, *parse_bind(bind), conf.max_connections, certfile, keyfile, lst.reuse_port,
                         conf.proxy_protocol, conf.forwarded_for, lst.backlog)
        for name, conf, certfile, keyfile in (
            ("tcp", lst.tcp, None, None),
            ("tls", lst.tls, lst.tls.certfile, lst.tls.keyfile),
            ("ws", lst.ws, None, None),
            ("wss", lst.wss, lst.wss.certfile, lst.wss.keyfile),
        )
        if (bind := conf.bind) is not None
    )
    wire = WireLimits(mqtt.max_packet_bytes, mqtt.keepalive_min_s, mqtt.keepalive_max_s, limits.publishes_per_s,
                      limits.publish_burst, mqtt.max_connect_bytes, mqtt.packet_deadline_s)
    return BrokerSettings(
        listeners, wire, mqtt.max_queued_messages, mqtt.allow_anonymous, tuple(mqtt.acl), tuple(mqtt.anonymous_acl),
        limits.max_unauthenticated_per_address, limits.connect_timeout_s, limits.max_unacked_downlinks,
        tuple(lst.trusted_proxies), mqtt.lean_sessions, limits.max_unread_downlink_bytes,
    )


class BrokerApp:
    """One running chat broker. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._users: SqliteUserStore | RedisUserStore | None = None
        self._cluster: ClusterStores | None = None  # cluster mode: the Redis stores and the node bus
        self.node_id = ""  # cluster mode: this node's name among the live nodes
        self._staging_store: SqliteMessageStore | None = None
        self._presence_store: SqlitePresenceStore | None = None
        self._key_store: SqliteKeyStore | None = None
        self._group_store: SqliteGroupStore | None = None
        self._groups: GroupService | ClusterGroups | None = None
        self._presence: PresenceService | ClusterPresence | None = None
        self.push: PushService | ClusterPush | None = None  # push.enabled
        self._push_store: SqlitePushStore | None = None
        self.media: MediaParts | None = None  # media.bind
        self._broker: ChatBroker | None = None
        self._ops: HttpServer | None = None
        self._lag: LoopLag | None = None
        self._probe: asyncio.Future[None] | None = None
        self._probe_started = 0.0
        self._lock: BrokerLock | None = None
        self.clock = Clock()  # the one clock every service reads
        self.supervisor = Supervisor(self.clock.monotonic)  # every background task reports here (/readyz, metrics)

    @property
    def broker(self) -> ChatBroker:
        if self._broker is None:
            raise RuntimeError("the broker is not started")
        return self._broker

    @property
    def presence(self) -> PresenceService | ClusterPresence:
        if self._presence is None:
            raise RuntimeError("the broker is not started")
        return self._presence

    @property
    def users(self) -> SqliteUserStore | RedisUserStore:
        if self._users is None:
            raise RuntimeError("the broker is not started")
        return self._users

    async def start(self) -> None:
        settings = self.settings
        users: SqliteUserStore | RedisUserStore
        keys: SqliteKeyStore | RedisKeyStore
        messaging: Messaging | ClusterMessaging
        presence: PresenceService | ClusterPresence
        try:
            if settings.cluster is None:
                users, keys, secret = await self._open_files()
            else:
                users, keys, secret = await self._open_cluster(settings.cluster)
            auth = settings.auth
            guard = LoginGuard(auth.free_failures, auth.base_delay_s, auth.max_delay_s, auth.forget_after_s)
            throttle: LoginThrottle = MemoryThrottle(guard)
            clock = self.clock.monotonic
            if self._cluster is not None and settings.cluster is not None:  # shared counts, one (wall) clock
                from storage.redis.throttle import RedisLoginThrottle  # noqa: PLC0415 (redis-py only in cluster mode)

                # The node's own guard judges while Redis fails (docs/SECURITY.md).
                throttle = RedisLoginThrottle(self._cluster.client, settings.cluster.key_prefix, guard,
                                              auth.free_failures, auth.base_delay_s, auth.max_delay_s,
                                              auth.forget_after_s, settings.cluster.retry_s)
                clock = functools.partial(_seconds, self.clock.wall_ms)
            authenticator = Authenticator(
                users,
                throttle,
                secret,
                auth.hash_concurrency,
                clock=clock,
                max_devices=settings.limits.max_devices_per_user,
            )
            if self._cluster is None:
                messaging, presence, keyed = await self._start_single_services()
            else:
                messaging, presence, keyed = await self._start_cluster_services(self._cluster)
            assert self._groups is not None
            key_service = self._key_service(keys, keyed, users, messaging,
                                            await self._start_media(authenticator, messaging))
            push_ops = self.push.ops() if self.push is not None else push_unsupported_ops()
            ops = {**build_ops(authenticator, self.clock), **presence.ops(), **key_service.ops(), **self._groups.ops(),
                   **push_ops}
            bridge = Bridge(messaging.links, ops, messaging, presence, settings.limits.max_request_bytes)
            self._broker = ChatBroker(broker_settings(settings), authenticator, bridge)
            if settings.metrics.bind is not None:  # bound first: a busy port fails before MQTT is served
                await self._start_ops(settings.metrics.bind, authenticator, messaging.staging, messaging.links)
            await self._broker.start()
        except BaseException:
            await self._stop_ops()
            await self._close_media()
            if self._presence is not None:
                await self._presence.close()
            await self._close_groups()
            await self._close_push()
            await self._close_stores()
            self._broker = None
            raise

    def _key_service(self, keys: SqliteKeyStore | RedisKeyStore, keyed: KeyedDevices,
                     users: SqliteUserStore | RedisUserStore, messaging: Messaging | ClusterMessaging,
                     removals: StagedDevices) -> KeyService:
        """The key directory; ``removals`` is told of removed devices (messaging, and media if on)."""
        limits = self.settings.limits
        claim_rate, claim_burst = limits.claims_per_peer_per_min / 60, limits.claims_per_peer_burst
        if isinstance(messaging, ClusterMessaging):  # limits and removals reach every node
            claims: ClaimLimit = messaging.claim_limit(claim_rate, claim_burst)
            close_device = messaging.close_device
        else:
            claims = LocalClaimLimit(RateLimiter(claim_rate, claim_burst, limits.max_rate_keys), self.clock)
            close_device = self._close_session
        # Senders learn preview keys with device keys when push previews are on.
        previews = self.push if self.push is not None and self.push.include_preview else None
        return KeyService(keys, keyed, users, removals, close_device, claims, previews)

    async def _open_files(self) -> tuple[SqliteUserStore, SqliteKeyStore, bytes]:
        """One process on SQLite files in ``data_dir`` (the embedded default)."""
        settings = self.settings
        # First: a second broker on the same folder would restore and deliver the same staged items.
        self._lock = BrokerLock.acquire(settings.data_path)
        make_private(settings.data_path)
        self._users = await SqliteUserStore.open(settings.data_path)
        self._staging_store = await SqliteMessageStore.open(settings.data_path)
        self._presence_store = await SqlitePresenceStore.open(settings.data_path)
        self._key_store = await SqliteKeyStore.open(settings.data_path)
        self._group_store = await SqliteGroupStore.open(settings.data_path)
        return self._users, self._key_store, load_or_create_secret(settings.data_path)

    async def _open_cluster(self, cluster: ClusterSettings) -> tuple[RedisUserStore, RedisKeyStore, bytes]:
        """A node of a cluster: every store in the Redis Cluster, shared with the other nodes."""
        self.node_id = resolve_node_id(cluster, self.settings.listeners.tcp.bind, socket.gethostname(),
                                       secrets.token_hex(3))
        from chatserver.cluster import ClusterStores  # noqa: PLC0415 (redis-py only in cluster mode)

        stores = self._cluster = await ClusterStores.open(cluster, self.node_id, self.settings.dedup.max_entries)
        self._users = stores.users
        return stores.users, stores.keys, await stores.users.server_secret()

    async def _start_single_services(self) -> tuple[Messaging, PresenceService, KeyedDevices]:
        users, key_store = self.users, self._key_store
        assert isinstance(users, SqliteUserStore) and key_store is not None and self._staging_store is not None
        assert self._presence_store is not None
        removed = await self._forget_removed_devices(users, key_store)
        keyed = KeyedDevices(await key_store.keyed_devices())
        messaging = await self._start_messaging(users, self._staging_store, keyed)
        for user, device in removed:
            messaging.remove_device(user, device)
        await self._start_groups(messaging, self._staging_store)
        if self.settings.push.enabled:
            devices = [f"{user}.{device}" for user, device in await users.all_devices() if device is not None]
            self.push, self._push_store = await open_push(self.settings.push, self.settings.data_path, devices,
                                                          messaging.links, messaging.staging, clock=self.clock,
                                                          supervisor=self.supervisor)
            messaging.watch = self.push
        presence = PresenceService(self._presence_core(), self._presence_store, messaging.links,
                                   self.settings.presence.persist_s, clock=self.clock, supervisor=self.supervisor)
        self._presence = presence
        await presence.start()
        return messaging, presence, keyed

    async def _start_cluster_services(self, stores: ClusterStores) -> tuple[ClusterMessaging, ClusterPresence,
                                                                            KeyedDevices]:
        settings = self.settings
        cluster = settings.cluster
        assert cluster is not None
        rules = ClusterRules(
            **delivery_terms(settings),
            send_rate_per_s=settings.limits.send_rate_per_s,
            send_burst=settings.limits.send_burst,
            max_body_bytes=settings.limits.max_body_bytes,
            max_devices_per_message=settings.limits.max_devices_per_message,
            sweep_s=settings.staging.sweep_s,
            poll_s=cluster.poll_s,
            max_lane=cluster.max_waiting_uplinks,
            flush_ms=settings.staging.flush_ms,
        )
        links = LinkRegistry()
        messaging = ClusterMessaging(rules, stores.queues, stores.bus, stores.users, stores.keys, links,
                                     self._close_session, clock=self.clock, supervisor=self.supervisor)
        presence = ClusterPresence(self._presence_core(), stores.presence, links, stores.bus, clock=self.clock,
                                   supervisor=self.supervisor)
        self._presence = presence

        def on_nudge(nudge: Nudge) -> None:
            if nudge.kind == NudgeKind.PRESENCE:
                presence.on_nudge(nudge)
            else:
                messaging.on_nudge(nudge)

        groups = ClusterGroups(messaging, stores.groups, stores.queues, stores.users, self._group_limits(),
                               clock=self.clock, supervisor=self.supervisor,
                               sweep_s=min(settings.staging.sweep_s, GROUP_SWEEP_S),
                               seen_receipts=settings.groups.seen_receipts,
                               max_tracked=settings.groups.max_tracked_per_user)
        messaging.groups = groups
        self._groups = groups
        if settings.push.enabled:
            self.push = await open_cluster_push(settings.push, stores.push, links, stores.bus.locate,
                                                stores.queues.depth, clock=self.clock, supervisor=self.supervisor)
            messaging.watch = self.push
        await stores.bus.start(on_nudge)
        await messaging.start()
        await groups.start()
        await presence.start()
        # Olm checks read the key store per message here (another node may have taken a publish):
        # the key service's in-memory copy is not used by cluster messaging.
        return messaging, presence, KeyedDevices()

    def _presence_core(self) -> PresenceCore:
        config = self.settings.presence
        return PresenceCore(PresenceRules(
            online_window_ms=int(config.online_window_s * 1000),
            coalesce_ms=config.coalesce_ms,
            max_contacts=config.max_contacts,
            max_watched=config.max_watched,
        ))

    @staticmethod
    async def _forget_removed_devices(users: SqliteUserStore, keys: SqliteKeyStore) -> list[tuple[str, str]]:
        """Devices with keys but no row in users.db: ``chat-broker device remove`` (or ``user del``)
        ran. It only deletes the row, because a running broker keeps each keyed device in memory
        and would refuse messages that leave it out; the rest of the removal is done here."""
        known = {(user, device) for user, device in await users.all_devices() if device is not None}
        removed = [(user, device) for user, device, _ in await keys.keyed_devices() if (user, device) not in known]
        for user, device in removed:
            await keys.remove_device(user, device)
            log.info("device %s.%s is gone from users.db (device remove, user del): its keys and staged items "
                     "are dropped", user, device)
        return removed

    async def _close_session(self, client_id: str) -> None:
        if self._broker is not None:
            await self._broker.close_session(client_id)

    async def _start_messaging(self, users: SqliteUserStore, store: SqliteMessageStore,
                               keyed: KeyedDevices) -> Messaging:
        settings = self.settings
        rules = Rules(flush_s=settings.staging.flush_ms / 1000, **delivery_terms(settings))
        directory = Directory()
        directory.load(await users.all_devices())
        staging = GroupStaging(
            rules, await store.next_boot(), directory,
            RateLimiter(settings.limits.send_rate_per_s, settings.limits.send_burst, settings.limits.max_rate_keys),
            RecentIds(settings.dedup.max_entries),
            keyed,
            GroupReceipts(settings.groups.seen_receipts, settings.groups.max_tracked_per_user),
        )
        messages, items, remembered = await store.load(self.clock.wall_ms())
        staging.restore(messages, items)
        staging.remember_ids(remembered)
        receipt_store: GroupReceiptStore = store  # its writes ride in the commits (FlushBatch.receipts)
        staging.restore_receipts(await receipt_store.group_receipts(), self.clock.wall_ms())
        log.info("staging: %d message(s), %d item(s), %d tracked group message(s) restored", len(messages),
                 len(items), len(staging.receipts))
        links = LinkRegistry(staging.counters)
        messaging = Messaging(staging, store, links, users, settings.limits.max_body_bytes,
                              settings.staging.checkpoint_idle_s, settings.staging.sweep_s,
                              settings.limits.max_devices_per_message, clock=self.clock, supervisor=self.supervisor)
        await messaging.start()
        return messaging

    async def _start_groups(self, messaging: Messaging, staging_store: SqliteMessageStore) -> None:
        """Groups on one process: their requests, and group messages through messaging (PROTOCOL section 11)."""
        assert self._group_store is not None
        settings = self.settings
        groups = GroupService(self._group_store, messaging.staging, self.users, self._group_limits(),
                              messaging.carry_out, settings.staging.sweep_s, clock=self.clock,
                              supervisor=self.supervisor)
        await groups.start(await staging_store.group_gseqs())
        messaging.groups = groups
        self._groups = groups

    def _group_limits(self) -> GroupLimits:
        return GroupLimits(self.settings.limits.max_group_members, self.settings.limits.max_groups_per_user)

    async def _close_groups(self) -> None:
        if self._groups is not None:
            await self._groups.close()
            self._groups = None

    async def _start_media(self, authenticator: Authenticator, messaging: StagedDevices) -> StagedDevices:
        """The media endpoint if ``media.bind`` is set (in cluster mode its records in Redis, its bytes in
        S3: the config refuses another backend); what ``devices.remove`` must reach."""
        users, groups, media, cluster = self._users, self._groups, self.settings.media, self._cluster
        if media.bind is None or users is None:
            return messaging
        if cluster is not None:
            async def members(group: str) -> tuple[str, ...]:
                found = await cluster.groups.load(group)
                return found.members if found is not None else ()

            self.media = await MediaParts.open(media, self.settings.data_path, authenticator, users, members, set(),
                                               clock=self.clock, supervisor=self.supervisor, shared=cluster.media)
            return AlsoMedia(messaging, self.media.service)
        assert isinstance(users, SqliteUserStore) and isinstance(groups, GroupService)
        devices = {f"{user}.{device}" for user, device in await users.all_devices() if device is not None}

        async def settled(group: str) -> tuple[str, ...]:
            async with groups.settled(group) as found:
                return found

        self.media = await MediaParts.open(media, self.settings.data_path, authenticator, users, settled, devices,
                                           clock=self.clock, supervisor=self.supervisor)
        return AlsoMedia(messaging, self.media.service)

    async def _close_media(self) -> None:
        if self.media is not None:
            await self.media.close()
            self.media = None

    async def _close_push(self) -> None:
        """After the broker: what the last hooks queued is written before the store closes."""
        if self.push is not None:
            await self.push.close()
            self.push = None
        if self._push_store is not None:
            await self._push_store.close()
            self._push_store = None

    async def _start_ops(self, bind: str, authenticator: Authenticator, staging: StagingFigures,
                         links: LinkRegistry) -> None:
        self._lag = LoopLag()
        registry = build_registry(Sources(self.broker, authenticator, staging, links, self._lag,
                                          self.supervisor, self.clock.wall_ms, self.node_id, self.push,
                                          self.media.service if self.media is not None else None))
        ops = HttpServer(ops_app(registry, self.readiness), bind)
        try:
            await ops.start()
        except OSError as exc:
            raise ListenerError(f"metrics.bind: cannot listen on {bind}: {exc.strerror or exc}") from None
        self._ops = ops
        self._lag.start(self.supervisor)
        log.info("metrics: http://%s:%d/metrics (and /healthz, /readyz)", *ops.address)

    async def _stop_ops(self) -> None:
        if self._ops is not None:
            await self._ops.close()
            self._ops = None
        if self._probe is not None:  # let a pending probe end before its store is closed
            await asyncio.wait({self._probe}, timeout=PROBE_END_S)
            self._probe = None
        if self._lag is not None:
            await self._lag.stop()
            self._lag = None

    async def readiness(self) -> list[str]:
        """What keeps the broker from serving now (empty: ready): listeners, a write to the staging store,
        and background tasks that are failing."""
        broker = self._broker
        probe = self._staging_store.probe if self._staging_store is not None else None
        if self._cluster is not None:
            probe = functools.partial(self._cluster.probe_store.probe, self.node_id)
        if broker is None or probe is None:
            return ["not started"]
        serving = broker.listeners_serving()
        problems = [f"listener {name} is not accepting" for name, ok in serving.items() if not ok]
        if not serving:
            problems.append("no MQTT listener is open")
        problem = await self._probe_store(probe)
        return problems + ([problem] if problem else []) + self.supervisor.problems()

    async def _probe_store(self, probe: Callable[[], Awaitable[None]]) -> str | None:
        # One probe at a time, never cancelled: a write cancelled while SQLite still runs it
        # could leave the connection inside a transaction. A probe still waiting (the write
        # lock is held elsewhere, the disk hangs) is reported and awaited again next time.
        task = self._probe
        if task is None or task.done():
            task = self._probe = asyncio.ensure_future(probe())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read below, or never: no warning
            self._probe_started = self.clock.monotonic()
        done, _ = await asyncio.wait({task}, timeout=PROBE_WAIT_S)
        if not done:
            waited = self.clock.monotonic() - self._probe_started
            return f"a write to the staging store has been waiting for {waited:.0f}s"
        exc = task.exception()
        if isinstance(exc, StoreError):
            return f"the staging store cannot be written ({exc})"
        if exc is not None:
            return f"the staging store probe failed: {exc!r}"
        return None

    def addresses(self) -> dict[str, tuple[str, int]]:
        addresses = self.broker.bound_addresses()
        if self._ops is not None:
            addresses["metrics"] = self._ops.address
        if self.media is not None:
            addresses["media"] = self.media.server.address
        return addresses

    async def stop(self) -> None:
        """Stop accepting, close every session, write what is staged in memory, close the stores."""
        await self._stop_ops()
        await self._close_media()
        try:
            if self._broker is not None:
                await self._broker.shutdown()
        finally:  # the stores' threads would keep the process alive after "stopped"
            self._broker = None
            await self._close_groups()
            await self._close_push()
            await self._close_stores()

    async def _close_stores(self) -> None:
        if self._cluster is not None:  # its stores share one client, closed with it
            await self._cluster.close()
            self._cluster = None
            self._users = None
        for store in (self._group_store, self._key_store, self._presence_store, self._staging_store, self._users):
            if store is not None:
                await store.close()
        self._group_store = None
        self._key_store = None
        self._presence_store = None
        self._presence = None
        self._staging_store = None
        self._users = None
        if self._lock is not None:  # last: the stores are closed, another broker may start
            self._lock.release()
            self._lock = None


def _seconds(wall_ms: Callable[[], int]) -> float:
    return wall_ms() / 1000
