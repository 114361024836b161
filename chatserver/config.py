"""Broker settings: one typed tree, loaded from YAML, with the embedded defaults.

Every key is checked (unknown keys and wrong types are refused with the key's
dotted path), so a typo in a config file fails loudly instead of silently
running on a default. pydantic does the checking; ``ConfigError`` carries a
one-line message for the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.messaging.group_receipts import DEFAULT_MAX_PER_SENDER, DEFAULT_SEEN_MAX
from chatproto import (
    DEFAULT_MAX_DEVICES_PER_MESSAGE,
    DEFAULT_MAX_GROUP_MEMBERS,
    DEFAULT_MAX_GROUPS_PER_USER,
    chat_envelope_bytes,
)
from chatserver.binds import Bind, parse_bind
from chatserver.media_config import MediaSettings
from chatserver.push_config import PushSettings

DEFAULT_MAX_DEVICES_PER_USER = 16


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is a one-line message for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ListenerSettings(_Section):
    bind: Bind = None
    """``HOST:PORT`` to listen on; the listener is off when unset."""
    max_connections: int = Field(default=100_000, ge=0)
    """Connections open at once on this listener; further ones wait to be accepted. 0 means no limit."""
    proxy_protocol: bool = False
    """tcp, tls: behind a TCP load balancer that sends the PROXY protocol (HAProxy ``send-proxy-v2``, nginx
    ``proxy_protocol on``): every connection must come from ``listeners.trusted_proxies`` and start with
    the header, whose client address the broker then uses (limits, login throttle, logs)."""
    forwarded_for: bool = False
    """ws, wss: behind an HTTP proxy: every connection must come from ``listeners.trusted_proxies``, and
    the client is the address X-Forwarded-For names (read from the right, past trusted proxies)."""


class TlsListenerSettings(ListenerSettings):
    certfile: str | None = None
    keyfile: str | None = None


class ListenersSettings(_Section):
    reuse_port: bool = False
    """Bind with SO_REUSEPORT, so several broker processes share the ports and the kernel spreads
    new connections over them (``chat-broker run --workers N`` sets it for its workers)."""
    backlog: int = Field(default=1024, ge=1, le=65535)
    """Connections the kernel queues for each listener before the broker accepts them (``listen()``'s
    backlog, capped by ``net.core.somaxconn``). A full queue drops new SYNs, which clients retry after
    a second: asyncio's default of 100 made a reconnect storm of a few hundred phones wait that second."""
    tcp: ListenerSettings = ListenerSettings(bind="127.0.0.1:1883")
    tls: TlsListenerSettings = TlsListenerSettings()
    ws: ListenerSettings = ListenerSettings()
    """MQTT over WebSocket, served on the path ``/mqtt``."""
    wss: TlsListenerSettings = TlsListenerSettings()
    """MQTT over WebSocket with TLS, path ``/mqtt``."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``, ``127.0.0.1/32``) of the load balancers that may name the
    client (``proxy_protocol``, ``forwarded_for``); a connection from any other address is refused there."""

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _check_proxies(self) -> ListenersSettings:
        for name in ("tcp", "tls", "ws", "wss"):
            listener: ListenerSettings = getattr(self, name)
            wrong = "forwarded_for" if name in ("tcp", "tls") else "proxy_protocol"
            if getattr(listener, wrong):
                right = "proxy_protocol" if wrong == "forwarded_for" else "forwarded_for"
                raise ValueError(f"listeners.{name}.{wrong} does not apply to {name}: use listeners.{name}.{right}")
            if (listener.proxy_protocol or listener.forwarded_for) and not self.trusted_proxies:
                raise ValueError(f"listeners.{name}: behind a proxy, listeners.trusted_proxies must name it")
        return self


class AuthSettings(_Section):
    free_failures: int = Field(default=3, ge=0)
    """Failed logins per user (and per address) allowed before attempts are slowed."""
    base_delay_s: float = Field(default=1.0, gt=0)
    """First enforced wait after ``free_failures``; doubles with each further failure."""
    max_delay_s: float = Field(default=300.0, gt=0)
    """Longest refusal period."""
    forget_after_s: float = Field(default=900.0, gt=0)
    """Failures older than this are forgotten."""
    hash_concurrency: int = Field(default=2, ge=1)
    """Password hashes computed at once (each scrypt uses 16 MiB and ~50 ms of a core)."""


