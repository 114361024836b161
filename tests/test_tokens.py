"""Device tokens through the real broker (request ops ``auth.token`` / ``auth.revoke``).

Proves: a device logged in with its password gets a token and can reconnect
with it as its password; the token works only for that user and that device;
a new token replaces the old one; ``auth.revoke`` (own device or another named
device) and a password change (``SqliteUserStore.set_password``, what ``chat-broker
user passwd`` runs) make it fail; the token is never written to the data
directory in clear.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import credentials
from tests.helpers import BrokerThread, Peer, connack_code

PAHO_NOT_AUTHORIZED = 135  # CONNACK 0x05 as paho 2.x reports it (see test_auth.py)
PAHO_BAD_CLIENT_ID = 133  # CONNACK 0x02


@pytest.fixture
def tbroker(tmp_path: Path) -> Iterator[BrokerThread]:
    """Like ``broker``, but with room for many failed logins from 127.0.0.1 (no throttling here)."""
    running = BrokerThread(tmp_path / "data", {"auth.free_failures": 1000}).start()
    for name in ("alice", "bob"):
        running.add_user(name, f"{name}-pw")
    yield running
    running.stop()


def login(port: int, user: str, password: str, device: str = "phone", client_id: str | None = None) -> int:
    """One CONNECT with paho, driven in this thread; returns paho's CONNACK reason code value."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{user}.{device}")
    client.username_pw_set(user, password)
    return connack_code(client, port)


class Devices:
    """Connected, subscribed Peers made by a test, closed afterwards."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.made: list[Peer] = []

    def open(self, user: str, password: str, device: str = "phone") -> Peer:
        peer = Peer(self.port, user, password, device=device)
        self.made.append(peer)
        assert peer.connect() == 0, f"{user}.{device} could not log in"
        assert peer.subscribe() == [1]
        return peer

    def token(self, user: str, password: str, device: str = "phone") -> str:
        """Log ``user.device`` in with ``password``, ask for a token, disconnect."""
        peer = self.open(user, password, device)
        res = peer.request("auth.token")
        assert res["ok"] is True, res
        assert res["result"]["device"] == device
        token = res["result"]["token"]
        assert isinstance(token, str) and token.startswith("dt1.") and len(token) >= 40
        self.close(peer)
        return str(token)

    def close(self, peer: Peer) -> None:
        peer.close()
        self.made.remove(peer)


@pytest.fixture
def devices(tbroker: BrokerThread) -> Iterator[Devices]:
    made = Devices(tbroker.port)
    yield made
    for peer in made.made:
        peer.close()


def test_token_logs_the_device_in(tbroker: BrokerThread, devices: Devices) -> None:
    token = devices.token("alice", "alice-pw")
    phone = devices.open("alice", token)  # the token as the password
    res = phone.request("ping")
    assert res["ok"] is True and isinstance(res["result"]["pong"], int)
    # A device logged in with its token may ask for a fresh one.
    fresh = phone.request("auth.token")["result"]["token"]
    assert fresh != token
    devices.close(phone)
    assert login(tbroker.port, "alice", fresh) == 0
    assert login(tbroker.port, "alice", "alice-pw") == 0  # the password keeps working


def test_new_token_replaces_the_old_one(tbroker: BrokerThread, devices: Devices) -> None:
    first = devices.token("alice", "alice-pw")
    second = devices.token("alice", "alice-pw")
    assert first != second
    assert login(tbroker.port, "alice", first) == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", second) == 0


def test_token_is_bound_to_its_user_and_device(tbroker: BrokerThread, devices: Devices) -> None:
    token = devices.token("alice", "alice-pw", device="phone")
    devices.open("alice", "alice-pw", device="tablet")  # a known device of the same user
    assert login(tbroker.port, "alice", token, device="tablet") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", token, device="newdevice") == PAHO_NOT_AUTHORIZED
    devices.open("bob", "bob-pw", device="phone")  # bob has a device of the same name
    assert login(tbroker.port, "bob", token, device="phone") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "bob", token, client_id="alice.phone") == PAHO_BAD_CLIENT_ID
    assert login(tbroker.port, "alice", token, device="phone") == 0  # still good where it belongs


def test_revoke_own_token(tbroker: BrokerThread, devices: Devices) -> None:
    token = devices.token("alice", "alice-pw")
    phone = devices.open("alice", token)
    res = phone.request("auth.revoke")
    assert res == {"kind": "res", "rid": res["rid"], "ok": True, "result": {"revoked": 1}}
    assert phone.request("auth.revoke")["result"] == {"revoked": 0}  # nothing left to revoke
    devices.close(phone)
    assert login(tbroker.port, "alice", token) == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", "alice-pw") == 0


def test_revoke_another_device_of_the_same_user(tbroker: BrokerThread, devices: Devices) -> None:
    tablet_token = devices.token("alice", "alice-pw", device="tablet")
    phone_token = devices.token("alice", "alice-pw", device="phone")
    bob_token = devices.token("bob", "bob-pw", device="tablet")
    phone = devices.open("alice", "alice-pw", device="phone")

    assert phone.request("auth.revoke", {"device": "tablet"})["result"] == {"revoked": 1}
    bad = phone.request("auth.revoke", {"device": "not a device!"})
    assert bad["ok"] is False and bad["error"]["code"] == "bad_envelope"
    bad = phone.request("auth.revoke", {"user": "bob"})
    assert bad["ok"] is False and bad["error"]["code"] == "bad_envelope"

    assert login(tbroker.port, "alice", tablet_token, device="tablet") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", phone_token, device="phone") == 0  # only the named device
    assert login(tbroker.port, "bob", bob_token, device="tablet") == 0  # never another user's


def test_password_change_revokes_every_token(tbroker: BrokerThread, devices: Devices) -> None:
    phone_token = devices.token("alice", "alice-pw", device="phone")
    tablet_token = devices.token("alice", "alice-pw", device="tablet")
    bob_token = devices.token("bob", "bob-pw")

    tbroker.call(tbroker.app.users.set_password("alice", credentials.hash_password("alice-new-pw")))

    assert login(tbroker.port, "alice", phone_token, device="phone") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", tablet_token, device="tablet") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", "alice-pw") == PAHO_NOT_AUTHORIZED
    assert login(tbroker.port, "alice", "alice-new-pw") == 0
    assert login(tbroker.port, "bob", bob_token) == 0


def _stored_files(data_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(data_dir.iterdir()) if path.is_file()}


def test_token_is_not_stored_in_clear(tbroker: BrokerThread, devices: Devices) -> None:
    token = devices.token("alice", "alice-pw")
    assert login(tbroker.port, "alice", token) == 0  # and it was used once
    data_dir = tbroker.settings.data_path

    # Sanity: we are looking at the right database, and a digest of the token is in it.
    with sqlite3.connect(f"file:{data_dir / 'users.db'}?mode=ro", uri=True) as db:
        rows: list[Any] = db.execute(
            "SELECT token_digest FROM devices WHERE user = 'alice' AND device = 'phone'"
        ).fetchall()
    assert len(rows) == 1 and isinstance(rows[0][0], str) and rows[0][0]
    assert rows[0][0] != token

    files = _stored_files(data_dir)
    assert "users.db" in files
    body = token.removeprefix("dt1.")
    for name, content in files.items():  # users.db, its -wal/-shm, server.key, ...
        for needle in (token, body, body[:24]):
            assert needle.encode() not in content, f"{name} holds the token in clear"
