"""The Redis Cluster connection every Redis store shares: redis-py's asyncio cluster client, a key
prefix, Lua scripts, retries across a failover, and ``StoreError`` at the boundary.

Keys: every key is ``{prefix}{kind}:{{{user}}}[:{part}]``, for example ``t1:u:{alice}:devices``:
the prefix (no braces, no glob characters) lets tests and deployments share a cluster, and the
user between braces is the hash tag, so all keys of one user live in one slot and one Lua script
can read and write them atomically (Redis runs a script alone on its master).

Failover: a master SIGKILLed is replaced by its replica 3-5 s later (docs/TESTING.md). redis-py
follows MOVED/ASK itself and retries a few times; ``call`` retries what still fails with a
failover error (connection refused, CLUSTERDOWN, TRYAGAIN, a slot not covered) for up to
``retry_s`` seconds before raising ``StoreError``. A retried write may already have been applied
(its reply was lost with the master): every script is written so that running it twice does no
harm (a device's first login answers "known" the second time; a claim retried takes another key,
so a key can be lost, never handed out twice).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Self, TypeVar

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterError,
    ConnectionError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

from bridge.background import raise_if_cancelled
from bridge.store import NotReplicated, StoreError

RETRY_S = 6.0
SOCKET_TIMEOUT_S = 2.0
"""A connect or a reply that takes longer fails as a failover error, retried within ``retry_s``. Without
it a Redis node that stops answering without closing (a partition, a host powered off) held a call for
as long as TCP takes to give up, minutes, and ``retry_s`` bounded nothing (bench/chaos cluster-cutoff)."""
BACKOFF_S = (0.05, 0.1, 0.2, 0.4)  # then 0.4 s between attempts
IN_FLIGHT_PER_NODE = 64
"""Calls one cluster client has in flight to one Redis node at most; the next wait for one to end.
redis-py opens a connection per concurrent command and keeps it open for good: a burst of 3,000
calls (a RESYNC, a wave of phones reconnecting) left ~1,000 connections open on each master, each a
file descriptor of the broker's and of Redis's (``maxclients``, 10,000 by default, shared by every
node). 64 connections of 5,000-10,000 round trips a second each are more than one broker process sends
a node. Per node, so that a node that stopped answering holds up only the calls waiting for it."""
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]*")


class InFlight:
    """``IN_FLIGHT_PER_NODE`` calls at a time per Redis node, for every store sharing one cluster client."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._nodes: dict[str, asyncio.Semaphore] = {}

    def slot(self, key: str | None) -> asyncio.Semaphore:
        """The semaphore of the node serving ``key`` (as the client knows the layout now); calls without
        a key, or before the layout is known, share one."""
        try:
            node = self._client.get_node_from_key(key) if key is not None else None
        except (RedisError, RedisClusterException):  # the layout is being read again (a failover)
            node = None
        name = "" if node is None else node.name
        semaphore = self._nodes.get(name)
        if semaphore is None:
            semaphore = self._nodes[name] = asyncio.Semaphore(IN_FLIGHT_PER_NODE)
        return semaphore


_IN_FLIGHT: weakref.WeakKeyDictionary[RedisCluster, InFlight] = weakref.WeakKeyDictionary()


def in_flight(client: RedisCluster) -> InFlight:
    """The one ``InFlight`` of ``client``."""
    found = _IN_FLIGHT.get(client)
    if found is None:
        found = _IN_FLIGHT[client] = InFlight(client)
    return found


class SlotMoved(Exception):
    """A write on a connection of our own found its slot served elsewhere (``run_replicated``)."""


# ClusterError covers CLUSTERDOWN and MASTERDOWN; RedisClusterException covers "no node serves
# this slot" and a client that cannot reach any startup node while the topology changes.
# And a connection closed under a call: on a connection error redis-py's cluster client closes every
# connection (aclose()), also one another call is opening (with a socket timeout it sends through
# asyncio.wait_for, where others run), which then fails with "AttributeError: 'NoneType' object has no
# attribute 'writelines'" or uvloop's "RuntimeError: ... the handler is closed"
# (tests/test_cluster_failover.py). ``call`` runs only redis-py inside its try.
FAILOVER_ERRORS = (ConnectionError, TimeoutError, ClusterError, TryAgainError, ReadOnlyError,
                   RedisClusterException, SlotMoved, AttributeError, RuntimeError)

T = TypeVar("T")


def cluster_client(startup_nodes: Sequence[tuple[str, int]], wait_timeout_ms: int = 0) -> RedisCluster:
    """The cluster client of a node's stores; its socket timeout outlasts a ``WAIT`` of ``wait_timeout_ms``."""
    timeout = max(SOCKET_TIMEOUT_S, wait_timeout_ms / 1000 + 1.0)
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in startup_nodes],
                        decode_responses=True, socket_timeout=timeout, socket_connect_timeout=SOCKET_TIMEOUT_S)


