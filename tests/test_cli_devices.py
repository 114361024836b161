"""``chat-broker device list|remove USER [DEVICE]`` (issue 14, item 4), run as the operator runs
it, against the data directory of a running broker: the listing, a removal freeing a slot at
once (the broker reads users.db at each login), one-line errors, and the rest of the removal
(keys, staged items) done by the broker at its next start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testkit.packets import RawClient, connect_packet
from tests.helpers import BrokerThread, Peer
from tests.test_cli import cli, one_line_error

CONFIG = {"limits.max_devices_per_user": 2}


def device_cmd(data: Path, *args: str) -> Any:
    return cli("device", *args, "--data-dir", str(data), cwd=data.parent)


def login(broker: BrokerThread, device: str) -> int:
    sock = RawClient(broker.port)
    try:
        sock.send(connect_packet(f"zoe.{device}", "zoe", "zoe-pw"))
        return sock.connack()
    finally:
        sock.close()


def publish_keys(broker: BrokerThread, device: str) -> None:
    peer = Peer(broker.port, "zoe", "zoe-pw", device=device)
    try:
        assert peer.connect() == 0
        assert peer.subscribe() == [1]
        keys = {"user": "zoe", "device": device, "curve25519": "Q1VSVkU", "ed25519": f"RUQ{device}",
                "signature": "U0lH"}
        assert peer.request("keys.publish", {"device_keys": keys})["ok"] is True
    finally:
        peer.close()


def keyed_devices(broker: BrokerThread) -> list[str]:
    peer = Peer(broker.port, "yan", "yan-pw")
    try:
        assert peer.connect() == 0
        assert peer.subscribe() == [1]
        return sorted(peer.request("keys.list", {"user": "zoe"})["result"]["devices"])
    finally:
        peer.close()


def test_device_list_and_remove_against_a_running_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = BrokerThread(data, CONFIG).start()
    try:
        broker.add_users({"zoe": "zoe-pw", "yan": "yan-pw"})
        publish_keys(broker, "phone")
        publish_keys(broker, "laptop")
        assert login(broker, "tablet") == 0x05

        listed = device_cmd(data, "list", "zoe")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert [line.split("\t")[0] for line in lines] == ["laptop", "phone"]
        assert all("last login 20" in line and line.endswith("no token") for line in lines), lines

        removed = device_cmd(data, "remove", "zoe", "laptop")
        assert removed.returncode == 0, removed.stderr
        assert "1 device(s) of zoe removed: laptop" in removed.stdout
        assert login(broker, "tablet") == 0, "the slot is free at once, while the broker runs"
        assert keyed_devices(broker) == ["laptop", "phone"], "the running broker keeps the keys until restart"

        assert "no device 'laptop'" in one_line_error(device_cmd(data, "remove", "zoe", "laptop"))
        assert "no user 'nobody'" in one_line_error(device_cmd(data, "list", "nobody"))
        assert "invalid user name" in one_line_error(device_cmd(data, "remove", "No-Body"))
    finally:
        broker.stop()

    broker = BrokerThread(data, CONFIG).start()
    try:
        assert keyed_devices(broker) == ["phone"], "the removed device's keys are dropped at start"
        everything = device_cmd(data, "remove", "zoe")
        assert everything.returncode == 0, everything.stderr
        assert "2 device(s) of zoe removed: phone, tablet" in everything.stdout
        assert device_cmd(data, "list", "zoe").stdout == ""
    finally:
        broker.stop()
