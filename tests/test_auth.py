"""Login through the real broker: who may connect, with which client id, and the throttle.

Proves PROTOCOL.md "Identity and connection" on the wire, with paho and with raw
CONNECT packets (to see the exact MQTT 3.1.1 CONNACK byte): a good login is
accepted; a wrong password, an unknown user or no user name gets 0x05; a client
id that is not ``{username}.{device}`` gets 0x02; a refused login closes its
socket and leaves an already connected device with that client id untouched;
repeated failures throttle the user even for the right password until the
delay has passed; throttling is logged and no log line carries a password.

Each test gets a fresh broker. The throttle counts failures per user *and* per
remote address (all tests connect from 127.0.0.1), so a test using the default
``broker`` fixture makes at most ``auth.free_failures`` (3) failed logins.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from testkit.packets import connect_packet
from tests.deployment import settings_of
from tests.helpers import WAIT_S, BrokerThread, Peer, connack_code

# paho 2.x reports an MQTT 3.1.1 CONNACK return code as an MQTT 5 reason code:
# 0x05 "not authorised" -> 135, 0x02 "identifier rejected" -> 133.
PAHO_NOT_AUTHORIZED = ReasonCode(PacketTypes.CONNACK, "Not authorized").value
PAHO_BAD_CLIENT_ID = ReasonCode(PacketTypes.CONNACK, "Client identifier not valid").value

CONNACK_ACCEPTED = 0x00
CONNACK_BAD_PROTOCOL = 0x01
CONNACK_IDENTIFIER_REJECTED = 0x02
CONNACK_NOT_AUTHORISED = 0x05
DEPLOYMENTS = ("single", "amqtt-path", "lean-ws")  # tests/conftest.py: lean over tcp and ws, amqtt's


def test_paho_reason_codes_are_what_this_file_assumes() -> None:
    assert (PAHO_NOT_AUTHORIZED, PAHO_BAD_CLIENT_ID) == (135, 133)


# --- raw MQTT 3.1.1 CONNECT ---------------------------------------------------


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}, expected {count} bytes")
        data += chunk
    return data


def raw_connect(port: int, client_id: str, username: str | None = None, password: str | None = None,
                clean: bool = True) -> int:
    """Send one CONNECT and return the CONNACK return code.

    A refused connection must be closed by the server right after its CONNACK;
    an accepted one is ended here with DISCONNECT.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(connect_packet(client_id, username, password, clean_session=clean))
        connack = _read_exact(sock, 4)
        assert connack[:2] == b"\x20\x02", f"not a CONNACK: {connack!r}"
        code = connack[3]
        if code == CONNACK_ACCEPTED:
            sock.sendall(b"\xe0\x00")
        else:
            assert sock.recv(1) == b"", "the server must close a refused connection"
    return code


