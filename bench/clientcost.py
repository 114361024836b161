"""Which client should the load generator use? paho-mqtt in threads, or asyncio protocol clients.

    python -m bench clientcost            # via the suite (writes bench/results/clientcost.*)
    python -m bench.clientcost --child paho --port 1883 --pairs 20 --seconds 5   # one measurement, JSON out

Both generate the same traffic through mosquitto (a C broker, so that the broker
is not what is measured): ``pairs`` sender/recipient pairs, plain MQTT, the
recipient's own topic, QoS 1, each pair keeping 4 messages on the way. Each
client runs in a child process of its own, which reports its CPU time per
delivered message and its memory per connection.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchError, rss_kib
from bench.conn import message_parts
from bench.loadgen import Worker
from bench.targets import MosquittoServer

INFLIGHT = 4
SIZES = {"full": (50, 8.0), "quick": (50, 5.0), "tiny": (4, 1.0)}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    import os  # noqa: PLC0415

    return rss_kib(os.getpid()) or 0


def child_paho(port: int, pairs: int, seconds: float) -> dict[str, Any]:
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    rss_before = _rss()
    clients: list[mqtt.Client] = []
    delivered = [0]
    running = [True]
    lock = threading.Lock()
    subscribed = threading.Semaphore(0)

    def make(name: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        client.connect("127.0.0.1", port, keepalive=60)
        clients.append(client)
        return client

    for index in range(pairs):
        sender, recipient = make(f"cs{index}"), make(f"cr{index}")
        topic, prefix, suffix = message_parts("mqtt", f"cs{index}", f"cr{index}", 100)
        counter = [0]

        def send(sender: mqtt.Client = sender, topic: bytes = topic, prefix: bytes = prefix,
                 suffix: bytes = suffix, counter: list[int] = counter) -> None:
            counter[0] += 1
            sender.publish(topic.decode(), prefix + str(counter[0]).encode() + suffix, qos=1)

        def on_message(client: Any, userdata: Any, message: Any, send: Callable[[], None] = send) -> None:
            with lock:
                delivered[0] += 1
            if running[0]:
                send()

        def on_subscribe(client: Any, *args: Any) -> None:
            subscribed.release()

        recipient.on_message = on_message
        recipient.on_subscribe = on_subscribe
        recipient.subscribe(f"bench/cr{index}", qos=1)
        for client in (sender, recipient):
            client.loop_start()
        sender.user_data_set(send)
    for _ in range(pairs):
        if not subscribed.acquire(timeout=30):
            raise BenchError("paho: subscriptions not acknowledged")
    rss_connected = _rss()
    cpu0, t0 = _cpu(), time.monotonic()
    for index in range(pairs):
        send_first = clients[2 * index]._userdata
        for _ in range(INFLIGHT):
            send_first()
    time.sleep(seconds)
    running[0] = False
    count, cpu1, t1 = delivered[0], _cpu(), time.monotonic()
    for client in clients:
        client.disconnect()
        client.loop_stop()
    return _figures("paho-mqtt (loop_start thread per client)", 2 * pairs, count, t1 - t0, cpu1 - cpu0,
                    rss_connected - rss_before)


def child_asyncio(port: int, pairs: int, seconds: float) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        worker = Worker(None, 0)  # type: ignore[arg-type]  # no pipe: driven directly, no progress
        rss_before = _rss()
        await worker.cmd_connect_pairs("mqtt", "127.0.0.1", port, [(f"as{i}", f"ar{i}") for i in range(pairs)],
                                       "127.0.0.1", 100, 60)
        rss_connected = _rss()
        cpu0, t0 = _cpu(), time.monotonic()
        result = await worker.cmd_run_pairs("max", 0.0, seconds, INFLIGHT, drain_s=5.0)
        cpu1, t1 = _cpu(), time.monotonic()
        await worker.cmd_close_all()
        return _figures("asyncio protocol (bench.loadgen, uvloop)", 2 * pairs, result["published"], t1 - t0,
                        cpu1 - cpu0, rss_connected - rss_before)

    import uvloop  # noqa: PLC0415

    return uvloop.run(main())


def _figures(client: str, connections: int, messages: int, seconds: float, cpu: float, rss: int) -> dict[str, Any]:
    return {"client": client, "connections": connections, "messages": messages, "seconds": round(seconds, 2),
            "msgs_per_s": round(messages / seconds, 1), "cpu_s": round(cpu, 3),
            "cpu_us_per_msg": round(cpu / max(messages, 1) * 1e6, 1),
            "rss_kib_per_connection": round(rss / connections, 1)}


def run(size: str, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    pairs, seconds = SIZES[size]
    server = MosquittoServer(workdir)
    log("[clientcost] mosquitto: starting ...")
    server.start()
    runs = []
    try:
        for child in ("paho", "asyncio"):
            log(f"  {child}: {pairs} pairs for {seconds:.0f} s ...")
            done = subprocess.run([sys.executable, "-m", "bench.clientcost", "--child", child, "--port",
                                   str(server.port), "--pairs", str(pairs), "--seconds", str(seconds)],
                                  cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise BenchError(f"clientcost {child} failed: {done.stderr.strip()[-2000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(figures)
            log(f"    {figures['msgs_per_s']:,.0f} msg/s, {figures['cpu_us_per_msg']:.0f} µs CPU per message,"
                f" {figures['rss_kib_per_connection']:.0f} KiB per connection")
    finally:
        server.stop()
    return {"pairs": pairs, "inflight": INFLIGHT, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clientcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["paho", "asyncio"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    measure = child_paho if args.child == "paho" else child_asyncio
    print(json.dumps(measure(args.port, args.pairs, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
