"""The plain-amqtt baseline: stock ``amqtt.broker.Broker`` 0.12.1, anonymous auth plugin only.

    python -m bench.amqtt_plain --port 1883

No topic plugin (every topic allowed), no ``$SYS``, no event/packet logger, no
bridge: per-user topics are routed by amqtt's own broadcast loop, which is what
an application built on plain amqtt gets. Runs on uvloop like the chat broker's
CLI. Prints ``amqtt ready: tcp=HOST:PORT`` once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

READY = "amqtt ready:"


async def serve(host: str, port: int) -> int:
    from amqtt.broker import Broker  # noqa: PLC0415 (slow import, after argument parsing)

    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY} tcp={host}:{port}", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqtt_plain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(serve(args.host, args.port))
    return uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
