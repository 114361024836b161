"""Wiring: settings -> stores, authenticator, bridge, broker. Used by the CLI and the tests."""

from __future__ import annotations

import logging

from bridge.requests import build_ops
from bridge.service import Bridge
from broker.auth import Authenticator
from broker.config import Settings
from broker.login_guard import LoginGuard
from broker.server import ChatBroker
from broker.users import UserStore, load_or_create_secret

log = logging.getLogger(__name__)


class BrokerApp:
    """One running chat broker. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._users: UserStore | None = None
        self._broker: ChatBroker | None = None

    @property
    def broker(self) -> ChatBroker:
        if self._broker is None:
            raise RuntimeError("the broker is not started")
        return self._broker

    @property
    def users(self) -> UserStore:
        if self._users is None:
            raise RuntimeError("the broker is not started")
        return self._users

    async def start(self) -> None:
        settings = self.settings
        self._users = await UserStore.open(settings.data_path)
        try:
            auth = settings.auth
            authenticator = Authenticator(
                self._users,
                LoginGuard(auth.free_failures, auth.base_delay_s, auth.max_delay_s, auth.forget_after_s),
                load_or_create_secret(settings.data_path),
                auth.hash_concurrency,
            )
            bridge = Bridge(build_ops(authenticator), settings.limits.max_body_bytes, settings.limits.max_request_bytes)
            self._broker = ChatBroker(settings, authenticator, bridge)
            await self._broker.start()
        except BaseException:
            await self._users.close()
            self._users = None
            self._broker = None
            raise

    def addresses(self) -> dict[str, tuple[str, int]]:
        return self.broker.bound_addresses()

    async def stop(self) -> None:
        """Stop accepting, close every session, drain the bridge, close the stores."""
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        if self._users is not None:
            await self._users.close()
            self._users = None
