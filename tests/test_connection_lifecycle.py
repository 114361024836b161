"""A connection's life on the ChatBroker, over real sockets: takeover by a second login of
the same device, keepalive enforcement, the CONNECT deadline, and what the bridge knows
about a device after it leaves (cleanly or not)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.lazy_queue import LazyEvent
from tests.deployment import settings_of
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually
from tests.stock_amqtt import PINGREQ, PINGRESP, RawClient, connect_packet, subscribe_packet

T = TypeVar("T")
DEPLOYMENTS = ("single", "amqtt-path", "lean-ws")  # tests/conftest.py: lean over tcp and ws, amqtt's


def inspect(broker: BrokerThread, fn: Callable[[Any], T]) -> T:
    """Run ``fn(chat_broker)`` on the broker's own event loop."""

    async def run() -> T:
        return fn(broker.app.broker)

    return broker.call(run())



def linked(broker: BrokerThread, client_id: str) -> bool:
    """The bridge holds a link to this device (it subscribed to its inbox and is connected)."""
    return inspect(broker, lambda b: b.bridge.links.get(client_id) is not None)


def raw_login(port: int, raws: list[RawClient], device: str, keepalive: int, **kw: Any) -> RawClient:
    raw = RawClient(port)
    raws.append(raw)
    raw.send(connect_packet(f"alice.{device}", "alice", "alice-pw", keepalive=keepalive, **kw))
    assert raw.connack() == 0
    return raw


# --- takeover ----------------------------------------------------------------------------


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean_session=1", "clean_session=0"])
def test_second_login_takes_over(broker: BrokerThread, peers: list[Peer], clean_session: bool) -> None:
    """A second good login of the same device closes the first connection (MQTT 3.1.1
    section 3.1.4, MQTT-3.1.4-2) and the new one is served; the bridge links the new one only."""
    old = Peer(broker.port, "alice", "alice-pw", clean_session=clean_session)
    old.client._reconnect_on_failure = False  # paho has no setter; Peer does not pass the constructor flag
    peers.append(old)
    assert old.connect() == 0
    assert old.subscribe() == [1]
    assert old.request("ping")["ok"] is True
    old_link = inspect(broker, lambda b: b.bridge.links.get("alice.phone"))

    new = Peer(broker.port, "alice", "alice-pw", clean_session=clean_session)
    peers.append(new)
    assert new.connect() == 0
    assert old.disconnected.wait(WAIT_S), "the old connection is closed"
    assert new.subscribe() == [1]
    assert new.request("ping")["ok"] is True

    link = inspect(broker, lambda b: b.bridge.links.get("alice.phone"))
    assert link is not None and link is not old_link
    assert inspect(broker, lambda b: len(b.bridge.links.of_user("alice"))) == 1
    assert old.messages.empty(), "nothing meant for the new connection reached the old one"


def test_session_present_resumes_without_resubscribe(broker: BrokerThread, peers: list[Peer]) -> None:
    """A device that reconnects with clean_session=0 and gets "session present" is served
    without subscribing again: its subscription is part of the session (MQTT 3.1.1
    section 3.1.2.4, MQTT-3.1.2-4; section 3.2.2.2, MQTT-3.2.2-2)."""
    first = Peer(broker.port, "alice", "alice-pw", clean_session=False)
    peers.append(first)
    assert first.connect() == 0
    assert first.subscribe() == [1]
    first.close()
    eventually(lambda: not linked(broker, "alice.phone"), what="first connection gone")

    again = Peer(broker.port, "alice", "alice-pw", clean_session=False)
    peers.append(again)
    session_present = threading.Event()
    record_connack = again.client.on_connect

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if flags.session_present:
            session_present.set()
        record_connack(client, userdata, flags, reason, props)

    again.client.on_connect = on_connect
    assert again.connect() == 0
    assert session_present.is_set()
    assert again.request("ping")["ok"] is True  # no SUBSCRIBE sent on this connection


# --- what an idle connection holds (bench/results/probe-memory.md) ----------------------------


def test_an_idle_chat_connection_holds_no_spare_parts(broker: BrokerThread, peers: list[Peer],
                                                     deployment: str) -> None:
    """At 10,000 idle phones every part counts: after login and SUBSCRIBE, with nothing pending, the
    connection waits for its next packet in four coroutine frames (amqtt's loop: eleven) and holds
    no finished handler task, no empty deque (events, drain waiters, the bridge's send queue) and
    no transitions.Machine."""
    peer = Peer(broker.port, "alice", "alice-pw")
    peers.append(peer)
    assert peer.connect() == 0 and peer.subscribe() == [1]
    eventually(lambda: linked(broker, "alice.phone"), what="inbox linked")
    if deployment != "amqtt-path":  # chat sessions on the lean path
        assert inspect(broker, lean_footprint) == {
            "session": "ChatSession", "timers": [None, None], "buffered": 0, "unacked": 0, "holds": 0,
            "send queue": None, "tasks": [],
        }
        return

    def footprint(b: Any) -> dict[str, Any]:
        session, handler = b.sessions["alice.phone"]
        frames, waiting = 0, handler._reader_task.get_coro()
        while hasattr(waiting, "cr_await"):  # down the chain of suspended coroutines to the future
            frames, waiting = frames + 1, waiting.cr_await
        protocol = handler.writer._writer._protocol  # amqtt's adapter -> asyncio's StreamWriter -> protocol
        return {
            "reader frames": frames,
            "packet tasks": handler._packet_tasks,
            "event deques": [e for e in ("_reader_ready", "_reader_stopped")
                             if not isinstance(vars(handler)[e], LazyEvent) or vars(handler)[e]._waiting is not None],
            "drain deque": "_drain_waiters" in vars(protocol),
            "send queue": b.bridge.messaging.staging.boxes["alice.phone"].unsent,
            "states": type(session.transitions).__name__,
        }

    assert inspect(broker, footprint) == {
        "reader frames": 4, "packet tasks": None, "event deques": [], "drain deque": False, "send queue": None,
        "states": "SessionStates",
    }