class LimitsSettings(_Section):
    max_body_bytes: int = Field(default=65536, ge=1)
    max_request_bytes: int = Field(default=65536, ge=64)
    """Largest ``u/{me}/req`` payload; a keys.publish of 100 one-time keys needs about 17 KiB."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """A connection must send CONNECT within this time."""
    max_unauthenticated_per_address: int = Field(default=64, ge=0)
    """Connections from one IP address that have not been answered CONNACK yet; one more is closed
    at once (0: no cap). Logged-in connections do not count."""
    send_rate_per_s: float = Field(default=20.0, gt=0)
    """Sustained messages and seen reports per second per user; beyond it senders get ``rate_limited``."""
    send_burst: int = Field(default=200, ge=1)
    """Messages and seen reports a user may send at once before the rate applies."""
    publishes_per_s: float = Field(default=1000.0, ge=0)
    """PUBLISH packets read per second per connection (0: unpaced). Beyond it the broker stops
    reading that connection for a moment (TCP backpressure) instead of spending its CPU on it."""
    publish_burst: int = Field(default=2000, ge=1)
    """PUBLISH packets a connection may send at once before ``publishes_per_s`` applies."""
    claims_per_peer_burst: int = Field(default=20, ge=1)
    """``keys.claim`` requests one user may make for one other user at once (``rate_limited`` beyond)."""
    claims_per_peer_per_min: float = Field(default=2.0, gt=0)
    """... and per minute after that burst: a client claims only when it lacks a session (a new
    device, a reinstall), while each claim uses up one of the peer's one-time keys."""
    max_rate_keys: int = Field(default=100_000, ge=1)
    """Senders (and claimer/peer pairs) each rate limiter keeps track of. Only buckets that are
    full again are forgotten; while all are still limiting, a newcomer is refused (``rate_limited``)
    until one refills, so flooding the table never resets a limit (bridge/limits.py)."""
    max_unacked_downlinks: int = Field(default=8192, ge=1, le=32768)
    """Chat deliveries a connection may leave without PUBACK; beyond, further ones are not written
    (staged items are redelivered later, ephemeral ones are best effort): see broker/downlink.py."""
    max_unread_downlink_bytes: int = Field(default=1024 * 1024, ge=65536)
    """Bytes that may wait for a chat device that does not read (lean path: its socket stopped taking
    them); beyond, further deliveries are not written, as past ``max_unacked_downlinks``: the bound of a
    QoS 0 inbox, which has no PUBACK to count (broker/downlink.py, ``UNREAD_DOWNLINK_MAX``)."""
    max_devices_per_message: int = Field(default=DEFAULT_MAX_DEVICES_PER_MESSAGE, ge=1)
    """Entries allowed in an olm message's ``bodies`` (recipient's plus sender's other devices)."""
    max_devices_per_user: int = Field(default=DEFAULT_MAX_DEVICES_PER_USER, ge=1)
    """Devices one user may have (a device is made by its first login). A new device past it is
    refused at CONNECT (0x05); ``devices.remove`` or ``chat-broker device remove`` frees a slot.
    Never above ``max_devices_per_message``: an olm message must be able to name every device
    (left unset, it is the lower of 16 and that)."""
    require_encryption: bool = False
    """Refuse plain ``body`` messages (``encryption_required``): only olm messages are carried, and to a
    group only type ``megolm`` (docs/PROTOCOL.md section 11)."""
    max_group_members: int = Field(default=DEFAULT_MAX_GROUP_MEMBERS, ge=1)
    """Members of one group (``group_full`` beyond); each group message is staged for every member device."""
    max_groups_per_user: int = Field(default=DEFAULT_MAX_GROUPS_PER_USER, ge=1)
    """Groups one user may be in (``too_many_groups`` beyond)."""


    @model_validator(mode="before")
    @classmethod
    def _default_devices(cls, data: Any) -> Any:
        # Left unset, the device limit follows a lower max_devices_per_message instead of failing
        # a config that was valid before the limit existed.
        if isinstance(data, dict) and "max_devices_per_user" not in data:
            per_message = data.get("max_devices_per_message")
            if isinstance(per_message, int) and 1 <= per_message < DEFAULT_MAX_DEVICES_PER_USER:
                return {**data, "max_devices_per_user": per_message}
        return data

    @model_validator(mode="after")
    def _check_devices(self) -> LimitsSettings:
        if self.max_devices_per_user > self.max_devices_per_message:
            raise ValueError(
                f"max_devices_per_user ({self.max_devices_per_user}) must not exceed "
                f"max_devices_per_message ({self.max_devices_per_message})"
            )
        return self


