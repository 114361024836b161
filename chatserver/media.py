"""Wiring of media (docs/MEDIA.md): the blob store of ``media.backend``, the records (``media.db``,
or in cluster mode the Redis store the app passes), the service and its HTTP listener on
``media.bind``. ``MediaParts.open`` builds and starts them all (or nothing); ``close`` stops them in
reverse order.

The s3 backend's module (``storage.media.s3``) is imported by name only when configured; it provides
``async open_store(settings: dict[str, object], staging: LocalBlobStore, shared: bool) -> BlobStore``
(``shared``: uploads staged in the bucket, for cluster mode).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from bridge.background import Supervisor
from bridge.clock import Clock
from bridge.cluster.media import ClusterMediaService, SharedMediaStore
from bridge.keys.service import StagedDevices
from bridge.media.blobs import BlobStore
from bridge.media.core import MediaLimits
from bridge.media.service import MediaService, Members
from bridge.messaging.store import UserLookup
from broker.auth import Authenticator
from broker.front import ListenerError, tls_context
from chatserver.config import ConfigError
from chatserver.http import HttpServer
from chatserver.media_config import MediaSettings
from chatserver.media_http import media_app
from storage.media.local import LocalBlobStore
from storage.sqlite.media import SqliteMediaStore

log = logging.getLogger(__name__)

MEDIA_DIR = "media"
S3_MODULE = "storage.media.s3"


def media_limits(settings: MediaSettings) -> MediaLimits:
    return MediaLimits(max_bytes=settings.max_bytes, chunk_max=settings.chunk_max_bytes,
                       quota_bytes=settings.quota_bytes, max_uploads=settings.max_uploads,
                       upload_ttl_ms=int(settings.upload_ttl_s * 1000), ttl_ms=int(settings.ttl_days * 86_400_000),
                       min_charge=settings.min_charge_bytes, uploads_per_minute=settings.uploads_per_minute,
                       uploads_burst=settings.uploads_burst)


async def open_blobs(settings: MediaSettings, data_dir: Path, shared: bool = False) -> BlobStore:
    """``shared`` (cluster mode): uploads staged in the bucket too, so that any node resumes them."""
    local = LocalBlobStore(data_dir / MEDIA_DIR)
    if settings.backend == "local" or settings.s3 is None:
        return local
    try:
        module = importlib.import_module(S3_MODULE)
    except ImportError as exc:
        raise ConfigError(f"media.backend is s3 but {S3_MODULE} cannot be imported ({exc})") from None
    try:
        store: BlobStore = await module.open_store(settings.s3.model_dump(), local, shared)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"media.s3: {exc}") from None
    return store


class AlsoMedia:
    """``devices.remove`` reaches the media service too (the key service calls ``remove_device``)."""

    def __init__(self, staged: StagedDevices, media: MediaService) -> None:
        self._staged = staged
        self._media = media

    def remove_device(self, user: str, device: str) -> None:
        self._staged.remove_device(user, device)
        self._media.remove_device(user, device)


class MediaParts:
    def __init__(self, service: MediaService, store: SqliteMediaStore | None, blobs: BlobStore,
                 server: HttpServer) -> None:
        self.service = service
        self._store = store
        self._blobs = blobs
        self.server = server

    @classmethod
    async def open(cls, settings: MediaSettings, data_dir: Path, authenticator: Authenticator, users: UserLookup,
                   members: Members, devices: set[str], *, clock: Clock, supervisor: Supervisor,
                   shared: SharedMediaStore | None = None) -> MediaParts:
        """Started: the service (``devices``: every client id users.db knows) and its listener. ``shared``
        (cluster mode): the records in Redis (the app's client; not closed here), blobs and stagings in S3."""
        assert settings.bind is not None
        tls = None
        if settings.certfile is not None:
            tls = tls_context("media", settings.certfile, settings.keyfile, section="media")
        async with _closing_on_error() as stack:
            blobs = await open_blobs(settings, data_dir, shared=shared is not None)
            stack.push_async_callback(blobs.close)
            limits = media_limits(settings)
            own: SqliteMediaStore | None = None
            if shared is None:
                own = await SqliteMediaStore.open(data_dir)
                stack.push_async_callback(own.close)
                service = MediaService(own, blobs, users, members, limits, settings.sweep_s, clock=clock,
                                       supervisor=supervisor)
            else:
                service = ClusterMediaService(shared, blobs, users, members, limits, settings.sweep_s, clock=clock,
                                              supervisor=supervisor)
            await service.start(devices)
            stack.push_async_callback(service.close)
            app = media_app(service, authenticator.device_token_ok, settings.public_cache, settings.idle_timeout_s)
            server = HttpServer(app, settings.bind, tls, idle_s=settings.idle_timeout_s,
                                max_connections=settings.max_connections)
            try:
                await server.start()
            except OSError as exc:
                raise ListenerError(f"media.bind: cannot listen on {settings.bind}: {exc.strerror or exc}") from None
            host, port = server.address
            log.info("media: %s://%s:%d/v1/media (%s backend)", "https" if tls else "http", host, port,
                     settings.backend)
        return cls(service, own, blobs, server)

    async def close(self) -> None:
        await self.server.close()
        await self.service.close()
        if self._store is not None:
            await self._store.close()
        await self._blobs.close()


@contextlib.asynccontextmanager
async def _closing_on_error() -> AsyncIterator[contextlib.AsyncExitStack]:
    """An exit stack that runs its callbacks only if the block fails (what was opened is closed)."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack
        stack.pop_all()
