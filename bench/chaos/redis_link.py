"""One broker node's link to Redis, made breakable: a TCP proxy per Redis node, and the node run through them.

A cluster client learns the Redis nodes' addresses from ``CLUSTER SLOTS``, so a proxy in front of the
startup address alone would not cut it off. ``python -m bench.chaos.redis_link run ...`` is
``python -m chatserver run ...`` with every redis-py connection it opens (the cluster client's and the
nudge subscriber's) sent to the proxy of the Redis port it asked for, as ``REMAP_ENV`` maps them
(``"7001=41001,7002=41002"``): the broker's code runs unchanged, only its sockets take the detour.
The other nodes talk to Redis directly, so ``TcpProxy.cut()`` cuts one node off and nobody else.

``testkit.proxy.TcpProxy`` is the proxy: ``cut("refuse")`` or ``cut("blackhole")``, then ``restore()``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

REMAP_ENV = "CHAT_CHAOS_REDIS_VIA"


def remap(text: str) -> dict[int, int]:
    """``"7001=41001,7002=41002"`` -> ``{7001: 41001, 7002: 41002}``."""
    return {int(a): int(b) for a, b in (pair.split("=") for pair in text.split(",") if pair)}


@contextlib.contextmanager
def redis_via(ports: dict[int, int]) -> Iterator[None]:
    """Meanwhile every redis-py asyncio connection made to 127.0.0.1:<p> goes to 127.0.0.1:<ports[p]> instead."""
    from redis.asyncio.connection import Connection  # noqa: PLC0415 (only the proxied node needs it)

    original = Connection.__init__

    def init(self: Connection, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.port = ports.get(int(self.port), self.port)  # the cluster client still names the node by its own port

    Connection.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        Connection.__init__ = original  # type: ignore[method-assign]


def main() -> int:
    from chatserver.cli import main as chatserver  # noqa: PLC0415

    with redis_via(remap(os.environ.get(REMAP_ENV, ""))):
        return chatserver(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