class StagingSettings(_Section):
    flush_ms: int = Field(default=50, ge=0)
    """An item not acked this long after it was staged is written to disk (group commit); in cluster
    mode, an item for devices all connected to the node is written to Redis only then (0: at once)."""
    ttl_days: float = Field(default=30.0, gt=0)
    """Staged items older than this are deleted; the sender gets ``receipt expired``."""
    sweep_s: float = Field(default=60.0, gt=0)
    """How often expired items are looked for."""
    checkpoint_idle_s: float = Field(default=1.0, gt=0)
    """After deletions, the WAL is checkpointed and truncated once the store is idle this long."""


class DeliverySettings(_Section):
    window: int = Field(default=64, ge=1)
    """Unacked items in flight per device."""
    redeliver_after_s: float = Field(default=30.0, gt=0)
    """An item unacked this long on a live connection is sent again."""
    max_queue: int = Field(default=10000, ge=1)
    """Items staged per device; beyond it senders get ``queue_full``."""


class DedupSettings(_Section):
    window_s: float = Field(default=7 * 86400.0, gt=0)
    """A re-published (from, id) within this time is recognised and answered ``sent`` again."""
    max_entries: int = Field(default=200_000, ge=1)
    """Remembered ids beyond the staged messages; the oldest are forgotten first."""


def chat_packet_bytes(limits: LimitsSettings) -> int:
    """Largest MQTT packet a valid chat uplink can need (the envelope limit of
    ``chatproto.ChatMessage.decode``: body x 6 for JSON escapes + 1 KiB,
    or a request), plus the PUBLISH headers (fixed header, topic, packet id)."""
    return max(chat_envelope_bytes(limits.max_body_bytes), limits.max_request_bytes) + 64


class AclRule(_Section):
    """One line of the generic-topic ACL, as in a mosquitto ACL file."""

    topic: str
    """An MQTT topic filter; ``%u`` stands for the user name, ``%c`` for the client id."""
    access: Literal["read", "write", "readwrite"] = "readwrite"

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        levels = value.split("/")
        if not value or "\x00" in value:
            raise ValueError("must be a non-empty topic filter")
        if any(("#" in level and (level != "#" or i != len(levels) - 1)) for i, level in enumerate(levels)):
            raise ValueError("'#' must be the whole last level [MQTT-4.7.1-2]")
        if any("+" in level and level != "+" for level in levels):
            raise ValueError("'+' must be a whole level [MQTT-4.7.1-3]")
        if levels[0] == "u":
            raise ValueError("u/... topics are the chat protocol's (PROTOCOL.md); no rule can grant them")
        return value


