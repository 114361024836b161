"""Users and their devices in a Redis Cluster: ``broker.users.UserStore`` with messaging's
``UserLookup`` and the key service's ``Accounts``, as storage/sqlite/users.py holds them in SQLite.

Keys (hash tag: the user, so one user's keys share a slot; see storage/redis/client.py):

- ``{prefix}u:{alice}``          hash ``pw`` (password hash, formats of ``broker.credentials``), ``created`` (ms)
- ``{prefix}u:{alice}:devices``  hash device -> ``"<created_ms> <last_login_ms>"``
- ``{prefix}u:{alice}:tokens``   hash device -> token digest (never the token)
- ``{prefix}secret``             the device-token HMAC key every node shares (hex)

Every change is one Lua script on the user's slot: ``record_login`` counts the devices and adds
the new one in the same script, so racing first logins cannot overshoot the device limit.

The operator's side (``chat-broker user ...``, chatserver/user_admin.py ``AccountStore``):
``set_password`` (which revokes every token), ``delete_user`` (the three keys above; the user's
device keys and queues are dropped by chatserver/cluster_admin.py with the scripts of their own
stores), ``iter_users`` (a SCAN of every master for the ``u:{name}`` hashes) and ``devices``.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import ClassVar

from bridge.store import StoreError, UserExistsError
from broker.users import DeviceInfo, TooManyDevicesError, UserInfo
from storage.redis.client import RedisStore
from storage.redis.nodes import in_parallel

ADD_USER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'pw', ARGV[1], 'created', ARGV[2])
return 1
"""

USER_DEVICES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HKEYS', KEYS[2])
"""

DEVICE = """
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[2], ARGV[1])}
"""

# 1: a new device, 0: a known one (its last login updated), -1: over the limit, -2: no such user.
RECORD_LOGIN = """
local times = redis.call('HGET', KEYS[2], ARGV[1])
if times then
  redis.call('HSET', KEYS[2], ARGV[1], string.match(times, '^%d+') .. ' ' .. ARGV[2])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[2])
