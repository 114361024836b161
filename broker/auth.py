"""Who may connect: CONNECT credentials -> an accept/refuse decision.

Order of checks (each refusal is final and touches no session):
1. a username that is a valid user id (no anonymous access) -> else 0x05;
2. client id ``{username}.{device}`` with a valid device id -> else 0x02;
3. the login throttle for the user and the remote address -> else 0x05, unchecked;
   an attempt let through counts as a failure until it succeeds (``LoginThrottle.begin``),
   so concurrent guesses are throttled exactly like sequential ones;
4. a device token (fast keyed hash) or the password (scrypt in a worker
   thread, at most ``hash_concurrency`` at once) -> else 0x05;
5. a new device only while the user has fewer than ``max_devices`` -> else 0x05
   (not a failed login: it does not count toward the throttle).
Unknown users cost the same scrypt work as known ones, so timing does not
tell which user names exist.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker import credentials
from broker.login_throttle import LoginThrottle
from broker.users import TooManyDevicesError, UserStore
from chatproto import is_user_id, split_client_id

log = logging.getLogger(__name__)

ACCEPTED: Final = 0x00
IDENTIFIER_REJECTED: Final = 0x02
BAD_CREDENTIALS: Final = 0x05



@functools.cache
def _dummy_hash() -> str:
    """A real hash to verify against for unknown users (made once, lazily)."""
    return credentials.hash_password("timing equaliser for unknown users")


@dataclass(frozen=True, slots=True)
class LoginResult:
    code: int
    user: str | None = None
    device: str | None = None
    reason: str = ""
    new_device: bool = False

    @property
    def ok(self) -> bool:
        return self.code == ACCEPTED


class Authenticator:
    """Checks CONNECT credentials and issues/revokes device tokens."""

    def __init__(
        self,
        store: UserStore,
        guard: LoginThrottle,
        server_secret: bytes,
        hash_concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        max_devices: int | None = None,
    ) -> None:
        self._max_devices = max_devices
        self._store = store
        self._guard = guard
        self._secret = server_secret
        self._hash_slots = asyncio.Semaphore(hash_concurrency)
        self._clock = clock
        self.logins: dict[str, int] = {}  # result -> count (broker.counters.LOGIN_RESULTS), for the metrics

    async def login(
        self, username: str | None, password: bytes | str | None, client_id: str, address: str
    ) -> LoginResult:
        if username is None or not is_user_id(username):
            # Not logged: a malformed user name is often a password typed into the wrong field.
            return self._refuse(BAD_CREDENTIALS, "missing or malformed username", None, address, "bad_username")
        parts = split_client_id(client_id)
        if parts is None or parts[0] != username:
            return self._refuse(
                IDENTIFIER_REJECTED, f"client id {client_id!r} is not '{username}.<device>'", username, address,
                "bad_client_id",
            )
        device = parts[1]
        keys = [f"user:{username}", f"addr:{address}"]
        secret = _as_text(password)
        # A valid device token logs in even while the user or address is throttled (found by tests/chaos:
        # a stranger's bad passwords locked the user's own devices out, and the SDK gives up on a refused
        # reconnect). The throttle is there to make password guessing slow; a token is 256 random bits,
        # cheap to check, and its success leaves the throttle as it is.
        is_token = secret is not None and credentials.looks_like_token(secret)
        if is_token and await self._token_ok(username, device, secret):  # type: ignore[arg-type]  # not None here
            # A known device (its token matched): only its last-login time to note, no device to add.
            await self._store.touch_login(username, device)
            return self._accepted(username, device, "device token", False)
        wait = await self._guard.begin(keys, self._clock())
        if wait > 0:
            return self._refuse(BAD_CREDENTIALS, f"throttled for {wait:.1f}s after failed logins", username, address,
                                "throttled")
        if secret is None:
            return await self._fail(keys, "no password", username, address)
        if await self._password_ok(username, secret):
            return await self._accept(username, device, keys, "password", address)
        return await self._fail(keys, "wrong password or token", username, address)

    async def device_token_ok(self, client_id: str, token: str) -> tuple[str, str] | None:
        """``(user, device)`` if ``token`` is the device token of ``client_id``, else None. A check
        alone (no throttle, no login recorded): for the media endpoint, authenticated per request."""
        parts = split_client_id(client_id)
        if parts is None or not credentials.looks_like_token(token) or not await self._token_ok(*parts, token):
            return None
        return parts

    async def _token_ok(self, user: str, device: str, token: str) -> bool:
        info = await self._store.device(user, device)
        if info is None or info.token_digest is None:
            return False
        return credentials.token_matches(self._secret, user, device, token, info.token_digest)

    async def _password_ok(self, user: str, password: str) -> bool:
        stored = await self._store.password_hash(user)
        async with self._hash_slots:
            ok = await asyncio.to_thread(credentials.verify_password, password, stored or _dummy_hash())
        return ok and stored is not None

    async def _accept(self, user: str, device: str, keys: list[str], how: str, address: str) -> LoginResult:
        """A password login: the throttle's keys released, the device added if it is new (the device limit)."""
        # The address keeps its earlier failures (one good account must not unlock guessing);
        # only this attempt's reserved failure is taken back.
        await self._guard.succeeded(keys[:1], keys[1:])
        try:
            new_device = await self._store.record_login(user, device, self._max_devices)
        except TooManyDevicesError as exc:
            return self._refuse(BAD_CREDENTIALS, f"new device {device!r} refused: {exc}; remove one first",
                                user, address, "too_many_devices")
        return self._accepted(user, device, how, new_device)

    def _accepted(self, user: str, device: str, how: str, new_device: bool) -> LoginResult:
        self.count("ok")
        log.info("login ok: %s.%s by %s%s", user, device, how, " (new device)" if new_device else "")
        return LoginResult(ACCEPTED, user, device, how, new_device)

    async def _fail(self, keys: list[str], reason: str, user: str, address: str) -> LoginResult:
        wait = await self._guard.retry_after(keys, self._clock())  # the failure was counted by ``begin``
        suffix = f"; further attempts refused for {wait:.1f}s" if wait > 0 else ""
        self.count("bad_password")
        log.warning("login failed: user %r from %s: %s%s", user, address, reason, suffix)
        return LoginResult(BAD_CREDENTIALS, user, None, reason)

    def _refuse(self, code: int, reason: str, user: str | None, address: str, result: str) -> LoginResult:
        self.count(result)
        log.warning("login refused: user %r from %s: %s", user, address, reason)
        return LoginResult(code, user, None, reason)

    def count(self, result: str) -> None:
        """One login attempt ended with ``result`` (one of ``broker.counters.LOGIN_RESULTS``)."""
        self.logins[result] = self.logins.get(result, 0) + 1

    async def issue_token(self, user: str, device: str) -> str:
        """A new device token for ``user.device``, replacing any previous one."""
        token = credentials.new_device_token()
        await self._store.set_token_digest(user, device, credentials.token_digest(self._secret, user, device, token))
        log.info("device token issued for %s.%s", user, device)
        return token

    async def revoke_tokens(self, user: str, device: str | None) -> int:
        count = await self._store.revoke_tokens(user, device)
        log.info("device token(s) revoked for %s.%s: %d", user, device or "*", count)
        return count


def _as_text(password: bytes | str | None) -> str | None:
    if password is None:
        return None
    if isinstance(password, str):
        return password
    try:
        return password.decode("utf-8")
    except UnicodeDecodeError:
        return None