class RedisStore:
    """Base of the Redis stores: one cluster client (``decode_responses``), a key prefix, and the
    Lua scripts of ``SCRIPTS`` (operation name -> source), registered once per store."""

    SCRIPTS: ClassVar[dict[str, str]] = {}

    def __init__(self, client: RedisCluster, prefix: str = "", retry_s: float = RETRY_S) -> None:
        if PREFIX_RE.fullmatch(prefix) is None:
            raise ValueError(f"a key prefix is letters, digits and _.:- only, not {prefix!r}")
        self._client = client
        self._prefix = prefix
        self._retry_s = retry_s
        self._seeds = dict(client.nodes_manager.startup_nodes)  # name -> node, given or discovered so far
        self._in_flight = in_flight(client)
        # redis-py sends a script by its SHA and loads it on a node that lacks it (a promoted replica).
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source) for name, source in self.SCRIPTS.items()}  # type: ignore[misc]

    @classmethod
    async def open(cls, startup_nodes: Sequence[tuple[str, int]], prefix: str = "",
                   retry_s: float = RETRY_S) -> Self:
        """Connect to the cluster through any of ``startup_nodes`` ((host, port) pairs)."""
        client = cluster_client(startup_nodes)
        store = cls(client, prefix, retry_s)
        try:
            await store.call("connect", client.initialize)
        except BaseException:
            await client.aclose()
            raise
        return store

    async def close(self) -> None:
        await self._client.aclose()

    def key(self, kind: str, user: str, *parts: str) -> str:
        return ":".join((f"{self._prefix}{kind}", f"{{{user}}}", *parts))

    async def run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run the script ``name`` on the slot of ``keys`` (all of one user), with ``call``'s retries."""
        script = self._scripts[name]
        return await self.call(name, lambda: script(keys=list(keys), args=list(args)), keys[0] if keys else None)

    async def run_replicated(self, name: str, keys: Sequence[str], args: Sequence[str | int], replicas: int,
                             timeout_ms: int) -> Any:
        """``run``, then Redis ``WAIT`` on the same connection: returns once ``replicas`` replicas hold
        the write (and, replication being one ordered stream, every write before it on that master),
        else raises ``StoreError``. With ``replicas`` 0 it is ``run``. WAIT counts the writes of its
        own connection, so both go down one connection taken from the node's pool."""
        if replicas <= 0:
            return await self.run(name, keys, args)
        script = self._scripts[name]

        async def once() -> Any:
            node = self._client.get_node_from_key(keys[0])
            if node is None:
                raise SlotMoved(f"no master for {keys[0]!r}")
            connection = node.acquire_connection()
            try:
                try:
                    await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    result = await connection.read_response()
                except NoScriptError:  # a promoted replica that never ran it
                    await connection.send_command("EVAL", script.script, len(keys), *keys, *args)
                    result = await connection.read_response()
                await connection.send_command("WAIT", replicas, timeout_ms)
                acked = int(await connection.read_response())
            except (MovedError, AskError) as exc:  # the slot moved (a failover): let the client learn the map
                with contextlib.suppress(RedisError):
                    await self._client.exists(keys[0])
                raise SlotMoved(str(exc)) from exc
            finally:
                node.release(connection)
            if acked < replicas:
                raise NotReplicated(f"redis {name}: {acked} of {replicas} replica(s) acknowledged the write within "
                                    f"{timeout_ms} ms (cluster.min_replicas_ack)", result)
            return result

        return await self.call(name, once, keys[0])

    async def command(self, what: str, *args: str) -> Any:
        """One Redis command (on the slot of its key, the second word), with ``call``'s retries."""
        return await self.call(what, lambda: self._client.execute_command(*args), args[1] if len(args) > 1 else None)

    async def probe(self, name: str) -> None:
        """A small write that must succeed for the store to count as writable (``/readyz``)."""
        await self.command("probe", "SET", f"{self._prefix}probe:{{{name}}}", "1", "PX", "60000")

    def _reseed(self) -> None:
        """Give the client back the startup nodes it dropped. redis-py drops each node whose
        connection failed from them; once every node had failed (this node cut off from Redis, or
        every master restarted) it had none left to ask for the layout and failed for good ("Please
        provide at least one reachable node: None"; tests/test_cluster_cutoff.py)."""
        startup = self._client.nodes_manager.startup_nodes
        for name, node in self._seeds.items():
            startup.setdefault(name, node)

    async def call(self, what: str, operation: Callable[[], Awaitable[T]], key: str | None = None) -> T:
        """Run ``operation`` (on the node of ``key``: one of its ``IN_FLIGHT_PER_NODE``), again on a
        failover error until ``retry_s`` has passed; any redis error that is left becomes ``StoreError``
        naming ``what``. Waiting for a slot counts against ``retry_s`` too: behind a node that stopped
        answering, a queue of calls would otherwise wait 2 s (a socket timeout) per 64 ahead of it."""
        deadline = time.monotonic() + self._retry_s
        attempt = 0
        while True:
            slot = self._in_flight.slot(key)
            if slot.locked():
                try:
                    await asyncio.wait_for(slot.acquire(), max(0.0, deadline - time.monotonic()))
                except builtins.TimeoutError:
                    raise StoreError(f"redis {what}: its Redis node had {IN_FLIGHT_PER_NODE} calls in flight for "
                                     f"{self._retry_s:g} s (it is slow or not answering)") from None
            else:
                await slot.acquire()  # free: at once
            try:
                try:
                    return await operation()
                finally:
                    slot.release()  # before any pause: a call backing off holds no slot
            except FAILOVER_ERRORS as exc:
                raise_if_cancelled(exc)  # (a cancel redis-py's socket timeout turned into TimeoutError)
                pause = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                if time.monotonic() + pause > deadline:
                    raise StoreError(f"redis {what}: {exc} (still failing after {self._retry_s:g} s)") from exc
                attempt += 1
                self._reseed()
                await asyncio.sleep(pause)
            except RedisError as exc:
                raise_if_cancelled(exc)
                raise StoreError(f"redis {what}: {exc}") from exc
