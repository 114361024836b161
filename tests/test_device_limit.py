"""Devices per user are bounded (issue 14, item 4), through the real broker.

Any client id used to become a permanent device: 1,000 of them for one user in
16 s, each then a target of every message to her. ``limits.max_devices_per_user``
(16): a new device past it is refused at CONNECT with 0x05 and logged, a known
device still connects, and ``devices.remove`` frees a slot.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from broker.users import TooManyDevicesError
from chatserver.config import ConfigError, build_settings
from storage.sqlite.users import SqliteUserStore
from testkit.packets import RawClient, connect_packet
from tests.helpers import BrokerThread, Peer

LIMIT = 16  # the default
BAD_CREDENTIALS = 0x05


def login(broker: BrokerThread, device: str) -> int:
    sock = RawClient(broker.port)
    try:
        sock.send(connect_packet(f"alice.{device}", "alice", "alice-pw"))
        return sock.connack()
    finally:
        sock.close()


def test_a_new_device_past_the_limit_is_refused_until_one_is_removed(
    broker: BrokerThread, peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.auth")
    assert [login(broker, f"d{n}") for n in range(LIMIT)] == [0] * LIMIT
    assert login(broker, "extra") == BAD_CREDENTIALS
    refusals = [r for r in caplog.records if "extra" in r.getMessage() and r.levelno == logging.WARNING]
    assert refusals and "16 devices" in refusals[0].getMessage(), [r.getMessage() for r in caplog.records]
    assert login(broker, "d3") == 0, "a known device still connects"
    assert login(broker, "extra") == BAD_CREDENTIALS, "refusals are not failed passwords: no throttle either"

    phone = Peer(broker.port, "alice", "alice-pw", device="d0")
    peers.append(phone)
    assert phone.connect() == 0
    assert phone.subscribe() == [1]
    assert phone.request("devices.remove", {"device": "d5"})["ok"] is True
    assert login(broker, "extra") == 0, "devices.remove frees a slot"
    assert login(broker, "another") == BAD_CREDENTIALS


async def test_concurrent_first_logins_cannot_overshoot_the_limit(tmp_path: Path) -> None:
    store = await SqliteUserStore.open(tmp_path)
    try:
        await store.add_user("alice", "h")
        results = await asyncio.gather(*(store.record_login("alice", f"d{n}", LIMIT) for n in range(40)),
                                       return_exceptions=True)
        assert results.count(True) == LIMIT
        assert all(isinstance(r, TooManyDevicesError) for r in results if r is not True)
        assert len(await store.devices("alice")) == LIMIT
        assert await store.record_login("alice", "d0", LIMIT) is False, "a known device is never refused"
    finally:
        await store.close()


def test_the_limit_never_exceeds_the_devices_an_olm_message_may_name() -> None:
    assert build_settings({}).limits.max_devices_per_user == LIMIT
    too_many = r"max_devices_per_user \(65\) must not exceed max_devices_per_message \(64\)"
    with pytest.raises(ConfigError, match=too_many):
        build_settings({"limits": {"max_devices_per_user": 65}})
    assert build_settings({"limits": {"max_devices_per_message": 8}}).limits.max_devices_per_user == 8, "unset: follows"
    assert build_settings({"limits": {"max_devices_per_user": 65,
                                      "max_devices_per_message": 65}}).limits.max_devices_per_user == 65
