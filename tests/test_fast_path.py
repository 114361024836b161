"""The task-free chat path (broker/downlink.py, ChatProtocolHandler.handle_publish) over a
raw socket: PUBACKs in the order of the PUBLISHes [MQTT-4.6.0-2], downlink items in call
order with packet ids never reused while in flight [MQTT-2.3.1-2], an unacked
downlink (no PUBACK) does not stop later items, and a connection that leaves
``limits.max_unacked_downlinks`` unacknowledged is sent no more until it acknowledges,
without losing a staged item."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from broker.downlink import WRITE_BUFFER_HIGH
from testkit.packets import (
    PUBACK,
    PUBLISH,
    Publish,
    RawClient,
    ack_packet,
    connect_packet,
    parse_publish,
    publish_packet,
    subscribe_packet,
)
from tests.deployment import settings_of
from tests.helpers import BrokerThread, eventually

REQUESTS = 40
DEPLOYMENTS = ("single", "amqtt-path")  # tests/conftest.py: the lean path, and amqtt's


def _online(broker: BrokerThread, user: str = "alice") -> RawClient:
    raw = RawClient(broker.port)
    raw.send(connect_packet(f"{user}.raw", user, f"{user}-pw"))
    assert raw.connack() == 0
    raw.send(subscribe_packet(1, f"u/{user}/in", 1))
    assert raw.suback(1) == [1]
    return raw


def _pings(first_id: int) -> bytes:
    return b"".join(
        publish_packet("u/alice/req", json.dumps({"rid": f"r{n}", "op": "ping"}).encode(), 1, first_id + n)
        for n in range(REQUESTS)
    )


def _publishes(raw: RawClient, count: int) -> list[Publish]:
    """The next ``count`` PUBLISHes, not acknowledged; the PUBACKs of our own publishes are skipped."""
    got: list[Publish] = []
    while len(got) < count:
        packet = raw.read_packet()
        if packet.kind == PUBLISH:
            got.append(parse_publish(packet))
        else:
            assert packet.kind == PUBACK
    return got


def test_pubacks_and_answers_keep_their_order(broker: BrokerThread) -> None:
    raw = _online(broker)
    try:
        raw.send(_pings(100))  # pipelined: one segment, forty PUBLISHes
        acks: list[int] = []
        answers: list[str] = []
        packet_ids: set[int] = set()
        while len(acks) < REQUESTS or len(answers) < REQUESTS:
            got = raw.read_packet()
            if got.kind == PUBACK:
                acks.append(got.packet_id)
            else:
                assert got.kind == PUBLISH
                publish = parse_publish(got)
                assert publish.topic == "u/alice/in" and publish.qos == 1 and publish.packet_id is not None
                answers.append(json.loads(publish.payload)["rid"])
                packet_ids.add(publish.packet_id)
        assert acks == list(range(100, 100 + REQUESTS))
        assert answers == [f"r{n}" for n in range(REQUESTS)]
        assert len(packet_ids) == REQUESTS  # none acknowledged yet: every id distinct
    finally:
        raw.close()


def test_unacked_downlink_ids_are_not_reused(broker: BrokerThread) -> None:
    raw = _online(broker)
    try:
        raw.send(_pings(1))
        first = _publishes(raw, REQUESTS)  # no PUBACK: all forty stay in flight
        in_flight = {p.packet_id for p in first}
        assert len(in_flight) == REQUESTS
        raw.send(_pings(1000))
        again = {p.packet_id for p in _publishes(raw, REQUESTS)}
        assert not again & in_flight, "a packet id still in flight was handed out again"
        for packet_id in in_flight:  # late PUBACKs free the ids and are not an error
            raw.send(ack_packet(PUBACK, packet_id))
        raw.send(publish_packet("u/alice/req", b'{"rid":"last","op":"ping"}', 1, 7))
        while b'"last"' not in _publishes(raw, 1)[0].payload:
            pass
    finally:
        raw.close()


def _started(tmp_path: Path, deployment: str, overrides: dict[str, Any]) -> BrokerThread:
    running = BrokerThread(tmp_path / "data", settings_of(deployment, overrides)).start()
    running.add_user("alice", "alice-pw")
    return running


def test_a_fast_publisher_is_paced_not_refused(tmp_path: Path, deployment: str) -> None:
    """limits.publishes_per_s: past the burst the broker reads the connection at the rate (TCP
    backpressure); every publish is still read and answered, in order."""
    running = _started(tmp_path, deployment, {"limits.publishes_per_s": 50.0, "limits.publish_burst": 10})
    raw = _online(running)
    try:
        began = time.monotonic()
        raw.send(_pings(100))
        answers = [json.loads(p.payload)["rid"] for p in _publishes(raw, REQUESTS)]
        assert answers == [f"r{n}" for n in range(REQUESTS)]
        assert time.monotonic() - began >= (REQUESTS - 10) / 50 * 0.9, "read at the rate after the burst"
    finally:
        raw.close()
        running.stop()


def test_a_client_that_does_not_read_is_not_read(tmp_path: Path, deployment: str) -> None:
    """The chat paths write without awaiting a drain: a client that publishes and never reads
    must not make the broker buffer its answers without bound (broker/downlink.py WRITE_BUFFER_HIGH)."""
    running = _started(tmp_path, deployment, {"limits.publishes_per_s": 0})
    raw = _online(running)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        ping = publish_packet("u/alice/req", b'{"rid":"' + b"x" * 40 + b'","op":"ping"}', 1, 1)
        raw.sock.settimeout(0.5)
        sent = 0
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while sent < 200_000:  # the broker stops reading us: our sends block, then time out
                raw.sock.sendall(ping * 100)
                sent += 100

        def buffered() -> int:
            async def size() -> int:
                chat = running.app.broker
                if chat.lean is not None:  # broker/chat_session.py: the session's own transport
                    return int(chat.lean._live["alice.raw"].transport.get_write_buffer_size())
                _, handler = chat.sessions["alice.raw"]
                return int(handler.writer._writer.transport.get_write_buffer_size())
            return running.call(size())

        assert sent < 200_000, "the broker kept reading a client that reads nothing"
        assert buffered() <= WRITE_BUFFER_HIGH + 1024 * 1024, buffered()
    finally:
        raw.abort()
        running.stop()


def _dropped(running: BrokerThread) -> int:
    async def count() -> int:
        return running.app.broker.counters.downlink_dropped
    return running.call(count())


def test_a_client_that_never_pubacks_is_capped(tmp_path: Path, deployment: str) -> None:
    """Answers beyond the cap are not written (best effort, counted); acknowledging lets them flow again.
    Before the cap a client that never PUBACKed made each further item search 65,535 packet ids."""
    running = _started(tmp_path, deployment, {"limits.max_unacked_downlinks": 30})
    raw = _online(running)
    try:
        raw.send(_pings(100))  # forty requests, no PUBACK for their answers
        first = _publishes(raw, 30)
        eventually(lambda: _dropped(running) == REQUESTS - 30, what="the answers past the cap counted as dropped")
        for publish in first:
            assert publish.packet_id is not None
            raw.send(ack_packet(PUBACK, publish.packet_id))
        raw.send(publish_packet("u/alice/req", b'{"rid":"last","op":"ping"}', 1, 7))
        (answer,) = _publishes(raw, 1)  # nothing else was written after the thirty
        assert json.loads(answer.payload)["rid"] == "last"
    finally:
        raw.close()
        running.stop()


def test_staged_items_past_the_cap_are_redelivered(tmp_path: Path, deployment: str) -> None:
    """A recipient over the cap loses nothing: the items not written stay staged, come again, in order.
    (bob never PUBACKs either: seven of his twelve 'sent' receipts are not written.)"""
    running = _started(tmp_path, deployment, {"limits.max_unacked_downlinks": 5, "delivery.window": 3,
                                  "delivery.redeliver_after_s": 0.3})
    running.add_user("bob", "bob-pw")
    alice, bob = _online(running), _online(running, "bob")
    try:
        for n in range(12):
            body = json.dumps({"id": f"m{n}", "to": "alice", "body": f"hello {n}"}).encode()
            bob.send(publish_packet("u/bob/out", body, 1, 100 + n))
        first_seen: list[str] = []

        def take(acknowledge: bool) -> None:
            publish = _publishes(alice, 1)[0]
            item = json.loads(publish.payload)
            if item["body"] not in first_seen:
                first_seen.append(item["body"])
            if acknowledge:
                assert publish.packet_id is not None
                alice.send(ack_packet(PUBACK, publish.packet_id))
                alice.send(publish_packet("u/alice/ack", json.dumps({"seqs": [item["seq"]]}).encode(), 0))

        while _dropped(running) < 12 - 5 + 1:  # bob's 'sent' past the cap, then alice's redeliveries
            take(acknowledge=False)
        while len(first_seen) < 12:  # now a good client: PUBACK and chat ack everything
            take(acknowledge=True)
        assert first_seen == [f"hello {n}" for n in range(12)]
    finally:
        alice.close()
        bob.close()
        running.stop()