class MqttSettings(_Section):
    """MQTT 3.1.1 limits and the generic (non-chat) topics; see docs/MQTT.md."""

    max_packet_bytes: int = Field(default=4_194_304, ge=1024, le=268_435_456)
    """Largest packet (fixed header included) a client may send; a larger one closes
    the connection before its body is read. Must carry a full chat message (about
    385 KiB with the default body limit); the default leaves room above that, so a
    chat message a few times too large still gets a ``too_large`` error item."""
    max_connect_bytes: int = Field(default=65536, ge=256, le=268_435_456)
    """Largest CONNECT (fixed header included); a larger one is refused on its fixed header, before
    its body is read, so a client that has not logged in holds at most this much of the broker's memory."""
    packet_deadline_s: float = Field(default=30.0, gt=0)
    """A packet whose first byte has arrived must be complete within this time, or the connection is closed."""
    keepalive_min_s: int = Field(default=0, ge=0, le=65535)
    """Smallest non-zero CONNECT keepalive accepted (0: no minimum). Outside the
    bounds, CONNACK 0x02: MQTT 3.1.1 has no way to impose another value."""
    keepalive_max_s: int = Field(default=65535, ge=1, le=65535)
    """Largest CONNECT keepalive accepted; below 65535, keepalive 0 (never time out) is refused too."""
    max_queued_messages: int = Field(default=1000, ge=1)
    """QoS 1/2 messages on generic topics held per session (in flight + queued while
    offline); beyond it further messages for that session are dropped."""
    allow_anonymous: bool = False
    """Accept CONNECTs without user name; such clients may use only topics ``anonymous_acl`` grants."""
    acl: list[AclRule] = Field(default_factory=list)
    """Generic topics authenticated users may read/write (chat topics follow PROTOCOL.md only)."""
    anonymous_acl: list[AclRule] = Field(default_factory=list)
    """Generic topics anonymous clients may read/write (``%u`` rules never apply to them)."""
    lean_sessions: bool = True
    """Serve chat devices on every listener (tcp, tls, ws, wss) with the lean connection layer (the sans-IO
    MQTT core, one asyncio.Protocol per connection) instead of amqtt; other clients stay on amqtt. ``false``:
    every client on amqtt, as before the lean layer (docs/AMQTT.md, "Two connection paths")."""

    @model_validator(mode="after")
    def _check_keepalive(self) -> MqttSettings:
        if self.keepalive_min_s > self.keepalive_max_s:
            raise ValueError("keepalive_min_s must not exceed keepalive_max_s")
        return self


class LogSettings(_Section):
    level: str = "info"
    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (ts, level, logger, msg, conn, client)."""
    json_lines: bool = False
    """Deprecated: the same as ``format: json``."""

    @property
    def effective_format(self) -> str:
        return "json" if self.json_lines else self.format

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()


class MetricsSettings(_Section):
    """The HTTP listener for Prometheus (``/metrics``) and probes (``/healthz``, ``/readyz``); docs/OPERATIONS.md."""

    bind: Bind = None
    """``HOST:PORT``, e.g. ``127.0.0.1:9100``; off when unset. It has no authentication: keep it private."""


class PresenceSettings(_Section):
    """Online / last seen (docs/PROTOCOL.md, "Presence")."""

    online_window_s: float = Field(default=30.0, gt=0)
    """A user is online while a device heartbeats at least this often (the SDK sends every 10 s)."""
    coalesce_ms: int = Field(default=1000, ge=0)
    """At most one presence item per watcher device and watched user within this time (the latest state)."""
    persist_s: float = Field(default=5.0, gt=0)
    """Changed last-seen times are written to disk in one batch this often (and on shutdown)."""
    max_contacts: int = Field(default=5000, ge=1)
    """Contacts per user (``contacts.add``)."""
    max_watched: int = Field(default=1000, ge=1)
    """Users one connected device may watch with ``presence.subscribe``."""


class GroupsSettings(_Section):
    """Group chat (docs/PROTOCOL.md section 11), one process or cluster mode; the size limits are in ``limits``."""

    seen_receipts: int = Field(default=DEFAULT_SEEN_MAX, ge=0)
    """``seen`` is tracked per member only for groups of at most this many members (0: never); in a
    larger group a seen report is accepted and ignored, and the sender gets ``delivered`` only."""
    max_tracked_per_user: int = Field(default=DEFAULT_MAX_PER_SENDER, ge=1)
    """A user's group messages whose receipts are tracked at once; a new one forgets the oldest
    (its ``delivered``/``seen`` never come). Bounds what one sender can make the server keep (in cluster
    mode per sender and group)."""


class GcSettings(_Section):
    """The garbage collector and long-lived connection objects (chatserver/gc_policy.py)."""

    freeze: bool = True
    """Move surviving objects out of the collector's way (``chat-broker run`` only: the GC is process-wide)."""
    check_s: float = Field(default=1.0, gt=0)
    """How often survivors are frozen, and the need for a full collection is checked (each check ~0.3 ms
    per 5 million memory blocks in use): soon after the heap grew, not seconds later under load."""


