"""A third-party client (mosquitto_pub / mosquitto_sub / mosquitto_rr 2.x) against the real broker.

Proves PROTOCOL.md's claim that any MQTT 3.1.1 client can use the server with
the page in hand: login refusals show up as the tools' own "not authorised" /
"identifier rejected" errors (exit status = CONNACK code); a subscription to
another user's inbox is denied (SUBACK 0x80, as mosquitto_sub reports it); a
full request round trip (ping, a device token, a token login) works with
mosquitto_rr, which subscribes to ``u/{me}/in`` and publishes on the same
connection; a forbidden publish is answered with a ``forbidden`` error on the
publisher's inbox and reaches no one else; and a refused mosquitto login with a
connected paho device's client id leaves that device alone.

mosquitto_rr defaults to MQTT 5, which this broker does not speak (amqtt is
3.1.1 only), so every call passes ``-V mqttv311``. A missing tool fails the
test with a message; nothing is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from typing import Any

from tests.helpers import BrokerThread, Peer

RUN_TIMEOUT_S = 20.0  # hard limit per tool run; each also has its own -W where it waits
RESPONSE_WAIT_S = "10"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not on PATH: install the Debian package mosquitto-clients")
    return path


def run(name: str, port: int, *args: str, user: str | None = "alice", password: str | None = "alice-pw",
        client_id: str = "alice.cli") -> subprocess.CompletedProcess[str]:
    command = [tool(name), "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-q", "1", "-i", client_id]
    if user is not None:
        command += ["-u", user]
    if password is not None:
        command += ["-P", password]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def rr(port: int, topic: str, body: dict[str, Any], **login: Any) -> list[dict[str, Any]]:
    """mosquitto_rr: subscribe to the inbox, publish ``body`` on ``topic``, print the first reply."""
    done = run("mosquitto_rr", port, "-t", topic, "-e", f"u/{login.get('user', 'alice')}/in",
               "-m", json.dumps(body), "-W", RESPONSE_WAIT_S, **login)
    assert done.returncode == 0, f"mosquitto_rr failed ({done.returncode}): {done.stderr!r}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def ping(port: int, **login: Any) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:12]
    replies = rr(port, f"u/{login.get('user', 'alice')}/req", {"rid": rid, "op": "ping"}, **login)
    assert len(replies) == 1, replies
    return replies[0]


def connected(port: int, peers: list[Peer], user: str, device: str = "phone") -> Peer:
    peer = Peer(port, user, f"{user}-pw", device=device)
    peers.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def items_until_ping(peer: Peer) -> list[dict[str, Any]]:
    """Everything that arrives for ``peer`` before the answer to its own new ping.

    A device's publishes are handled in order and a refusal is answered at once,
    so this is an ordering barrier, not a wait.
    """
    rid = uuid.uuid4().hex[:12]
    peer.publish(f"u/{peer.user}/req", {"rid": rid, "op": "ping"})
    seen: list[dict[str, Any]] = []
    while True:
        _topic, payload, _retained = peer.messages.get(timeout=10)
        item = json.loads(payload)
        if item.get("kind") == "res" and item.get("rid") == rid:
            return seen
        seen.append(item)


def test_tools_are_installed() -> None:
    for name in ("mosquitto_pub", "mosquitto_sub", "mosquitto_rr"):
        tool(name)


def test_mosquitto_pub_logs_in_and_publishes(broker: BrokerThread) -> None:
    done = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", "-d")
    assert done.returncode == 0, done.stderr
    assert "received CONNACK (0)" in done.stdout
    assert "received PUBACK" in done.stdout


def test_mosquitto_pub_refused_logins(broker: BrokerThread) -> None:
    wrong = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", password="not-alice-pw")
    assert wrong.returncode == 5, wrong  # the exit status is the CONNACK code
    assert "Connection Refused: not authorised" in wrong.stderr
    unknown = run("mosquitto_pub", broker.port, "-t", "u/zoe/hb", "-m", "{}", user="zoe", password="zoe-pw",
                  client_id="zoe.cli")
    assert unknown.returncode == 5 and "not authorised" in unknown.stderr, unknown
    anonymous = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", user=None, password=None)
    assert anonymous.returncode == 5 and "not authorised" in anonymous.stderr, anonymous
    foreign_id = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", client_id="bob.cli")
    assert foreign_id.returncode == 2, foreign_id
    assert "Connection Refused: identifier rejected" in foreign_id.stderr


def test_mosquitto_sub_is_denied_other_inboxes(broker: BrokerThread) -> None:
    started = time.monotonic()
    denied = run("mosquitto_sub", broker.port, "-t", "u/bob/in", "-d", "-W", RESPONSE_WAIT_S)
    assert "Subscribed (mid: 1): 128" in denied.stdout, denied
    assert "All subscription requests were denied." in denied.stderr
    assert time.monotonic() - started < float(RESPONSE_WAIT_S), "mosquitto_sub waited instead of giving up"

    mixed = run("mosquitto_sub", broker.port, "-t", "u/alice/in", "-t", "u/bob/in", "-t", "#", "-d", "-E")
    assert mixed.returncode == 0, mixed
    assert "Subscribed (mid: 1): 1, 128, 128" in mixed.stdout
    assert "denied" not in mixed.stderr  # one filter was granted

    own = run("mosquitto_sub", broker.port, "-t", "u/alice/in", "-d", "-E")
    assert own.returncode == 0 and "Subscribed (mid: 1): 1" in own.stdout, own


def test_mosquitto_rr_ping_round_trip(broker: BrokerThread) -> None:
    reply = ping(broker.port)
    assert reply["kind"] == "res" and reply["ok"] is True
    assert isinstance(reply["result"]["pong"], int)


def test_mosquitto_rr_token_and_token_login(broker: BrokerThread) -> None:
    [reply] = rr(broker.port, "u/alice/req", {"rid": "tok1", "op": "auth.token"})
    assert reply["ok"] is True and reply["result"]["device"] == "cli"
    token = reply["result"]["token"]
    assert ping(broker.port, password=token)["ok"] is True  # the token logs alice.cli in
    other_device = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", password=token,
                       client_id="alice.other")
    assert other_device.returncode == 5, other_device  # but no other device


def test_mosquitto_rr_forbidden_publish_is_answered(broker: BrokerThread, peers: list[Peer]) -> None:
    bob = connected(broker.port, peers, "bob")
    phone = connected(broker.port, peers, "alice")  # another device of the publisher
    for topic in ("u/bob/out", "u/alice/bogus", "other/x"):
        replies = rr(broker.port, topic, {"id": "cli-m1", "to": "bob", "body": "hi"})
        assert len(replies) == 1, replies
        assert replies[0]["kind"] == "error" and replies[0]["code"] == "forbidden", replies
        assert topic in replies[0]["detail"]
    # The errors went to the publishing connection only, the publishes to no one.
    for peer in (bob, phone):
        assert items_until_ping(peer) == [], peer.client_id


def test_refused_mosquitto_login_leaves_connected_device_alone(broker: BrokerThread, peers: list[Peer]) -> None:
    phone = connected(broker.port, peers, "alice")
    taken = run("mosquitto_pub", broker.port, "-t", "u/alice/hb", "-m", "{}", password="guess",
                client_id="alice.phone")
    assert taken.returncode == 5, taken
    taken = run("mosquitto_sub", broker.port, "-t", "u/alice/in", "-E", user="bob", password="bob-pw",
                client_id="alice.phone")
    assert taken.returncode == 2, taken
    assert not phone.disconnected.is_set()
    assert items_until_ping(phone) == []
    assert not phone.disconnected.is_set()
