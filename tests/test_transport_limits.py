"""The transport under abuse, over real sockets: what a connection may hold of the broker.

- A CONNECT larger than ``mqtt.max_connect_bytes`` (64 KiB) is refused on its fixed header,
  its body never read: 300 connections each declaring a 4 MiB CONNECT took the broker
  from 325 MB to 1.42 GB until the CONNECT deadline.
- A started packet must be complete within ``mqtt.packet_deadline_s``: a client that sends
  part of one and then nothing is closed, not left holding a buffer until its keepalive.
- ``limits.max_unauthenticated_per_address``: one more connection from an address that has
  that many not logged in is closed at once; its logged-in clients are untouched, and a
  slot given back (a login, a close) lets the next one in.
- A client that stopped reading and then closed its side (FIN) is closed promptly, with
  data still waiting to be sent to it: the broker does not wait for the client to read it
  (it stayed CLOSE-WAIT for minutes with megabytes queued).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.packets import RawClient, connect_packet, publish_packet, remaining_length, subscribe_packet, utf8
from tests.helpers import BrokerThread, eventually
from tests.mqtt.conftest import open_mqtt_section

CHUNK = b"x" * 60_000
CLOSED_AT_ONCE_S = 3.0  # well under the CONNECT deadline (10 s) and the keepalive (60 s)


@pytest.fixture(params=["single", "amqtt-path"])
def open_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerThread]:
    """A ChatBroker with every generic topic open (config/open-mqtt.yaml), plus a test's
    ``@pytest.mark.broker_config({...})`` settings; ``single``: ``mqtt.lean_sessions`` on, where
    what comes before CONNECT is the sans-IO core's (broker/chat_session.py) and these clients are handed to
    amqtt; ``amqtt-path``: with it off."""
    marker = request.node.get_closest_marker("broker_config")
    section = {**open_mqtt_section(), "lean_sessions": request.param != "amqtt-path"}
    running = BrokerThread(tmp_path / "data", {"mqtt": section, **(marker.args[0] if marker else {})})
    running.start()
    yield running
    running.stop()


def raw_client(broker: BrokerThread, raws: list[RawClient], client_id: str | None = None) -> RawClient:
    """A raw connection; with ``client_id``, after an accepted CONNECT."""
    raw = RawClient(broker.port)
    raws.append(raw)
    if client_id is not None:
        raw.send(connect_packet(client_id))
        assert raw.connack() == 0
    return raw


def open_connections(broker: BrokerThread) -> int:
    async def count() -> int:
        return sum(broker.app.broker.open_connections().values())

    return broker.call(count())


def write_buffered(broker: BrokerThread) -> int:
    """Bytes the broker's transports hold for their clients, all connections together."""

    async def total() -> int:
        return sum(handler.writer._writer.transport.get_write_buffer_size()
                   for _, handler in broker.app.broker._sessions.values() if handler.writer is not None)

    return broker.call(total())


@pytest.mark.parametrize("ending", ["shutdown", "close"])
def test_a_client_that_stopped_reading_is_closed_at_its_eof(open_broker: BrokerThread, raws: list[RawClient],
                                                            ending: str) -> None:
    sink = raw_client(open_broker, raws, "sink")
    sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.send(subscribe_packet(1, "flood/t", 0))
    assert sink.suback(1) == [0]
    source = raw_client(open_broker, raws, "source")
    for _ in range(100):  # 6 MB for a client that reads none of it
        source.send(publish_packet("flood/t", CHUNK, 0))
    eventually(lambda: write_buffered(open_broker) > 32_000, what="data queued for the sink")
    assert open_connections(open_broker) == 2
    if ending == "shutdown":
        sink.sock.shutdown(socket.SHUT_WR)  # FIN: it will send nothing more (and reads nothing)
    else:
        sink.sock.close()
    eventually(lambda: open_connections(open_broker) == 1, timeout=5.0, what="the sink's connection closed")


def test_a_large_connect_is_refused_on_its_fixed_header(open_broker: BrokerThread, raws: list[RawClient]) -> None:
    declared = 4_000_000  # under mqtt.max_packet_bytes (4 MiB): only the CONNECT cap refuses it
    start = connect_packet("big-connect")[2:]
    raw = raw_client(open_broker, raws)
    raw.send(b"\x10" + remaining_length(declared) + start)
    raw.close_s = CLOSED_AT_ONCE_S
    assert raw.answer_before_close() == b""
    at_cap = raw_client(open_broker, raws)  # a CONNECT of exactly the cap is served
    variable = connect_packet("c")[2:12]  # protocol name, level, flags, keepalive
    body = variable + utf8("c" * (65536 - 4 - len(variable) - 2))  # 4: type byte + 3 length bytes
    at_cap.send(b"\x10" + remaining_length(len(body)) + body)
    assert 4 + len(body) == 65536
    assert at_cap.connack() == 0


@pytest.mark.broker_config({"mqtt.packet_deadline_s": 0.5})
def test_a_packet_left_incomplete_is_closed_after_the_deadline(open_broker: BrokerThread,
                                                               raws: list[RawClient]) -> None:
    stalled = raw_client(open_broker, raws, "stalled")  # keepalive 60: the silence watch waits 90 s
    header = b"\x30" + remaining_length(1000) + utf8("part/t")
    stalled.send(header + b"only part of the payload")
    assert stalled.closed_within(CLOSED_AT_ONCE_S), "a half-sent packet kept its connection"
    honest = raw_client(open_broker, raws, "honest")  # whole packets, however far apart, are fine
    honest.ping()
    assert not honest.closed_within(1.0)
    honest.ping()


@pytest.mark.broker_config({"limits.max_unauthenticated_per_address": 4})
def test_unauthenticated_connections_per_address_are_capped(open_broker: BrokerThread,
                                                            raws: list[RawClient]) -> None:
    inside = raw_client(open_broker, raws, "inside")  # logged in: does not count
    idle = [raw_client(open_broker, raws) for _ in range(4)]  # connected, no CONNECT yet
    eventually(lambda: open_connections(open_broker) == 5, what="four unauthenticated connections accepted")
    refused = raw_client(open_broker, raws)
    refused.close_s = CLOSED_AT_ONCE_S
    assert refused.answer_before_close() == b"", "a fifth unauthenticated connection from one address"
    inside.ping()
    idle[0].close()
    eventually(lambda: open_connections(open_broker) == 4, what="a slot given back")
    raw_client(open_broker, raws, "next-one")
    idle[1].send(connect_packet("late-but-in"))  # a waiting one logs in: its slot is given back too
    assert idle[1].connack() == 0
    raw_client(open_broker, raws, "and-another")

    async def refusals() -> int:
        return open_broker.app.broker.counters.refused_unauthenticated

    assert open_broker.call(refusals()) == 1
