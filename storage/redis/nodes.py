"""The broker nodes of one cluster in Redis: ``bridge.cluster.nodes.NodeBus`` (leases, the device ->
node directory, nudges over sharded pub/sub).

Keys (see storage/redis/client.py for the style; the hash tag is the node id or the user):

- ``{prefix}n:{node-a}``   the lease of node ``node-a``: hash ``token`` (random, new each time the
  lease is taken: one life of the node), ``started_ms``, ``connections``; PEXPIRE ``lease_s``,
  renewed every ``lease_s / 3``;
- ``{prefix}nodes``        set of the node ids that started (one slot: touched on start, on each
  renewal, on close and by ``nodes()``, which drops ids whose lease is gone);
- ``{prefix}dir:{alice}``  hash device -> ``"<node id> <token>"``: where each of alice's devices
  is connected, and in which life of that node. An entry whose token is not the one of the
  node's lease now (the node died, or restarted with the same id) counts as no entry, and
  ``locate`` deletes it;
- channel ``{prefix}ch:{node-a}`` the node's nudges (``SPUBLISH``/``SSUBSCRIBE``).

A nudge is one line ``<kind> <target> <origin>`` (``items alice.phone node-b``): node ids, client
ids and user names hold no space, and a line is cheaper to make and read than JSON.

Lease lost: a node cut off from Redis for longer than its lease is forgotten by the others (its
entries count as none). When its renewal finds the lease gone it takes it again (a new token)
and registers again every device it holds (kept in memory); a device that meanwhile connected to another live
node is left there and closed here (a TAKEOVER handed to ``on_nudge`` as if that node had sent it).

Subscribing: redis-py's asyncio cluster client has no pub/sub in the versions we pin (5.x, 6.x;
redis/redis-py#2219, closed in 2026 by PR #3736), so the node opens its own connection to the
master serving its channel's slot (``CLUSTER SLOTS``) and sends ``SSUBSCRIBE`` there. The
connection is dropped and opened again, with back-off, on any error, on a ``sunsubscribe`` pushed
by Redis (the slot moved: failover or resharding), or when a PING sent after ``lease_s / 3`` of
silence gets no answer within as long again. Nudges published meanwhile are lost: allowed, a node
also reads its devices' queues periodically.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, Self, TypeVar

from redis.asyncio.connection import Connection
from redis.exceptions import RedisClusterException, RedisError

from bridge.background import cancel, raise_if_cancelled
from bridge.cluster.nodes import NodeInfo, Nudge, NudgeKind
from bridge.store import StoreError
from chatproto.ids import split_client_id
from storage.redis.client import RETRY_S, RedisStore

log = logging.getLogger(__name__)

NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LIVENESS_CACHE_S = 1.0  # a stale answer only delays: a dead node's entries count a second longer
RESUBSCRIBE_BACKOFF_S = (0.1, 0.2, 0.5, 1.0)  # then 1 s between attempts
CONNECT_TIMEOUT_S = 2.0
T = TypeVar("T")
R = TypeVar("R")
PARALLEL = 64  # commands in flight for a whole-node sweep (each one in flight holds a connection)

# Take or renew the lease: ARGV current token ("" before the first take), fresh token, started_ms,
# connections, lease_ms. 0: another holder has it; 1: renewed; 2: taken with the fresh token (also
# when a retry finds it already taken so: a reply lost in a failover).
LEASE = """
local holder = redis.call('HGET', KEYS[1], 'token')
if holder == ARGV[1] then
  redis.call('HSET', KEYS[1], 'connections', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'started_ms', ARGV[3], 'connections', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 2
"""

# Give up the lease, if it is still ours.
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

LEASE_INFO = """
return {redis.call('PTTL', KEYS[1]), redis.call('HMGET', KEYS[1], 'started_ms', 'connections')}
"""

# The device is here now (ARGV: device, entry); returns the entry it replaced, unless it was this one.
REGISTER = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if before == ARGV[2] then return false end
return before
"""

# After a lost lease (ARGV: device, entry, node id): the entry again, unless it names another node
# (that entry is returned).
REREGISTER = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and string.match(holder, '^%S+') ~= ARGV[3] then return holder end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
"""

# Remove the entry only if it is still exactly ``ARGV[2]`` (the device may have moved on).
UNREGISTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


def encode_nudge(nudge: Nudge) -> str:
    return f"{nudge.kind.value} {nudge.target} {nudge.origin}"


def decode_nudge(line: str) -> Nudge | None:
    """The nudge of a channel message, or None if it is not one."""
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] not in NudgeKind.__members__.values():
        return None
    return Nudge(NudgeKind(parts[0]), parts[1], parts[2])


def parse_entry(entry: str) -> tuple[str, str]:
    """A directory entry ``"<node id> <token>"`` -> (node id, token)."""
    node_id, _, token = entry.partition(" ")
    return node_id, token


async def in_parallel(items: Iterable[T], operation: Callable[[T], Awaitable[R]]) -> list[R]:
    """``operation`` on each item, at most ``PARALLEL`` at a time (a node may hold 100,000 devices:
    gathered at once, each would take a Redis connection of its own); the results in order."""
    slots = asyncio.Semaphore(PARALLEL)

    async def one(item: T) -> R:
        async with slots:
            return await operation(item)
    return await asyncio.gather(*(one(item) for item in items))


def backoff(attempt: int) -> float:
    return RESUBSCRIBE_BACKOFF_S[min(attempt, len(RESUBSCRIBE_BACKOFF_S) - 1)]


class RedisNodeBus(RedisStore):
    """Implements ``NodeBus``. Made by ``connect``; with ``node_id=""`` it is no node (no lease, no
    entries, no channel): ``nodes``, ``locate`` and ``send`` only, for ``chat-broker cluster status``
    and the user commands, which close a removed device's connection with a CLOSE nudge."""

    SCRIPTS: ClassVar[dict[str, str]] = {
        "nodes.lease": LEASE, "nodes.release": RELEASE, "nodes.info": LEASE_INFO,
        "dir.register": REGISTER, "dir.reregister": REREGISTER, "dir.unregister": UNREGISTER}

    _node_id = ""
    _lease_s = 10.0

    @classmethod
    async def connect(cls, startup_nodes: Sequence[tuple[str, int]], prefix: str, node_id: str,
                      lease_s: float = 10.0, retry_s: float = RETRY_S) -> Self:
        if node_id and NODE_ID_RE.fullmatch(node_id) is None:
            raise ValueError(f"a node id is 1-64 letters, digits and _.- only, not {node_id!r}")
        if lease_s <= 0:
            raise ValueError(f"the lease must be positive, not {lease_s!r}")
        bus = await cls.open(startup_nodes, prefix, retry_s)
        bus._setup(node_id, lease_s)
        return bus

    def _setup(self, node_id: str, lease_s: float) -> None:
        self._node_id = node_id
        self._lease_s = lease_s
        self._token = ""  # this incarnation of the node: a new one each time the lease is taken
        self._started_ms = 0
        self._connections = 0
        self._held: set[str] = set()  # client ids registered here, to register again after a lost lease
        self._leases: dict[str, tuple[str | None, float]] = {}  # node id -> (its token, monotonic time read)
        self._on_nudge: Callable[[Nudge], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def node_id(self) -> str:
        return self._node_id

    # --- keys ------------------------------------------------------------------------------

    def _lease_key(self, node_id: str) -> str:
        return self.key("n", node_id)

    def _registry_key(self) -> str:
        return f"{self._prefix}nodes"

    def _channel(self, node_id: str) -> str:
        return self.key("ch", node_id)

    @property
    def subscriber_name(self) -> str:
        """The Redis client name of this node's nudge subscriber (``CLIENT LIST``): ``{prefix}nudges:{node}``."""
        return f"{self._prefix}nudges:{self._node_id}"

    def _writer(self, what: str) -> str:
        if not self._node_id:
            raise RuntimeError(f"{what} on a read-only node bus (no node id)")
        return self._node_id

    # --- life cycle ------------------------------------------------------------------------

    async def start(self, on_nudge: Callable[[Nudge], None]) -> None:
        node_id = self._writer("start")
        if self._tasks:
            raise RuntimeError(f"node {node_id} is already started")
        self._started_ms = int(time.time() * 1000)
        if await self._lease() == 0:
            raise StoreError(f"node id {node_id!r} is held by a live node: stop it first, or wait until its "
                             f"lease runs out (up to {self._lease_s:g} s after it stopped)")
        self._on_nudge = on_nudge
        await self.command("nodes.join", "SADD", self._registry_key(), node_id)
        subscribed = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._keep_lease(), name=f"lease {node_id}"),
                       asyncio.create_task(self._keep_subscribed(subscribed), name=f"nudges {node_id}")]
        try:
            await asyncio.wait_for(subscribed, self._retry_s)
        except TimeoutError as exc:
            await self._stop()
            raise StoreError(f"node {node_id}: could not subscribe to its nudge channel "
                             f"in {self._retry_s:g} s") from exc

    async def close(self) -> None:
        """Stop, remove this node's entries, lease and registration (best effort: what fails is
        logged and runs out with the lease), and close the connections."""
        await self._stop()
        await super().close()

    async def _stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel(tasks)
        if not tasks:
            return
        try:
            await in_parallel(self._held, lambda client_id: self._unregister(client_id, self._entry()))
            await self.run("nodes.release", [self._lease_key(self._node_id)], [self._token])
            await self.command("nodes.leave", "SREM", self._registry_key(), self._node_id)
        except StoreError as exc:
            log.warning("node %s: closing: %s (its entries go when its lease runs out)", self._node_id, exc)
        self._held.clear()

    async def _lease(self) -> int:
        fresh = secrets.token_hex(8)
        lease_ms = max(1, int(self._lease_s * 1000))
        state = int(await self.run("nodes.lease", [self._lease_key(self._node_id)],
                                   [self._token, fresh, self._started_ms, self._connections, lease_ms]))
        if state == 2:
            self._token = fresh
        return state

    async def _keep_lease(self) -> None:
        """Renew the lease every ``lease_s / 3`` until cancelled; never ends on an error."""
        failing = False
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self._renew()
            except Exception as exc:
                raise_if_cancelled(exc)
                if not failing:
                    log.error("node %s: renewing its lease failed (%s): trying again", self._node_id, exc)
                failing = True
            else:
                raise_if_cancelled()  # a renewal that swallowed its cancel
                if failing:
                    log.warning("node %s: lease renewed again", self._node_id)
                failing = False

    async def _renew(self) -> None:
        state = await self._lease()
        if state == 0:
            raise StoreError(f"another live node holds the node id {self._node_id!r}")
        if state == 2:
            log.warning("node %s: its lease had run out (cut off from Redis?): taken again, "
                        "registering its %d devices again", self._node_id, len(self._held))
            await self._reregister()
            # While the lease was out, other nodes saw this one dead and nudged no one for its devices: what
            # they staged meanwhile would wait for the periodic look (cluster.poll_s). Look again now.
            self._deliver(Nudge(NudgeKind.RESYNC, "", self._node_id))
        # Every time, not only on start: a ``nodes()`` that saw the lease gone may have removed it.
        await self.command("nodes.join", "SADD", self._registry_key(), self._node_id)

    async def _reregister(self) -> None:
        """After the lease was taken again (a new token): every device held here gets an entry
        naming it, except one that another live node has taken meanwhile: that one is closed here."""
        await in_parallel(list(self._held), self._reregister_one)

    async def _reregister_one(self, client_id: str) -> None:
        user, device = self._split(client_id)
        holder = await self.run("dir.reregister", [self.key("dir", user)], [device, self._entry(), self._node_id])
        if holder is None:
            return
        node_id, token = parse_entry(str(holder))
        if (await self._tokens([node_id]))[node_id] == token:
            self._deliver(Nudge(NudgeKind.TAKEOVER, client_id, node_id))
        else:
            await self.register(client_id)

    # --- the directory ---------------------------------------------------------------------

    def report(self, connections: int) -> None:
        self._connections = connections

    def _entry(self) -> str:
        """This node's directory entry: a node that restarts with the same id (a new token) does
        not inherit the entries of its previous life."""
        return f"{self._node_id} {self._token}"

    @staticmethod
    def _split(client_id: str) -> tuple[str, str]:
        parts = split_client_id(client_id)
        if parts is None:
            raise ValueError(f"not a client id: {client_id!r}")
        return parts

    async def register(self, client_id: str) -> str | None:
        self._writer("register")
        user, device = self._split(client_id)
        self._held.add(client_id)
        before = await self.run("dir.register", [self.key("dir", user)], [device, self._entry()])
        if before is None:
            return None
        node_id, token = parse_entry(str(before))
        if node_id == self._node_id or (await self._tokens([node_id]))[node_id] != token:
            return None
        return node_id

    async def unregister(self, client_id: str) -> None:
        self._writer("unregister")
        self._held.discard(client_id)
        await self._unregister(client_id, self._entry())

    async def _unregister(self, client_id: str, entry: str) -> None:
        user, device = self._split(client_id)
        await self.run("dir.unregister", [self.key("dir", user)], [device, entry])

    async def locate(self, client_ids: list[str]) -> dict[str, str]:
        by_user: dict[str, list[str]] = {}
        for client_id in dict.fromkeys(client_ids):
            parts = split_client_id(client_id)
            if parts is not None:
                by_user.setdefault(parts[0], []).append(parts[1])
        users = list(by_user)
        replies = await in_parallel(
            users, lambda user: self.command("dir.locate", "HMGET", self.key("dir", user), *by_user[user]))
        found = {f"{user}.{device}": str(entry)
                 for user, entries in zip(users, replies, strict=True)
                 for device, entry in zip(by_user[user], entries, strict=True) if entry is not None}
        live, dead = await self._live(found)
        if dead:
            await self._forget(dead)
        return live

    async def _live(self, found: dict[str, str], fresh: bool = False) -> tuple[dict[str, str], dict[str, str]]:
        """Split client id -> entry into client id -> node for the entries of live nodes, and the
        entries of dead ones."""
        parsed = {client_id: parse_entry(entry) for client_id, entry in found.items()}
        tokens = await self._tokens({node_id for node_id, _ in parsed.values()}, fresh)
        live = {client_id: node_id for client_id, (node_id, token) in parsed.items() if tokens[node_id] == token}
        return live, {client_id: entry for client_id, entry in found.items() if client_id not in live}

    async def _forget(self, dead: dict[str, str]) -> None:
        """Delete entries of dead nodes (lookups are right without it: this keeps the hashes from
        filling up). Only after reading the leases afresh: an entry is deleted only if its token is
        not the current one, which no later event can make it again."""
        try:
            _, dead = await self._live(dead, fresh=True)
            await in_parallel(dead.items(), lambda pair: self._unregister(*pair))
        except StoreError as exc:
            log.debug("dropping entries of dead nodes: %s", exc)

    async def _tokens(self, node_ids: Iterable[str], fresh: bool = False) -> dict[str, str | None]:
        """The token of each node's lease (None: no lease). Read at most every ``LIVENESS_CACHE_S``
        unless ``fresh``."""
        now = time.monotonic()
        tokens: dict[str, str | None] = {}
        unknown: list[str] = []
        for node_id in set(node_ids):
            cached = self._leases.get(node_id)
            if node_id == self._node_id and self._tasks:
                tokens[node_id] = self._token
            elif cached is not None and now - cached[1] < LIVENESS_CACHE_S and not fresh:
                tokens[node_id] = cached[0]
            else:
                unknown.append(node_id)
        read = await in_parallel(
            unknown, lambda node_id: self.command("nodes.token", "HGET", self._lease_key(node_id), "token"))
        for node_id, token in zip(unknown, read, strict=True):
            tokens[node_id] = None if token is None else str(token)
            self._leases[node_id] = (tokens[node_id], now)
        return tokens

    async def nodes(self) -> list[NodeInfo]:
        registry = self._registry_key()
        node_ids = sorted(str(n) for n in await self.command("nodes.list", "SMEMBERS", registry))
        infos = await in_parallel(node_ids, lambda node_id: self.run("nodes.info", [self._lease_key(node_id)], []))
        live: list[NodeInfo] = []
        for node_id, (left_ms, (started_ms, connections)) in zip(node_ids, infos, strict=True):
            if int(left_ms) < 0 or started_ms is None:
                await self.command("nodes.leave", "SREM", registry, node_id)
                continue
            live.append(NodeInfo(node_id, int(connections or 0), int(left_ms), int(started_ms)))
        return live

    # --- nudges ----------------------------------------------------------------------------

    async def send(self, node_id: str, nudge: Nudge) -> None:
        try:
            await self._client.execute_command("SPUBLISH", self._channel(node_id), encode_nudge(nudge))
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("nudge %s to %s lost: %s", nudge, node_id, exc)

    def _deliver(self, nudge: Nudge) -> None:
        if self._on_nudge is None:
            return
        try:
            self._on_nudge(nudge)
        except Exception:
            log.exception("node %s: the handler of %s failed", self._node_id, nudge)

    async def _keep_subscribed(self, subscribed: asyncio.Future[None]) -> None:
        """Hold the subscription to this node's channel until cancelled; never ends on an error."""
        attempt = 0
        lost_at: float | None = None
        while True:
            connection: Connection | None = None
            try:
                connection = await self._subscribe()
                if not subscribed.done():
                    subscribed.set_result(None)
                if lost_at is not None:
                    log.warning("node %s: nudge channel subscribed again after %.1f s", self._node_id,
                                time.monotonic() - lost_at)
                    self._deliver(Nudge(NudgeKind.RESYNC, "", self._node_id))  # what was sent meanwhile is lost
                lost_at, attempt = None, 0
                await self._listen(connection)
                raise_if_cancelled()  # a listen that swallowed its cancel
                reason = "Redis ended the subscription (its slot moved)"
            except Exception as exc:
                raise_if_cancelled(exc)
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                if connection is not None:
                    await connection.disconnect(nowait=True)
            if lost_at is None:
                lost_at = time.monotonic()
                log.warning("node %s: nudge channel lost (%s): subscribing again", self._node_id, reason)
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _subscribe(self) -> Connection:
        """A connection to the master serving this node's channel, subscribed to it."""
        channel = self._channel(self._node_id)
        slot = self._client.keyslot(channel)
        ranges: dict[tuple[int, int], dict[str, Any]] = await self.command("nodes.slots", "CLUSTER SLOTS")
        masters = [served["primary"] for (low, high), served in ranges.items() if low <= slot <= high]
        if not masters:
            raise StoreError(f"no master serves slot {slot}")
        host, port = masters[0]
        # Named, so that an operator (or the chaos harness) can tell each node's subscriber in CLIENT LIST.
        connection = Connection(host=host, port=port, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                client_name=self.subscriber_name)
        try:
            await connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            await connection.send_command("SSUBSCRIBE", channel, check_health=False)
            reply = await connection.read_response(timeout=self._retry_s)
            if not reply or reply[0] != "ssubscribe":
                raise StoreError(f"SSUBSCRIBE {channel} at {host}:{port} answered {reply!r}")
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return connection

    async def _listen(self, connection: Connection) -> None:
        """Hand each nudge to ``on_nudge`` until Redis ends the subscription (returns) or the
        connection fails or stops answering PING (raises)."""
        quiet_s = self._lease_s / 3
        pinged = False
        while True:
            reply = await connection.read_response(timeout=quiet_s)
            if reply is None:
                if pinged:
                    raise StoreError(f"no answer to PING in {quiet_s:g} s")
                await connection.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if reply[0] == "smessage":
                nudge = decode_nudge(str(reply[2]))
                if nudge is None:
                    log.debug("node %s: not a nudge: %r", self._node_id, reply[2])
                else:
                    self._deliver(nudge)
            elif reply[0] == "sunsubscribe":
                return