def paho_login(port: int, user: str | None, password: str | None, client_id: str | None = None,
               device: str = "phone", clean_session: bool = True) -> int:
    """Connect with paho, return paho's CONNACK reason code value, disconnect.

    Drives paho's loop in this thread: a refused ``Peer`` would sit in paho's
    reconnect wait for up to a second when closed, which slows the throttle test.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id if client_id is not None
                         else f"{user}.{device}", clean_session=clean_session)
    if user is not None:
        client.username_pw_set(user, password)
    return connack_code(client, port)


# --- good and bad credentials -----------------------------------------------------


def test_good_login_is_accepted(broker: BrokerThread) -> None:
    assert paho_login(broker.port, "alice", "alice-pw") == 0
    assert raw_connect(broker.port, "alice.laptop", "alice", "alice-pw") == CONNACK_ACCEPTED
    assert raw_connect(broker.port, "bob.X_y-9", "bob", "bob-pw") == CONNACK_ACCEPTED


def test_wrong_password_is_refused_with_0x05(broker: BrokerThread) -> None:
    assert paho_login(broker.port, "alice", "bob-pw") == PAHO_NOT_AUTHORIZED
    assert raw_connect(broker.port, "alice.phone", "alice", "alice-pw ") == CONNACK_NOT_AUTHORISED
    # Two failures are within the free allowance: the right password still works.
    assert paho_login(broker.port, "alice", "alice-pw") == 0


def test_unknown_user_is_refused_with_0x05(broker: BrokerThread) -> None:
    assert paho_login(broker.port, "zoe", "zoe-pw") == PAHO_NOT_AUTHORIZED
    assert raw_connect(broker.port, "zoe.phone", "zoe", "alice-pw") == CONNACK_NOT_AUTHORISED


def test_anonymous_and_malformed_user_names_are_refused(broker: BrokerThread) -> None:
    assert paho_login(broker.port, None, None, client_id="alice.phone") == PAHO_NOT_AUTHORIZED
    assert raw_connect(broker.port, "alice.phone") == CONNACK_NOT_AUTHORISED
    for name in ("", "Alice", "alice.phone", "a" * 33, "al ice"):
        assert raw_connect(broker.port, f"{name}.phone", name, "alice-pw") == CONNACK_NOT_AUTHORISED, name


@pytest.mark.parametrize(
    "client_id",
    [
        "bob.phone",  # another user's prefix
        "alice",  # no dot
        "alice.",  # empty device
        "alicephone",
        "Alice.phone",  # user part differs in case
        "alice.ph one",  # invalid device characters
        "alice.ph.one",
        "alice.ph/one",
        "alice.t\u00e9l",
        "alice." + "d" * 33,  # device id too long
        "",  # empty: amqtt makes up a random id, which is not alice's
    ],
)
def test_client_id_must_be_user_dot_device(broker: BrokerThread, client_id: str) -> None:
    # The right password, so only the client id can be the reason.
    assert raw_connect(broker.port, client_id, "alice", "alice-pw") == CONNACK_IDENTIFIER_REJECTED


def test_client_id_refusals_seen_by_paho_and_without_clean_session(broker: BrokerThread) -> None:
    assert paho_login(broker.port, "alice", "alice-pw", client_id="bob.phone") == PAHO_BAD_CLIENT_ID
    assert paho_login(broker.port, "mallory", "mallory-pw", client_id="alice.phone") == PAHO_BAD_CLIENT_ID
    assert raw_connect(broker.port, "", "alice", "alice-pw", clean=False) == CONNACK_IDENTIFIER_REJECTED
    assert raw_connect(broker.port, "bob.phone", "alice", "alice-pw", clean=False) == CONNACK_IDENTIFIER_REJECTED


# --- a refused login leaves the connected device alone (amqtt fault 1) ------------


@pytest.mark.parametrize("victim_clean_session", [True, False])
def test_refused_login_does_not_disturb_connected_device(
    broker: BrokerThread, peers: list[Peer], victim_clean_session: bool
) -> None:
    victim = Peer(broker.port, "alice", "alice-pw", clean_session=victim_clean_session)
    peers.append(victim)
    assert victim.connect() == 0
    assert victim.subscribe() == [1]
    assert victim.request("ping")["ok"] is True

    # Same client id, wrong password, both session flavours (2 failures: within the free allowance).
    assert paho_login(broker.port, "alice", "guess-1", client_id="alice.phone") == PAHO_NOT_AUTHORIZED
    assert paho_login(broker.port, "alice", "guess-2", client_id="alice.phone",
                      clean_session=False) == PAHO_NOT_AUTHORIZED
    # Another user's valid credentials with the victim's client id.
    assert paho_login(broker.port, "mallory", "mallory-pw", client_id="alice.phone",
                      clean_session=False) == PAHO_BAD_CLIENT_ID
    # No user name at all.
    assert raw_connect(broker.port, "alice.phone") == CONNACK_NOT_AUTHORISED

    assert not victim.disconnected.is_set(), "a refused login disconnected the victim"
    res = victim.request("ping")  # its subscription and its bridge link are intact
    assert res["ok"] is True and isinstance(res["result"]["pong"], int)
    assert not victim.disconnected.is_set()


# --- throttling -------------------------------------------------------------------

THROTTLE_S = 1.5  # long enough that the attempt right after the last failure falls inside it


@pytest.fixture
def throttled_broker(tmp_path: Path, deployment: str) -> Iterator[BrokerThread]:
    overrides = settings_of(deployment, {"auth.free_failures": 2, "auth.base_delay_s": THROTTLE_S})
    running = BrokerThread(tmp_path / "data", overrides).start()
    running.add_user("alice", "alice-pw")
    yield running
    running.stop()


def test_failed_logins_throttle_even_the_right_password(
    throttled_broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, amqtt's packet traces included
    port = throttled_broker.port
    guesses = ["guess-Qx71-a", "guess-Qx71-b", "guess-Qx71-c"]
    for guess in guesses:  # 2 free failures, the 3rd starts a THROTTLE_S wait
        assert paho_login(port, "alice", guess) == PAHO_NOT_AUTHORIZED
    blocked_at = time.monotonic()

    assert paho_login(port, "alice", "alice-pw") == PAHO_NOT_AUTHORIZED, "right password accepted while throttled"
    assert time.monotonic() - blocked_at < THROTTLE_S, "too slow to observe the throttle; raise THROTTLE_S"
    throttled = [r for r in caplog.records if r.name == "broker.auth" and "throttled" in r.getMessage()]
    assert throttled and all(r.levelno == logging.WARNING for r in throttled)
    assert "'alice'" in throttled[0].getMessage() and "127.0.0.1" in throttled[0].getMessage()

    # Poll (attempts during the wait are refused unchecked and do not extend it).
    deadline = blocked_at + THROTTLE_S + WAIT_S
    while (code := paho_login(port, "alice", "alice-pw")) != 0:
        assert code == PAHO_NOT_AUTHORIZED
        assert time.monotonic() < deadline, "the right password never worked again"
        time.sleep(0.05)  # poll interval, not a wait for an event
    waited = time.monotonic() - blocked_at
    assert waited >= THROTTLE_S * 0.75, f"throttle lifted after {waited:.2f}s, configured {THROTTLE_S}s"

    failures = [r for r in caplog.records if r.name == "broker.auth" and "login failed" in r.getMessage()]
    assert len(failures) == len(guesses)
    assert any(r.name == "broker.auth" and "login ok" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in [*guesses, "alice-pw"]:
            assert secret not in text, f"{record.name} logged a password: {text!r}"


# --- refusals by amqtt's own CONNECT checks -------------------------------------


def _connect_then_reset(port: int, packet: bytes) -> bytes:
    """Send CONNECT, read the CONNACK, then reset the connection (as a crashing client would)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(packet)
        connack = _read_exact(sock, 4)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return connack


