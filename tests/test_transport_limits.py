"""The transport under abuse, over real sockets: what a connection may hold of the broker.

- A client that stopped reading and then closed its side (FIN) is closed promptly, with
  data still waiting to be sent to it: the broker does not wait for the client to read it
  (it stayed CLOSE-WAIT for minutes with megabytes queued).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BrokerThread, eventually
from tests.mqtt.conftest import open_mqtt_section
from tests.mqtt.packets import RawClient, connect_packet, publish_packet, subscribe_packet

CHUNK = b"x" * 60_000


@pytest.fixture
def open_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    """A ChatBroker with every generic topic open (config/open-mqtt.yaml)."""
    running = BrokerThread(tmp_path / "data", {"mqtt": open_mqtt_section()}).start()
    yield running
    running.stop()


@pytest.fixture
def raws() -> Iterator[list[RawClient]]:
    made: list[RawClient] = []
    yield made
    for raw in made:
        raw.close()


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
