from tests.helpers import BrokerThread, Peer

DEPLOYMENTS = ("single", "cluster", "amqtt-path", "lean-ws")  # tests/conftest.py: each broker test runs on each


def test_ping_roundtrip(broker: BrokerThread, peers: list[Peer]) -> None:
    alice = Peer(broker.port, "alice", "alice-pw")
    peers.append(alice)
    assert alice.connect() == 0
    assert alice.subscribe() == [1]
    res = alice.request("ping")
    assert res["ok"] is True and isinstance(res["result"]["pong"], int)
