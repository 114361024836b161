"""A chat device on the lean path with its inbox at QoS 0 that stops reading its socket
(broker/chat_session.py, ``UNREAD_DOWNLINK_MAX`` in broker/downlink.py).

A QoS 0 inbox has no PUBACK for ``limits.max_unacked_downlinks`` to count: before the cap,
every item for such a device was appended to its transport's buffer for as long as it stayed
connected. Now, while its transport has paused writing, the bytes waiting for it stay under
the cap (``limits.max_unread_downlink_bytes``) plus one item, what is not written is counted as
dropped (and logged as a device that does not read, not as one without PUBACK), other devices
are served meanwhile, and the staged items all come, once each and in order, when the device
reads again on a new connection.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop

from testkit.packets import (
    PUBACK,
    PUBLISH,
    Publish,
    RawClient,
    connect_packet,
    parse_publish,
    publish_packet,
    subscribe_packet,
)
from testkit.ws_socket import WsSocket
from tests.deployment import settings_of
from tests.helpers import BrokerThread, eventually
from tests.test_listeners import make_cert

MESSAGES = 200
BODY = 40_000  # characters per message body (limits.max_body_bytes is 65,536): 8 MB in all, over every buffer
OVERRIDES = {
    "delivery.window": MESSAGES + 50,  # every message goes out to the device at once: no ack needed for more
    "limits.send_burst": MESSAGES + 50,  # bob sends them all without being rate limited
    "staging.flush_ms": 0,  # 'sent' once the message is on disk: at once, not after a 50 ms group commit
}
CAP = 512 * 1024  # limits.max_unread_downlink_bytes, not the default 1 MiB: the setting is the one applied
OVERRIDES["limits.max_unread_downlink_bytes"] = CAP


def _online(running: BrokerThread, user: str, keepalive: int = 60, listener: str = "tcp",
            tls: ssl.SSLContext | None = None) -> RawClient:
    """``user``'s device ``{user}.raw``, its inbox subscribed at QoS 0 (the recommended mode)."""
    raw = RawClient(running.address(listener)[1], websocket=listener == "ws")
    if isinstance(raw.sock, socket.socket) and tls is not None:
        raw.sock = tls.wrap_socket(raw.sock, server_hostname="127.0.0.1")
    if isinstance(raw.sock, WsSocket):  # a backlog is one write, so one frame: 8 MB here (websockets' cap: 1 MiB)
        raw.sock.ws.max_size = None
    raw.send(connect_packet(f"{user}.raw", user, f"{user}-pw", keepalive=keepalive))
    assert raw.connack() == 0
    raw.send(subscribe_packet(1, f"u/{user}/in", 0))
    assert raw.suback(1) == [0]
    return raw


def _message(to: str, n: int) -> bytes:
    body = f"{n:05d} " + "x" * BODY
    return json.dumps({"id": f"m{to}{n}", "to": to, "body": body}).encode()


def _items(raw: RawClient, count: int, kind: str = "msg") -> list[dict[str, Any]]:
    """The next ``count`` items of ``kind`` on the inbox (QoS 0: nothing to PUBACK), each staged one acked
    at once; other items and the PUBACKs of the client's own publishes are skipped."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        packet = raw.read_packet()
        if packet.kind == PUBACK:
            continue
        assert packet.kind == PUBLISH, packet
        publish: Publish = parse_publish(packet)
        assert publish.qos == 0
        item = json.loads(publish.payload)
        if "seq" in item:
            ack = json.dumps({"seqs": [item["seq"]]}).encode()
            raw.send(publish_packet(publish.topic.removesuffix("/in") + "/ack", ack))
        if item["kind"] == kind:
            got.append(item)
    return got


def _send(bob: RawClient, to: str, n: int) -> None:
    """bob's message ``n`` to ``to``, once the broker has answered ``sent`` for it: staged and handed on.
    One at a time, so that each reaches the recipient's connection in a loop iteration of its own (a
    burst in one iteration is the bridge's window, written before the transport can pause writing)."""
    bob.send(publish_packet("u/bob/out", _message(to, n), 1, n % 60000 + 1))
    while not any(r["status"] == "sent" and f"m{to}{n}" in r["ids"] for r in _items(bob, 1, "receipt")):
        pass


def _dropped(running: BrokerThread) -> int:
    async def count() -> int:
        return running.app.broker.counters.downlink_dropped
    return running.call(count())


def _sent_to_alice(running: BrokerThread) -> int:
    async def size() -> int:
        lean = running.app.broker.lean
        assert lean is not None
        transport = lean._live["alice.raw"].transport
        assert transport is not None
        return transport.get_write_buffer_size()
    return running.call(size())


@pytest.mark.parametrize("listener", ["tcp", "ws", "tls"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # chat-broker run's; its transports count differently
def test_a_qos0_device_that_does_not_read_is_capped_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop: str, listener: str
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.lean")
    cert, key = make_cert(tmp_path)
    tls = {"listeners.tls": {"bind": "127.0.0.1:0", "certfile": str(cert), "keyfile": str(key)}}
    running = BrokerThread(tmp_path / "data", settings_of("lean-ws", {**OVERRIDES, **tls}),
                           uvloop.new_event_loop() if loop == "uvloop" else None).start()
    context = ssl.create_default_context(cafile=str(cert)) if listener == "tls" else None
    for name in ("alice", "bob", "carol"):
        running.add_user(name, f"{name}-pw")
    clients: list[RawClient] = []
    try:
        # alice never reads (no keepalive: her silence does not close her), carol reads, bob sends.
        alice = _online(running, "alice", keepalive=0, listener=listener, tls=context)
        alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        clients.append(alice)
        carol = _online(running, "carol")
        bob = _online(running, "bob")
        clients += [carol, bob]
        for n in range(MESSAGES):
            _send(bob, "alice", n)
        eventually(lambda: _dropped(running) > 0, what="downlinks to alice past the cap counted as dropped")
        item = len(_message("alice", 0)) + 1024  # one more item (its envelope, seq, ts, ...) may pass the check
        assert _sent_to_alice(running) <= CAP + item

        for n in range(5):  # a device that reads is served meanwhile
            _send(bob, "carol", n)
        assert [m["body"][:5] for m in _items(carol, 5)] == [f"{n:05d}" for n in range(5)]
        assert _sent_to_alice(running) <= CAP + item

        warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alice.raw ")]
        assert len(warnings) == 1 and "does not read" in warnings[0], warnings

        alice.abort()  # she comes back on a new connection and reads: every message, once, in order
        again = _online(running, "alice", listener=listener, tls=context)
        clients.append(again)
        bodies = [m["body"][:5] for m in _items(again, MESSAGES)]
        assert bodies == [f"{n:05d}" for n in range(MESSAGES)]
    finally:
        for client in clients:
            client.close()
        running.stop()