async def _open_connections(broker: BrokerThread) -> int:
    return sum(server.conn_count for server in broker.app.broker._servers.values())


async def _noop() -> None:
    return None


def test_client_resetting_after_a_protocol_refusal_leaves_no_traceback(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """amqtt refuses protocol level 5 and id-less persistent sessions itself, then closes the
    socket; a client that has already reset it must not make the broker log an
    unhandled exception (seen with mosquitto_rr, whose default is MQTT 5)."""
    caplog.set_level(logging.ERROR)
    cases = [
        # Only the level byte differs (no MQTT 5 properties): amqtt refuses on the level alone, and a
        # real MQTT 5 CONNECT with a user name would not parse as 3.1.1 (amqtt would wait for its timeout).
        (connect_packet("alice.phone", "alice", "alice-pw", protocol=("MQTT", 5)), CONNACK_BAD_PROTOCOL),
        (connect_packet("", "alice", "alice-pw", clean_session=False), CONNACK_IDENTIFIER_REJECTED),
    ]
    for _ in range(8):  # the reset races the server's close; repeat so the race is hit
        for packet, expected in cases:
            assert _connect_then_reset(broker.port, packet) == bytes([0x20, 0x02, 0x00, expected])
            deadline = time.monotonic() + WAIT_S
            while broker.call(_open_connections(broker)) != 0:
                assert time.monotonic() < deadline, "the refused connection was never released"
                time.sleep(0.01)
    broker.call(_noop())  # one more loop turn: asyncio reports task exceptions in a callback
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"broker logged: {[r.getMessage() for r in errors]}"
    assert paho_login(broker.port, "alice", "alice-pw") == 0
