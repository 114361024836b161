"""Test helpers: a real broker on 127.0.0.1:0 in a background thread, and paho clients.

The broker runs in its own thread with its own event loop, exactly as in
production (same ChatBroker, same sockets); tests talk to it only over TCP.
``BrokerThread.call`` runs a coroutine on the broker's loop for set-up (users)
and for inspecting internals in the amqtt-fault tests.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker import credentials
from chatserver.app import BrokerApp
from chatserver.config import Settings, build_settings

T = TypeVar("T")
WAIT_S = 10.0
ROOT = Path(__file__).resolve().parents[1]


class BrokerThread:
    def __init__(self, data_dir: Path, overrides: dict[str, Any] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the event loop to run on (default a new asyncio one; ``chat-broker run`` uses uvloop's)."""
        config: dict[str, Any] = {"data_dir": str(data_dir), "listeners": {"tcp": {"bind": "127.0.0.1:0"}}}
        for key, value in (overrides or {}).items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        self.settings: Settings = build_settings(config)
        self.loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker", daemon=True)
        self.app = BrokerApp(self.settings)

    def start(self) -> BrokerThread:
        self._thread.start()
        self.call(self.app.start())
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def port(self) -> int:
        return self.address("tcp")[1]

    def address(self, listener: str) -> tuple[str, int]:
        return self.call(_addresses(self.app))[listener]

    def add_user(self, name: str, password: str) -> None:
        self.call(self.app.users.add_user(name, credentials.hash_password(password)))

    def stop(self) -> None:
        try:
            self.call(self.app.stop(), timeout=30)
        except TimeoutError:
            self.dump_tasks()
            raise
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


    def dump_tasks(self) -> None:
        """Print every pending task of the broker loop (a hung shutdown shows where it waits)."""
        import io  # noqa: PLC0415
        import sys  # noqa: PLC0415

        for task in asyncio.all_tasks(self.loop):
            buffer = io.StringIO()
            task.print_stack(file=buffer)
            print(f"--- {task!r}\n{buffer.getvalue()}", file=sys.stderr)


    def add_users(self, passwords: dict[str, str]) -> None:
        for name, password in passwords.items():
            self.add_user(name, password)


