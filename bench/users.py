"""BENCH SETUP ONLY, not a product path: a users database for many benchmark users in seconds.

``python -m chatserver user import`` hashes every password with scrypt (~25 ms each on
2 cores: 20,000 users = minutes). Benchmarks need many users, not many
passwords, so this writes ``users.db`` directly:

- every user gets the SAME scrypt hash of one password (hashed once, through
  ``broker.credentials.hash_password`` and ``storage.sqlite.users.SqliteUserStore.add_users``);
- every user gets one known device (``{user}.bench``) holding a device token, as
  if it had logged in once with its password and asked for ``auth.token``.
  The token is derived from a seed (so the load generator knows it without a
  cache file) and stored, like the broker stores it, only as its keyed digest
  (``broker.credentials.token_digest`` under the data directory's ``server.key``).

Clients then log in the way phones do after their first login: with the device
token (a keyed hash, microseconds), not the password (scrypt, ~50 ms). One user
(``bench_pw``) keeps the password path measurable.

The device rows are written with the standard library's sqlite3 in one
transaction (the store's ``record_login`` commits once per call: 20,000 fsyncs);
``verify_template`` reads them back through ``SqliteUserStore`` and checks one token
with ``broker.credentials.token_matches``, so a schema change fails loudly here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.common import BenchError
from broker import credentials
from storage.sqlite.users import SECRET_FILE, USERS_DB, SqliteUserStore, load_or_create_secret

DEVICE = "bench"
PASSWORD = "bench-password-shared-by-all-bench-users"  # bench setup: every bench user has it
TOKEN_SEED = b"chat-bench token seed"
SEED_BATCH = 200  # users written to Redis concurrently


def token_for(user: str) -> str:
    """The device token of ``{user}.bench`` (deterministic, well-formed: ``dt1.`` + 43 chars)."""
    raw = hmac.new(TOKEN_SEED, user.encode(), hashlib.sha256).digest()
    token = credentials.TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert credentials.looks_like_token(token)
    return token


async def _write(data_dir: Path, names: list[str], pw_hash: str) -> None:
    store = await SqliteUserStore.open(data_dir)  # creates users.db with the current schema
    try:
        added, _existing = await store.add_users((name, pw_hash) for name in names)
    finally:
        await store.close()
    del added
    secret = load_or_create_secret(data_dir)
    now = int(time.time() * 1000)
    rows = [(name, DEVICE, credentials.token_digest(secret, name, DEVICE, token_for(name)), now, now)
            for name in names]
    db = sqlite3.connect(data_dir / USERS_DB, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO devices (user, device, token_digest, created_ms, last_login_ms)"
                       " VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


async def _verify(data_dir: Path, name: str) -> None:
    store = await SqliteUserStore.open(data_dir)
    try:
        info = await store.device(name, DEVICE)
        stored = await store.password_hash(name)
    finally:
        await store.close()
    secret = load_or_create_secret(data_dir)
    if info is None or info.token_digest is None or stored is None:
        raise BenchError(f"bench users: {name}.{DEVICE} was not written (has the users.db schema changed?)")
    if not credentials.token_matches(secret, name, DEVICE, token_for(name), info.token_digest):
        raise BenchError("bench users: the stored token digest does not match (has credentials changed?)")


def make_template(data_dir: Path, names: Iterable[str]) -> float:
    """Create ``data_dir`` with users.db + server.key for ``names``; returns seconds taken."""
    started = time.monotonic()
    names = sorted(set(names))
    if not names:
        raise BenchError("no users to create")
    data_dir.mkdir(parents=True, exist_ok=True)
    pw_hash = credentials.hash_password(PASSWORD)  # ONE scrypt hash, shared by every bench user
    asyncio.run(_write(data_dir, names, pw_hash))
    asyncio.run(_verify(data_dir, names[-1]))
    return time.monotonic() - started


async def _seed_redis(startup_nodes: Sequence[tuple[str, int]], names: list[str], pw_hash: str) -> None:
    from storage.redis.users import RedisUserStore  # noqa: PLC0415 (redis-py: cluster mode only)

    store = await RedisUserStore.open(startup_nodes)
    try:
        secret = await store.server_secret()

        async def one(name: str) -> None:
            await store.add_user(name, pw_hash)
            await store.record_login(name, DEVICE)
            await store.set_token_digest(name, DEVICE, credentials.token_digest(secret, name, DEVICE, token_for(name)))

        for start in range(0, len(names), SEED_BATCH):
            await asyncio.gather(*(one(name) for name in names[start:start + SEED_BATCH]))
        info = await store.device(names[-1], DEVICE)
    finally:
        await store.close()
    if info is None or info.token_digest is None or not credentials.token_matches(
            secret, names[-1], DEVICE, token_for(names[-1]), info.token_digest):
        raise BenchError("bench users: the token written to Redis does not check (has credentials changed?)")


def seed_redis(startup_nodes: Sequence[tuple[str, int]], names: Iterable[str]) -> float:
    """The same users as ``make_template``, in a fresh Redis Cluster (cluster mode), through the
    product's ``RedisUserStore`` (a few scripts per user, SEED_BATCH at a time); returns seconds."""
    started = time.monotonic()
    ordered = sorted(set(names))
    if not ordered:
        raise BenchError("no users to create")
    asyncio.run(_seed_redis(startup_nodes, ordered, credentials.hash_password(PASSWORD)))
    return time.monotonic() - started


def copy_template(template: Path, data_dir: Path) -> None:
    """A fresh data directory with the template's users (and no staging store)."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    for name in (USERS_DB, SECRET_FILE):
        shutil.copy2(template / name, data_dir / name)
