"""The ``media:`` section of the config (docs/MEDIA.md): the media HTTP endpoint, its limits, and
where the blobs are kept (``backend``: a folder of the data directory, or S3-compatible storage)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatserver.binds import Bind

MiB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class S3Settings(_Section):
    """S3-compatible object storage (storage/media/s3.py); uploads are staged in the data directory
    (one process) or in the bucket (cluster mode)."""

    endpoint_url: str | None = None
    """Instead of AWS's endpoint for ``region`` (MinIO, Ceph, a test server)."""
    bucket: str = Field(min_length=1)
    region: str | None = None
    access_key_id: str | None = None
    """With ``secret_access_key_file``; both unset: the SDK's default credentials (environment, role)."""
    secret_access_key_file: str | None = None
    """A file holding the secret key (read at start, never logged)."""
    prefix: str = ""
    """Put before every object key (``blobs/<sha256>``), e.g. ``chat/``."""
    verify: bool | str = True
    """TLS verification of ``endpoint_url``: true (the system's CAs), false, or a CA bundle's path."""
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    """``path`` for a server reached by host name without virtual-host buckets (most MinIO set-ups)."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Connect and read timeout of one S3 request (botocore retries it up to 3 times)."""

    @model_validator(mode="after")
    def _check(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key_file is None):
            raise ValueError("media.s3: access_key_id and secret_access_key_file go together")
        return self


class MediaSettings(_Section):
    """Encrypted attachments over HTTP (docs/MEDIA.md). In cluster mode only with ``backend: s3``
    (checked by ``Settings``: every node must reach every blob and staged upload)."""

    bind: Bind = None
    """``HOST:PORT`` of the media endpoint; off when unset."""
    certfile: str | None = None
    """With ``keyfile``: serve HTTPS (as the tls listener does); else plain HTTP behind a TLS proxy."""
    keyfile: str | None = None
    max_bytes: int = Field(default=2048 * MiB, ge=1)
    """Largest blob (ciphertext bytes); a larger upload is refused at its creation (``too_large``)."""
    chunk_max_bytes: int = Field(default=8 * MiB, ge=1)
    """Largest PATCH body: what a client may have to send again after a cut."""
    quota_bytes: int = Field(default=10 * 1024 * MiB, ge=1)
    """Bytes a user may have stored (blobs not fetched by every recipient yet, uploads in progress)."""
    max_uploads: int = Field(default=4, ge=1)
    """Uploads in progress per user; one more is refused (``rate_limited``)."""
    min_charge_bytes: int = Field(default=64 * 1024, ge=0)
    """Every upload and blob is charged at least this much of ``quota_bytes``: a tiny file costs a
    record and a file all the same, so a quota of Q holds at most Q / min_charge_bytes of them."""
    uploads_per_minute: float = Field(default=60.0, gt=0)
    """Uploads a user may create per minute once ``uploads_burst`` is used; more are refused
    (``rate_limited``, ``Retry-After``)."""
    uploads_burst: int = Field(default=30, ge=1)
    """Uploads a user may create back to back (an album) before ``uploads_per_minute`` applies."""
    upload_ttl_s: float = Field(default=86_400.0, gt=0)
    """An upload with no PATCH for this long is abandoned: its bytes are dropped, its quota freed."""
    ttl_days: float = Field(default=30.0, gt=0)
    """A blob is deleted this long after its upload even if some recipient never fetched it."""
    idle_timeout_s: float = Field(default=30.0, gt=0)
    """A connection waiting this long for a request head, or a body or download making no progress
    for this long, is closed (what was stored of a PATCH is kept: GET the upload to resume)."""
    max_connections: int = Field(default=1024, ge=1)
    """Connections open at once on the media endpoint; one more is closed at once."""
    public_cache: bool = False
    """``Cache-Control: public`` on downloads, so a shared cache (CDN) may keep blobs (docs/MEDIA.md)."""
    sweep_s: float = Field(default=60.0, gt=0)
    """How often expired blobs and abandoned uploads are looked for."""
    backend: Literal["local", "s3"] = "local"
    """Where blobs are kept: ``local`` (``<data_dir>/media``) or ``s3`` (the ``s3:`` sub-section)."""
    s3: S3Settings | None = None

    @model_validator(mode="after")
    def _check(self) -> MediaSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("media: certfile and keyfile go together (both for HTTPS, neither for HTTP)")
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("media.backend is s3: the media.s3 section (bucket, ...) is required")
        if self.chunk_max_bytes > self.max_bytes:
            raise ValueError("media.chunk_max_bytes must be at most media.max_bytes")
        return self
