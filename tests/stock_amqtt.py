"""The reference targets of the attack tests: a STOCK amqtt broker, and hand-built MQTT 3.1.1 packets.

``StockBroker`` runs an unmodified ``amqtt.broker.Broker`` on 127.0.0.1:<free port> in a
background thread, like ``tests.helpers.BrokerThread`` does for the ChatBroker. With no
``plugins`` it uses amqtt's default plugin set (anonymous access allowed); the fault tests
run each attack against it to prove the attack really works on amqtt 0.12.1, so the same
test against the ChatBroker would catch a regression of the fix.

``RawClient`` (from testkit/packets.py) speaks MQTT over a bare TCP socket, for what
paho will not do: stay silent after CONNECT, send half a CONNECT, or drop the connection
without DISCONNECT.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from amqtt.broker import Broker
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from testkit.packets import DISCONNECT, PINGREQ, PINGRESP, RawClient, connect_packet, subscribe_packet

T = TypeVar("T")
WAIT_S = 10.0

# --- a stock amqtt broker ------------------------------------------------------------


class StockBroker:
    """``amqtt.broker.Broker`` exactly as shipped; ``plugins`` replaces its default plugin set."""

    def __init__(self, plugins: dict[str, Any] | None = None) -> None:
        self._plugins = plugins
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stock-amqtt", daemon=True)
        self._broker: Broker | None = None

    def start(self) -> StockBroker:
        self._thread.start()
        self._broker = self.call(self._start())
        return self

    async def _start(self) -> Broker:
        config: dict[str, Any] = {"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}}
        if self._plugins is not None:
            config["plugins"] = self._plugins
        broker = Broker(config)  # binds to the running loop: build it on the broker thread
        await broker.start()
        return broker

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the stock broker is not started")
        return self._broker

    @property
    def port(self) -> int:
        return int(self.broker._servers["default"].instance.sockets[0].getsockname()[1])

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        try:
            if self._broker is not None:
                self.call(self._broker.shutdown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A FileAuthPlugin password file; cheap argon2 parameters keep the tests fast."""
    hasher = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
    path.write_text("".join(f"{user}:{hasher.hash(pw)}\n" for user, pw in users.items()), encoding="utf-8")
    return path


def file_auth_plugins(passwords: Path, subscribe_acl: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Stock amqtt with real passwords (FileAuthPlugin) and, optionally, its subscribe ACL."""
    plugins: dict[str, Any] = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwords)}}
    if subscribe_acl is not None:
        # 0.12.1's Config dataclass names the subscribe ACL "acl" (deprecated alias of subscribe-acl).
        plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {"acl": subscribe_acl}
    return plugins


# --- MQTT 3.1.1 packets by hand: testkit/packets.py (re-exported for the tests using them) ---

__all__ = [
    "DISCONNECT", "PINGREQ", "PINGRESP", "RawClient", "StockBroker", "connect_packet", "file_auth_plugins",
    "password_file", "subscribe_packet",
]