return 1
"""

TOUCH_LOGIN = """
local times = redis.call('HGET', KEYS[1], ARGV[1])
if times then redis.call('HSET', KEYS[1], ARGV[1], string.match(times, '^%d+') .. ' ' .. ARGV[2]) end
return 0
"""

SET_DIGEST = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

REVOKE_ALL = """
local count = redis.call('HLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return count
"""

DELETE_DEVICE = """
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# ``import_user`` (chat-broker migrate). KEYS: user, devices, tokens. ARGV: password hash, created,
# then (device, "<created> <last_login>", digest or '') triples. A user already there with another
# password is left alone (returns 0); else what is missing is added and what is there stays.
IMPORT_USER = """
local pw = redis.call('HGET', KEYS[1], 'pw')
if pw and pw ~= ARGV[1] then return 0 end
if not pw then redis.call('HSET', KEYS[1], 'pw', ARGV[1], 'created', ARGV[2]) end
for i = 3, #ARGV, 3 do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 2]) end
end
return 1
"""

# 1: changed (every token revoked with it), 0: no such user.
SET_PW_HASH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'pw', ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

DELETE_USER = """
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
"""

USER_INFO = """
return {redis.call('HGET', KEYS[1], 'created'), redis.call('HLEN', KEYS[2])}
"""

DEVICE_LIST = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

NO_LIMIT = 2**31
LIST_BATCH = 1000  # users read at once by ``iter_users`` (in_parallel bounds the commands in flight)


def devices_key(store: RedisStore, user: str) -> str:
    """``u:{user}:devices``, which the queue store's scripts read too (they stage for every device)."""
    return store.key("u", user, "devices")


def now_ms() -> int:
    return int(time.time() * 1000)


class SecretMismatchError(StoreError):
    """The cluster holds another device-token key than the one being imported."""


class RedisUserStore(RedisStore):
    """Implements ``broker.users.UserStore``, ``UserLookup`` and ``Accounts``; ``add_users`` is the
    admin side the tests seed with."""

    SCRIPTS: ClassVar[dict[str, str]] = {"users.add": ADD_USER, "users.devices": USER_DEVICES, "users.device": DEVICE,
               "users.record_login": RECORD_LOGIN, "users.touch_login": TOUCH_LOGIN,
               "users.set_token": SET_DIGEST,
               "users.revoke_tokens": REVOKE_ALL, "devices.remove": DELETE_DEVICE,
               "users.import": IMPORT_USER,
               "users.set_password": SET_PW_HASH, "users.delete": DELETE_USER, "users.info": USER_INFO,
               "users.device_list": DEVICE_LIST}

    def _keys(self, user: str) -> tuple[str, str, str]:
        """The user's hash, devices and tokens."""
        return self.key("u", user), devices_key(self, user), self.key("u", user, "tokens")

    async def add_user(self, name: str, pw_hash: str) -> None:
        if not await self.run("users.add", [self.key("u", name)], [pw_hash, str(now_ms())]):
            raise UserExistsError(f"user {name!r} already exists")

    async def server_secret(self) -> bytes:
        """The HMAC key for device tokens that every node shares (a token issued by one node is
        checked by another), made on first use. It sits beside the token digests it protects:
        whoever can read Redis can write those too, so it adds no exposure (docs/SECURITY.md)."""
        key = f"{self._prefix}secret"
        await self.command("secret.create", "SET", key, os.urandom(32).hex(), "NX")
        value = await self.command("secret.read", "GET", key)
        return bytes.fromhex(str(value))

    async def stored_secret(self) -> bytes | None:
        """The shared device-token key if one was made or imported yet (a read: nothing is created)."""
        value = await self.command("secret.read", "GET", f"{self._prefix}secret")
        return None if value is None else bytes.fromhex(str(value))

    async def import_secret(self, secret: bytes) -> None:
        """Make ``secret`` (a SQLite data folder's ``server.key``) the shared device-token key, so the
        device tokens it issued stay valid. Done again it changes nothing; raises SecretMismatchError
        if the cluster holds another key already (its nodes issued tokens with it)."""
        await self.command("secret.import", "SET", f"{self._prefix}secret", secret.hex(), "NX")
        if await self.stored_secret() != secret:
            raise SecretMismatchError(
                f"the cluster (key prefix {self._prefix!r}) already holds another device-token key: importing "
                "this one would end the tokens issued with it. Migrate into a fresh key prefix, or delete "
                f"the key {self._prefix}secret if no device uses a token issued by the cluster")

    async def import_user(self, name: str, pw_hash: str, created_ms: int, devices: Iterable[DeviceInfo]) -> bool:
        """Add a user as another store holds it: password hash, creation time, devices with their times
        and token digests (``chat-broker migrate``). What the cluster has already stays (a device's
        times and token, a user's creation time), so a second import changes nothing. False, and
        nothing written, if the user exists here with another password."""
        args: list[str | int] = [pw_hash, created_ms]
        for device in devices:
            args += [device.device, f"{device.created_ms} {device.last_login_ms}", device.token_digest or ""]
        return bool(await self.run("users.import", self._keys(name), args))

    async def add_users(self, rows: Iterable[tuple[str, str]]) -> tuple[int, list[str]]:
        """Add users (name, password hash); returns (added, names that already existed). Users live
        in different slots, so this is one write per user (several in flight), not one transaction:
        rerun after a failure, the users added before it are reported as existing."""
        created = str(now_ms())
        rows = list(rows)
        done = await in_parallel(rows, lambda row: self.run("users.add", [self.key("u", row[0])], [row[1], created]))
        existing = [name for (name, _), new in zip(rows, done, strict=True) if not new]
        return len(rows) - len(existing), existing

    async def password_hash(self, name: str) -> str | None:
        value = await self.command("users.password_hash", "HGET", self.key("u", name), "pw")
        return None if value is None else str(value)

    async def user_devices(self, name: str) -> list[str] | None:
        """Device ids of ``name`` (maybe none yet); None if there is no such user."""
        user, devices, _ = self._keys(name)
        found = await self.run("users.devices", [user, devices], [])
        return None if found is None else sorted(str(d) for d in found)

    async def device(self, user: str, device: str) -> DeviceInfo | None:
        _, devices, tokens = self._keys(user)
        times, digest = await self.run("users.device", [devices, tokens], [device])
        if times is None:
            return None
        created, last_login = (int(part) for part in str(times).split())
        return DeviceInfo(user, device, digest, created, last_login)

    async def record_login(self, user: str, device: str, max_devices: int | None = None) -> bool:
        """Note a successful login; True when the device is new (its first login). A new device is
        added only while the user has fewer than ``max_devices`` (counted in the same script), else
        TooManyDevicesError."""
        limit = NO_LIMIT if max_devices is None else max_devices
        result = await self.run("users.record_login", self._keys(user)[:2],
                                [device, now_ms(), limit])
        if result == -1:
            raise TooManyDevicesError(f"{user} has {max_devices} devices, the most allowed")
        if result == -2:
            raise StoreError(f"no user {user!r}")
        return bool(result == 1)

    async def touch_login(self, user: str, device: str) -> None:
        """The last-login time of a known device (one script: nothing to batch, Redis does not fsync per write)."""
        await self.run("users.touch_login", [devices_key(self, user)], [device, now_ms()])

    async def set_token_digest(self, user: str, device: str, digest: str) -> None:
        _, devices, tokens = self._keys(user)
        if not await self.run("users.set_token", [devices, tokens], [device, digest]):
            raise StoreError(f"no device {user}.{device}")

    async def revoke_tokens(self, user: str, device: str | None = None) -> int:
        """Clear the token of one device (or all of the user's); returns how many were set."""
        tokens = self._keys(user)[2]
        if device is None:
            return int(await self.run("users.revoke_tokens", [tokens], []))
        return int(await self.command("users.revoke_tokens", "HDEL", tokens, device))

    async def delete_device(self, user: str, device: str) -> bool:
        """Forget a device and its token (``devices.remove``); True if it existed."""
        _, devices, tokens = self._keys(user)
        return bool(await self.run("devices.remove", [devices, tokens], [device]))

    # --- the operator's side (chatserver/user_admin.py) ------------------------------------------

    async def user_exists(self, name: str) -> bool:
        return bool(await self.command("users.exists", "EXISTS", self.key("u", name)))

    async def set_password(self, name: str, pw_hash: str) -> None:
        """Change the password and revoke every device token of the user."""
        user, _, tokens = self._keys(name)
        if not await self.run("users.set_password", [user, tokens], [pw_hash]):
            raise StoreError(f"no user {name!r}")

    async def delete_user(self, name: str) -> None:
        """Delete the user with their devices and tokens. A retry after a reply lost in a failover
        finds nothing left and says "no user": the user is gone all the same."""
        if not await self.run("users.delete", list(self._keys(name)), []):
            raise StoreError(f"no user {name!r}")

    async def iter_users(self) -> AsyncIterator[UserInfo]:
        """Every user by name, with their number of devices. The names are gathered by a SCAN of
        every master (kept in memory to be sorted: a few dozen bytes a user), then read and
        yielded ``LIST_BATCH`` at a time; a user deleted meanwhile is left out."""
        head = f"{self._prefix}u:{{"

        async def scan() -> list[str]:
            return sorted({str(key)[len(head):-1]
                           async for key in self._client.scan_iter(match=f"{head}*}}", count=1000)})
        names = await self.call("users.list", scan)
        for start in range(0, len(names), LIST_BATCH):
            batch = names[start:start + LIST_BATCH]
            infos = await in_parallel(batch, lambda name: self.run("users.info", list(self._keys(name)[:2]), []))
            for name, (created, devices) in zip(batch, infos, strict=True):
                if created is not None:
                    yield UserInfo(name, int(created), int(devices))

    async def devices(self, user: str) -> list[DeviceInfo]:
        """The user's devices by id, with their times and token digests."""
        _, devices, tokens = self._keys(user)
        times, digests = await self.run("users.device_list", [devices, tokens], [])
        digest = dict(zip(digests[::2], digests[1::2], strict=True))
        found = []
        for device, pair in zip(times[::2], times[1::2], strict=True):
            created, last_login = (int(part) for part in str(pair).split())
            found.append(DeviceInfo(user, str(device), digest.get(device), created, last_login))
        return sorted(found, key=lambda info: info.device)
