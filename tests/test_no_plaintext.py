"""The server carries and stores only ciphertext: a unique plaintext marker sent (encrypted,
the SDK's default) while the recipient is offline, so that it is flushed to the staging
store, never appears in staging.db or its WAL, in any log line (broker and SDK, at DEBUG),
in any byte on the wire between the SDK clients and the broker (a recording proxy), or in
the SDK's own local store files (sealed at rest); the recipient's app still reads it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import Client
from client_sdk.events import Message, Receipt
from tests.capture_proxy import CapturingProxy
from tests.helpers import BrokerThread
from tests.sdk.conftest import Collector


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[Recorder]:
    recorder = Recorder()
    root = logging.getLogger()
    old = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    yield recorder
    root.removeHandler(recorder)
    root.setLevel(old)


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_marker_never_leaves_the_apps_in_plaintext(tmp_path: Path, logs: Recorder) -> None:
    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
    broker = BrokerThread(tmp_path / "data").start()
    proxy = CapturingProxy(broker.port).start()
    made: list[Client] = []

    def client(user: str, device: str) -> Collector:
        made.append(Client(user, f"{user}-pw", device=device, port=proxy.port, store=tmp_path / f"{user}.{device}.db",
                           reconnect_delay=(0.1, 1.0)))
        return Collector(made[-1])

    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        bob = client("bob", "phone")
        bob.client.connect()  # publishes bob's keys
        bob.client.close()  # bob is offline: the message must be staged on disk
        alice = client("alice", "phone")
        alice.client.connect()
        mid = alice.client.send("bob", f"meet at noon {marker}", "text")
        assert alice.next(Receipt, where=lambda r: r.status == "sent").ids == (mid,)  # durably staged

        data = tmp_path / "data"
        staged = b"".join(body for path, body in files_under(data).items() if path.name.startswith("staging.db"))
        assert mid.encode() in staged  # the message really is in the staging store (or its WAL)
        assert marker.encode() not in staged

        bob = client("bob", "phone")
        bob.client.connect()
        got = bob.next(Message)
        assert (got.id, got.body, got.encrypted) == (mid, f"meet at noon {marker}", True)
        for made_client in made:
            made_client.close()

        wire = proxy.captured()
        assert mid.encode() in wire and proxy.packets > 10  # the proxy saw the traffic
        assert marker.encode() not in wire
        every_file = files_under(tmp_path)
        assert any(p.name == "alice.phone.db" for p in every_file) and any(p.name.endswith("-wal") for p in every_file)
        leaking = [str(p) for p, body in every_file.items() if marker.encode() in body]
        assert leaking == []
        assert logs.lines and not [line for line in logs.lines if marker in line]
    finally:
        for made_client in made:
            made_client.close()
        proxy.stop()
        broker.stop()