def parse_redis_nodes(value: str) -> list[str]:
    """``redis://HOST:PORT[,HOST:PORT...]`` (``redis://`` optional on each) -> ``["HOST:PORT", ...]``."""
    text = value.strip()
    nodes = [part.strip().removeprefix("redis://").rstrip("/") for part in text.split(",")]
    if any("://" in node for node in nodes):
        raise ValueError(f"{value!r}: only redis:// is supported (TLS to Redis is not)")
    if not text or not all(nodes):
        raise ValueError(f"{value!r} is not redis://HOST:PORT[,HOST:PORT...]")
    for node in nodes:
        parse_bind(node)
    return nodes


def _default_retry_s() -> float:
    from storage.redis.client import RETRY_S  # noqa: PLC0415 (redis-py is imported only in cluster mode)

    return RETRY_S


class ClusterSettings(_Section):
    """Cluster mode: the stores in a Redis Cluster, many broker nodes (docs/OPERATIONS.md, "Cluster mode")."""

    redis: list[str] = Field(min_length=1)
    """Startup nodes ``HOST:PORT`` of the Redis Cluster; any one reachable is enough, more ride out a dead one."""
    node_id: str | None = None
    """This broker node's name, unique among live nodes (1-64 letters, digits, ``_.-``). Unset: the host
    name and the tcp listener's port, ``host-1883`` (``resolve_node_id``)."""
    key_prefix: str = ""
    """Put before every Redis key, so several deployments (or tests) can share one cluster."""
    lease_s: float = Field(default=10.0, gt=0)
    """A node is alive while its lease lasts (renewed every third of it); a dead node's devices are
    another node's after this long."""
    retry_s: float = Field(default_factory=_default_retry_s, gt=0)
    """How long a Redis call is retried across a failover before it fails (the sender is not answered
    ``sent`` meanwhile). Must exceed the cluster's failover time: 3.2-4.3 s measured with
    ``cluster-node-timeout 2000``."""
    max_waiting_uplinks: int = Field(default=1024, ge=1)
    """Messages and seen reports of one device waiting for Redis on its node; beyond, refused with
    ``rate_limited`` (re-sent by the client in order): a device cannot grow a node's memory."""
    poll_s: float = Field(default=300.0, gt=0)
    """How often a node reads the queues of its devices without being nudged: the most a lost nudge
    delays an item. A node whose nudge channel was lost (a failover) reads them all once subscribed
    again; this bounds the rarer loss of a nudge its sender could not publish. Each look costs one
    Redis read per connected device (docs/SCALING.md)."""
    min_replicas_ack: int = Field(default=1, ge=0)
    """Replicas that must hold a staged item (Redis ``WAIT``) before its sender gets ``sent``; 0: off."""
    wait_timeout_ms: int = Field(default=1000, ge=1)
    """How long ``WAIT`` waits for ``min_replicas_ack`` replicas."""

    @field_validator("redis")
    @classmethod
    def _check_redis(cls, value: list[str]) -> list[str]:
        for node in value:
            parse_bind(node)
        return value

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str | None) -> str | None:
        from storage.redis.nodes import NODE_ID_RE  # noqa: PLC0415 (redis-py is imported only in cluster mode)

        if value is not None and NODE_ID_RE.fullmatch(value) is None:
            raise ValueError(f"{value!r}: 1 to 64 letters, digits and _.- only")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        from storage.redis.client import PREFIX_RE  # noqa: PLC0415 (as above)

        if PREFIX_RE.fullmatch(value) is None:
            raise ValueError(f"{value!r}: letters, digits and _.:- only")
        return value

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [parse_bind(node) for node in self.redis]


