"""``ClientOptions``: the settings of a client, their defaults and their checks, in one place.

``Client`` and ``AsyncClient`` take them as keyword arguments (``Client("alice",
"pw", device="phone", port=1883)``, typed by ``ClientSettings``), as an object
(``Client("alice", "pw", options=ClientOptions(device="phone"))``), or both: the
keywords then override the object's fields. See docs/SDK.md, *Options*.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass
from typing import Final, Literal, TypedDict
from urllib.parse import urlsplit

from client_sdk.presence import DEFAULT_HEARTBEAT_INTERVAL_S

Transport = Literal["tcp", "websockets"]
TRANSPORTS: Final = ("tcp", "websockets")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How one client connects, stores and retries; every field has a default.

    Raises ValueError for a value no client could run with.
    """

    device: str = "default"
    """This device's id (1-32 of ``[A-Za-z0-9_-]``; checked with the user id, ``IdentifierRejected``)."""
    host: str = "127.0.0.1"
    port: int = 1883
    store: str | os.PathLike[str] | None = None
    """Path of the local SQLite file; None keeps everything in memory (nothing survives)."""
    keepalive: int = 60
    """MQTT keepalive, seconds."""
    resend_interval: float = 10.0
    """Seconds before a message without ``sent`` is published again."""
    tls: ssl.SSLContext | None = None
    """An ``ssl.SSLContext`` for TLS listeners."""
    transport: Transport = "tcp"
    """``"websockets"`` for MQTT over WebSocket (path ``/mqtt``)."""
    reconnect_delay: tuple[float, float] = (0.5, 30.0)
    """(first, longest) wait between reconnect attempts, seconds."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S
    """Seconds between heartbeats while in the foreground; keep it well under the server's
    ``presence.online_window_s``."""
    encryption: bool = True
    """End-to-end encryption; False sends plain messages, and encrypted ones arrive as ``Undecryptable``."""
    store_secret: str | bytes | None = None
    """The secret the local store is sealed with (docs/SECURITY.md); None keeps a random key in
    ``<store>.key`` beside the store file."""
    hold_retry: tuple[float, float] = (2.0, 120.0)
    """(first, longest) wait between checks whether a recipient without keys has a device now."""
    media_url: str | None = None
    """The server's media endpoint, ``http(s)://host:port`` (its ``media.bind``); None: no media."""
    media_tls: ssl.SSLContext | None = None
    """Verifies an ``https`` media endpoint (None: the system's CAs), like ``tls`` for MQTT."""
    media_timeout: float = 30.0
    """Seconds a media request may wait for the server before it counts as cut (and is retried)."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        if self.media_url is not None and urlsplit(self.media_url).scheme not in ("http", "https"):
            raise ValueError(f"media_url must start http:// or https://, not {self.media_url!r}")
        if self.media_timeout <= 0:
            raise ValueError("media_timeout must be positive")
        for name in ("reconnect_delay", "hold_retry"):
            first, longest = getattr(self, name)
            if not 0 < first <= longest:
                raise ValueError(f"{name} must be (first, longest) with 0 < first <= longest")

    @classmethod
    def of(cls, options: ClientOptions | None, settings: ClientSettings) -> ClientOptions:
        """``options`` (or the defaults) with the keyword ``settings`` put over it."""
        if options is None:
            return cls(**settings)
        if not isinstance(options, ClientOptions):  # the third positional argument was the device once
            raise TypeError(f"options must be a ClientOptions, not {type(options).__name__}: "
                            "pass device=, host=, port=, store= as keywords")
        return dataclasses.replace(options, **settings) if settings else options


class ClientSettings(TypedDict, total=False):
    """The fields of ``ClientOptions`` as keyword arguments (for ``**settings: Unpack[ClientSettings]``)."""

    device: str
    host: str
    port: int
    store: str | os.PathLike[str] | None
    keepalive: int
    resend_interval: float
    tls: ssl.SSLContext | None
    transport: Transport
    reconnect_delay: tuple[float, float]
    heartbeat_interval: float
    encryption: bool
    store_secret: str | bytes | None
    hold_retry: tuple[float, float]
    media_url: str | None
    media_tls: ssl.SSLContext | None
    media_timeout: float
