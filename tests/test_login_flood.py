"""Concurrent password guessing through the real broker (issue 14, item 3).

200 CONNECTs with wrong passwords for one user, sent at once from one address,
must cost no more password checks than the same guesses sent one after the
other: ``auth.free_failures`` plus the one that starts the back-off. The rest
are refused unchecked (``throttled``), and a device of another user logging in
with its token meanwhile is not held up behind a queue of password hashes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.packets import RawClient, connect_packet
from tests.helpers import BrokerThread, Peer
from tests.observe import scrape

GUESSES = 200
FREE = 3
BAD_CREDENTIALS = 0x05
HONEST_BOUND_S = 2.0  # generous: a token check is a keyed hash; 200 scrypts queued behind 2 slots took ~5 s


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[BrokerThread]:
    # A long back-off: no second window opens during the test, so the allowance is exactly one.
    # The cap on connections not logged in yet per address (tests/test_transport_limits.py) would
    # close most of the 200 guesses unanswered: off, so that each one reaches the throttle.
    running = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0", "auth.free_failures": FREE,
                                               "auth.base_delay_s": 60.0,
                                               "limits.max_unauthenticated_per_address": 0}).start()
    running.add_users({"alice": "alice-pw", "bob": "bob-pw"})
    yield running
    running.stop()


def bob_token(broker: BrokerThread) -> str:
    peer = Peer(broker.port, "bob", "bob-pw")
    try:
        assert peer.connect() == 0
        assert peer.subscribe() == [1]
        res = peer.request("auth.token")
        return str(res["result"]["token"])
    finally:
        peer.close()


def test_concurrent_guesses_cost_what_sequential_ones_do(guarded: BrokerThread) -> None:
    token = bob_token(guarded)
    before = scrape(guarded)
    flood = [RawClient(guarded.port) for _ in range(GUESSES)]
    try:
        for i, sock in enumerate(flood):
            sock.send(connect_packet(f"alice.g{i}", "alice", f"guess-{i}"))
        started = time.monotonic()
        honest = RawClient(guarded.port)
        try:
            honest.send(connect_packet("bob.phone", "bob", token))
            assert honest.connack() == 0
            honest_s = time.monotonic() - started
        finally:
            honest.close()
        codes = [sock.connack(timeout=30) for sock in flood]
    finally:
        for sock in flood:
            sock.close()
    after = scrape(guarded)
    assert codes == [BAD_CREDENTIALS] * GUESSES
    checked = after.value("chat_logins_total", result="bad_password") - before.value(
        "chat_logins_total", result="bad_password")
    throttled = after.value("chat_logins_total", result="throttled") - before.value(
        "chat_logins_total", result="throttled")
    assert checked == FREE + 1, f"{checked:.0f} passwords checked for {GUESSES} concurrent guesses"
    assert throttled == GUESSES - FREE - 1
    assert honest_s < HONEST_BOUND_S, f"a token login took {honest_s:.1f}s during the flood"