class BrokerProcess:
    """The broker as its own process (``python -m chatserver run``), exactly as an operator runs it.

    Same face as ``BrokerThread`` for the tests that need no internals: ``port``, ``add_users``, ``stop``.
    """

    def __init__(self, data_dir: Path, overrides: dict[str, Any] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args  # more ``run`` flags, e.g. ("--workers", "2")
        self.config = data_dir.parent / f"{data_dir.name}.yaml"
        config: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.ports: dict[str, int] = {}  # listener (and "metrics") -> port, from the ready line

    def start(self) -> BrokerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatserver", "run", "-c", str(self.config), "--bind", "127.0.0.1:0",
             "--data-dir", str(self.data_dir), *self.extra_args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        ready: queue.Queue[str] = queue.Queue()

        def watch(stream: Any) -> None:
            for line in stream:
                if line.startswith("chat-broker ready"):
                    ready.put(line)

        threading.Thread(target=watch, args=(self.proc.stdout,), daemon=True).start()
        try:
            line = ready.get(timeout=30)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("the broker process did not become ready within 30 s") from None
        self.port = int(re.search(r"tcp=[^ ]+:(\d+)", line).group(1))  # type: ignore[union-attr]
        self.ports = {name: int(port) for name, port in re.findall(r"(\w+)=\S+:(\d+)", line)}
        return self

    def add_users(self, passwords: dict[str, str]) -> None:
        lines = "".join(f"{name}:{password}\n" for name, password in passwords.items())
        subprocess.run([sys.executable, "-m", "chatserver", "user", "import", "-", "--data-dir", str(self.data_dir)],
                       input=lines, text=True, check=True, cwd=ROOT, capture_output=True, timeout=120)

    def add_user(self, name: str, password: str) -> None:
        self.add_users({name: password})

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the broker did not stop within 30 s of SIGTERM") from None
        assert code == 0, f"the broker exited with {code}"


async def _addresses(app: BrokerApp) -> dict[str, tuple[str, int]]:
    return app.addresses()


WEBSOCKET_FOR: dict[int, int] = {}
"""A ``lean-ws`` deployment's tcp port -> its ws port: a Peer made for that tcp port connects over WebSocket
(tests/deployment.py), so the chat suites run over ws unchanged; raw-packet clients stay on tcp."""


class Peer:
    """A paho client that records what arrives, for tests."""

    def __init__(
        self, port: int, user: str | None, password: str | None, device: str = "phone",
        client_id: str | None = None, clean_session: bool = True, keepalive: int = 60,
        host: str = "127.0.0.1", transport: str = "tcp",
    ) -> None:
        if transport == "tcp" and port in WEBSOCKET_FOR:
            port, transport = WEBSOCKET_FOR[port], "websockets"
        self.user = user
        self.client_id = client_id if client_id is not None else f"{user}.{device}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean_session,
            transport=transport,  # type: ignore[arg-type]
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if user is not None:
            self.client.username_pw_set(user, password)
        self.host, self.port, self.keepalive = host, port, keepalive
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_open = _no_delay

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack.put(int(reason.value) if hasattr(reason, "value") else int(reason))

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks.put([int(c.value) for c in codes])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.disconnected.set()

    def connect(self) -> int:
        """Connect and return the CONNACK code (0 = accepted); the network loop keeps running."""
        self.client.reconnect_delay_set(60, 120)  # tests decide when to reconnect
        self.client.connect(self.host, self.port, self.keepalive)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=WAIT_S)
        except queue.Empty:
            return -1

    def subscribe(self, topic: str | None = None) -> list[int]:
        self.client.subscribe(topic or f"u/{self.user}/in", qos=1)
        return self.subacks.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], retain: bool = False) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)

    def request(self, op: str, args: dict[str, Any] | None = None, rid: str | None = None) -> dict[str, Any]:
        rid = rid or uuid.uuid4().hex[:12]
        body: dict[str, Any] = {"rid": rid, "op": op}
        if args is not None:
            body["args"] = args
        self.publish(f"u/{self.user}/req", body)
        return self.expect(lambda item: item.get("kind") == "res" and item.get("rid") == rid)

    def items(self, timeout: float = WAIT_S) -> dict[str, Any]:
        _topic, payload, _ = self.messages.get(timeout=timeout)
        return dict(json.loads(payload))

    def expect(self, predicate: Any, timeout: float = WAIT_S) -> dict[str, Any]:
        """The first arriving item matching ``predicate`` (others are discarded)."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    item = self.items(timeout=0.2)
                except queue.Empty:
                    continue
                if predicate(item):
                    return item
        finally:
            timer.cancel()
        raise AssertionError(f"{self.client_id}: no matching item within {timeout}s")

    def nothing_arrives(self, within: float = 1.0) -> bool:
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def online_peer(port: int, made: list[Peer], user: str, device: str = "phone") -> Peer:
    """``user``'s device (password ``{user}-pw``) connected and subscribed; ``made`` collects it to close."""
    peer = Peer(port, user, f"{user}-pw", device=device)
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def register_offline(port: int, user: str, device: str = "phone") -> None:
    """A first login makes the device known (a target of messages); then it goes offline."""
    peer = Peer(port, user, f"{user}-pw", device=device)
    try:
        assert peer.connect() == 0
    finally:
        peer.close()


def eventually(check: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    """Wait (polling) until ``check()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not reached within {timeout}s")


def is_text(value: Any) -> bool:
    """False if a string or key in ``value`` holds a lone surrogate (no UTF-8): refused as bad_json."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def connack_code(client: mqtt.Client, port: int, bind_address: str = "") -> int:
    """One CONNECT with a prepared paho client, driven in this thread; paho's CONNACK reason code value.

    Driving paho's loop here (no network thread) avoids paho's reconnect wait when a refused client is closed.
    ``bind_address``: the client's source address (127.0.0.2 and up are loopback too).
    """
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.append(int(reason.value))
    client.connect("127.0.0.1", port, 60, bind_address=bind_address)
    deadline = time.monotonic() + WAIT_S
    try:
        while not codes:
            assert time.monotonic() < deadline, "no CONNACK"
            client.loop(timeout=0.05)
    finally:
        client.disconnect()
        client.loop(timeout=0.01)
    return codes[0]


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """paho leaves Nagle on: a PUBACK then an ack publish would wait for a delayed TCP ACK (~40 ms)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
