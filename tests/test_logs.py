"""Logs and metrics never carry secrets: the broker process, at log level debug, in JSON and in text,
serves a chat (messages, a device token, a wrong password, a password typed as user name); no log line
and no metric label or value contains a body, a password or the token. JSON lines parse, and lines
about a connection carry its connection id and client id: fields that amqtt's path sets (a lean session
names its peer and client id in the message, docs/AMQTT.md), so the JSON run is on amqtt's path
(``mqtt.lean_sessions: false``) and the text run on the lean path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import Peer
from tests.observe import LoggedBroker, get

PASSWORDS = {"alice": "pw-Zq8-alice-secret", "bob": "pw-Wm4-bob-secret", "carol": "pw-Tt2-carol-secret"}
WRONG = "wrong-Xy7-guess"
AS_USERNAME = "Pw Typed-As-Name 3"  # a password typed into the user name field
BODY = "body-Kp3-private words"


def chat(broker: LoggedBroker) -> list[str]:
    """Everything that must not be logged; returns the secrets that were used."""
    made: list[Peer] = []
    try:
        for user, password in ((["alice", WRONG]), ([AS_USERNAME, "x"])):
            peer = Peer(broker.port, user, password, client_id=f"{user.split()[0].lower()}.tablet")
            made.append(peer)
            assert peer.connect() not in (0, -1)
        alice = Peer(broker.port, "alice", PASSWORDS["alice"])
        bob = Peer(broker.port, "bob", PASSWORDS["bob"])
        made += [alice, bob]
        for peer in (alice, bob):
            assert peer.connect() == 0
            assert peer.subscribe() == [1]
        token = alice.request("auth.token")["result"]["token"]
        alice.publish("u/alice/out", {"id": "m1", "to": "bob", "body": BODY})
        item = bob.expect(lambda i: i.get("kind") == "msg")
        assert item["body"] == BODY
        bob.publish("u/bob/ack", {"seqs": [item["seq"]]})
        alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "delivered")
        alice.publish("u/alice/out", {"id": "m2", "to": "nobody", "body": BODY})  # refused: an error item
        alice.publish("u/alice/out", {"id": "m3", "to": "carol", "body": BODY})  # held for carol: written to disk
        alice.expect(lambda i: i.get("kind") == "receipt" and i.get("status") == "sent" and i["ids"] == ["m3"])
        alice.publish("u/alice/out", b"{not json " + BODY.encode())
        return [*PASSWORDS.values(), WRONG, AS_USERNAME, BODY, "private words", token]
    finally:
        for peer in made:
            peer.close()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_in_logs_or_metrics(tmp_path: Path, log_format: str) -> None:
    path = {"mqtt": {"lean_sessions": log_format != "json"}}
    broker = LoggedBroker(tmp_path / "data", ["--log-format", log_format], {"log": {"level": "debug"}, **path})
    broker.add_users(PASSWORDS)
    broker.start()
    try:
        secrets = chat(broker)
        status, metrics = get(broker.metrics_url + "/metrics")
        assert status == 200
    finally:
        log = broker.stop()
    assert "login ok: alice.phone" in log and "login failed: user 'alice'" in log  # it did log the chat
    for secret in secrets:
        assert secret not in log, f"{secret!r} was logged"
        assert secret not in metrics, f"{secret!r} is in the metrics"
    if log_format == "json":
        lines = [json.loads(line) for line in log.splitlines()]
        login = next(line for line in lines if line["msg"].startswith("login ok: alice.phone"))
        assert login["conn"].startswith("tcp-") and "client" not in login  # logged before the login completed
        ended = [line for line in lines if line.get("client") == "alice.phone"]
        assert ended, "no line carries the client id of alice.phone"
        assert {line["conn"] for line in ended} == {login["conn"]}
    else:
        assert " [tcp-" in log