def lean_footprint(b: Any) -> dict[str, Any]:
    """An idle lean chat session (broker/chat_session.py): the protocol object and its core, no task, no timer."""
    session = b.lean._live["alice.phone"]
    return {
        "session": type(session).__name__,
        "timers": [session._flush_at, session._resume],
        "buffered": session.conn.buffered,
        "unacked": session.conn.unacked,
        "holds": session._holds,
        "send queue": b.bridge.messaging.staging.boxes["alice.phone"].unsent,
        "tasks": [t for t in asyncio.all_tasks() if "ChatSession" in repr(t.get_coro()) or "_login" in repr(t)],
    }


# --- keepalive (broker/handler.py) -----------------------------------------------------------


def test_silent_client_is_dropped_after_keepalive(broker: BrokerThread, raws: list[RawClient]) -> None:
    """A client silent for 1.5 x its keepalive is disconnected (MQTT 3.1.1 section 3.1.2.10,
    MQTT-3.1.2-24), taking the abnormal path: the bridge no longer links the device. Its
    will (on u/alice/hb) goes to the bridge (tests/test_presence.py shows the offline state it causes)."""
    raw = raw_login(broker.port, raws, "raw", keepalive=1, will=("u/alice/hb", b'{"state":"away"}', 1, False))
    raw.send(subscribe_packet(1, "u/alice/in"))
    silent_since = time.monotonic()
    assert raw.read_exact(5) == b"\x90\x03\x00\x01\x01"  # SUBACK, QoS 1 granted
    assert linked(broker, "alice.raw")

    assert not raw.closed_within(1.0), "closed before 1.5 x keepalive"
    assert raw.closed_within(5.0 - (time.monotonic() - silent_since)), "still open 5 s after its last packet"
    eventually(lambda: not linked(broker, "alice.raw"), what="bridge link removed")


def test_pinging_client_stays_connected(broker: BrokerThread, raws: list[RawClient]) -> None:
    """PINGREQ every 0.5 s keeps a keepalive=1 connection open well past 1.5 s
    (MQTT 3.1.1 section 3.1.2.10; PINGREQ/PINGRESP sections 3.12, 3.13, MQTT-3.12.4-1)."""
    raw = raw_login(broker.port, raws, "raw", keepalive=1)
    started = time.monotonic()
    while time.monotonic() - started < 3.2:
        raw.send(PINGREQ)
        assert raw.read_exact(2) == PINGRESP
        assert not raw.closed_within(0.5), f"closed {time.monotonic() - started:.1f}s in, while pinging"
    raw.send(PINGREQ)
    assert raw.read_exact(2) == PINGRESP


# --- the CONNECT deadline -----------------------------------------------------------------


# Short, yet long enough for the late login below: on the lean path the deadline runs until the login is
# accepted, and a login there took over 0.5 s on a loaded machine (CI, load 15 on 2 cores).
CONNECT_TIMEOUT_S = 2.0


@pytest.fixture
def quick_broker(tmp_path: Path, deployment: str) -> Iterator[BrokerThread]:
    running = BrokerThread(tmp_path / "data", settings_of(deployment, {"limits.connect_timeout_s": CONNECT_TIMEOUT_S}))
    running.start()
    running.add_user("alice", "alice-pw")
    yield running
    running.stop()


@pytest.mark.parametrize("sent", [b"", connect_packet("alice.phone", "alice", "alice-pw")[:6]],
                         ids=["nothing", "half-a-connect"])
def test_no_connect_is_closed_after_timeout(quick_broker: BrokerThread, raws: list[RawClient], sent: bytes) -> None:
    """A connection that does not complete CONNECT within limits.connect_timeout_s is closed.

    MQTT 3.1.1 section 3.1 (MQTT-3.1.0-1): the first packet must be CONNECT; the
    non-normative comment in section 3.1.2.10: a server that receives no CONNECT within a
    reasonable time SHOULD close the connection. A client that sends half a CONNECT and
    stalls is held to the same deadline."""
    opened = time.monotonic()  # before connecting: the broker's clock can only start later
    raw = RawClient(quick_broker.port)
    raws.append(raw)
    raw.send(sent)
    assert raw.closed_within(WAIT_S)
    assert CONNECT_TIMEOUT_S - 0.05 <= time.monotonic() - opened < CONNECT_TIMEOUT_S + 4.5
    # The connection slot is given back, and the listener still serves good logins.
    eventually(lambda: inspect(quick_broker, lambda b: b._servers["tcp"].conn_count) == 0, what="slot released")
    late = raw_login(quick_broker.port, raws, "phone", keepalive=60)
    assert not late.closed_within(0.7), "a logged-in connection is not subject to the CONNECT deadline"


# --- leaving --------------------------------------------------------------------------------


def test_clean_disconnect_unlinks_device(broker: BrokerThread, peers: list[Peer]) -> None:
    """DISCONNECT (MQTT 3.1.1 section 3.14) removes the device from the bridge's links."""
    alice = Peer(broker.port, "alice", "alice-pw")
    peers.append(alice)
    assert alice.connect() == 0
    assert alice.subscribe() == [1]
    assert linked(broker, "alice.phone")
    alice.close()
    eventually(lambda: not linked(broker, "alice.phone"), what="bridge link removed")
    assert inspect(broker, lambda b: len(b.bridge.links)) == 0