def resolve_node_id(cluster: ClusterSettings, tcp_bind: str | None, hostname: str, token: str) -> str:
    """``cluster.node_id``, else ``{hostname}-{tcp port}``: stable across restarts, so metrics and
    ``cluster status`` keep naming the same machine. A port of 0 (or no tcp listener) names no
    process, so ``token`` (random) is used instead. Other characters than letters, digits, ``_-`` become ``-``."""
    if cluster.node_id is not None:
        return cluster.node_id
    port = parse_bind(tcp_bind)[1] if tcp_bind is not None else 0
    host = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".", maxsplit=1)[0]) or "node"
    return f"{host[:48]}-{port or token}"


class Settings(_Section):
    data_dir: str = "chat-data"
    listeners: ListenersSettings = ListenersSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    staging: StagingSettings = StagingSettings()
    delivery: DeliverySettings = DeliverySettings()
    dedup: DedupSettings = DedupSettings()
    presence: PresenceSettings = PresenceSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    mqtt: MqttSettings = MqttSettings()
    gc: GcSettings = GcSettings()
    groups: GroupsSettings = GroupsSettings()
    push: PushSettings = PushSettings()
    media: MediaSettings = MediaSettings()
    cluster: ClusterSettings | None = None
    """Absent: one process on SQLite (the embedded default)."""

    @model_validator(mode="after")
    def _check_packet_size(self) -> Settings:
        need = chat_packet_bytes(self.limits)
        if self.mqtt.max_packet_bytes < need:
            # A limit below a valid chat message would silently cut chat clients off.
            raise ValueError(
                f"mqtt.max_packet_bytes ({self.mqtt.max_packet_bytes}) must be at least {need} "
                "to carry a chat message of limits.max_body_bytes"
            )
        if self.media.bind is not None and self.cluster is not None and self.media.backend != "s3":
            raise ValueError("media.backend: in cluster mode every node must serve every blob and resume every "
                             "upload, so blobs cannot stay in a node's data_dir: set media.backend: s3 and a "
                             "media.s3 section (a bucket every node reaches), or unset media.bind")
        return self

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


Origin = Callable[[str], str]
"""A dotted key -> where its value came from, in words ("set in FILE", "the default")."""


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "value_error":  # our validators' own words, without pydantic's "Value error, "
        return str(error["ctx"]["error"])
    return str(error["msg"])


def _describe(error: ValidationError, origin: Origin | None) -> str:
    first = error.errors()[0]
    extra = f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    message = _message(first)
    if not first["loc"]:
        # A check across sections (Settings._check_packet_size) names its keys itself: say where each came from.
        keys = dict.fromkeys(re.findall(r"\b[a-z_]+\.[a-z_.]*[a-z_]\b", message))
        where = "; ".join(f"{key}: {origin(key)}" for key in keys) if origin else ""
        return message + (f" ({where})" if where else "") + extra
    key = ".".join(str(part) for part in first["loc"])
    return f"{key}: {message}" + (f" ({origin(key)})" if origin else "") + extra


def build_settings(data: dict[str, Any], source: str = "config", origin: Origin | None = None) -> Settings:
    """Validate ``data``; a ConfigError names the first bad key, and with ``origin`` where its value came from."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        prefix = "" if origin else f"{source}: "
        raise ConfigError(prefix + _describe(exc, origin)) from None


def load_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None
) -> Settings:
    """Read ``path`` (YAML) if given, apply ``overrides`` (dotted keys; ``flags`` names the
    command-line option of each, for error messages), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
    overrides = overrides or {}
    from_file = _dotted_keys(data)

    def origin(key: str) -> str:
        given = next((k for k in overrides if _related(k, key)), None)
        if given is not None:
            flag = (flags or {}).get(given)
            return "given on the command line" + (f" ({flag})" if flag else "")
        if any(_related(k, key) for k in from_file):
            return f"set in {path}"
        return "the default"

    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return build_settings(data, str(path) if path else "defaults", origin)


def _related(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same key, or one is a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict) and data:
        return [key for name, value in data.items()
                for key in _dotted_keys(value, f"{prefix}.{name}" if prefix else str(name))]
    return [prefix] if prefix else []


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value
