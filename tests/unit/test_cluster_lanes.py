"""``Lane`` (bridge/cluster/lanes.py): a copy of a message waiting in its device's lane is not queued twice."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.cluster.lanes import Lane, Uplink
from chatproto import Caller

ALICE = Caller("alice", "phone")


@dataclass(eq=False)
class Link:
    client_id: str = "alice.phone"

    def send(self, payload: bytes) -> None:
        raise AssertionError("not used")


def out(ref: str | None, link: Link | None) -> Uplink:
    return Uplink("out", ALICE, b"{}", link, ref)


def test_a_copy_from_the_same_connection_waits_once_and_is_let_in_again_once_handled() -> None:
    first, second = Link(), Link()
    lane = Lane()
    lane.push(out("m1", first))
    lane.push(out("m2", first))
    assert lane.waiting(out("m1", first)) and lane.waiting(out("m2", first))
    assert not lane.waiting(out("m1", second)), "a copy from a new connection is queued: the old one is dropped"
    assert not lane.waiting(out(None, first)), "an uplink without a known id is always queued"
    lane.pop()
    assert not lane.waiting(out("m1", first)) and lane.waiting(out("m2", first))
    assert len(lane) == 1 and lane.head().ref == "m2"


def test_popping_an_old_connections_copy_keeps_the_new_ones_mark() -> None:
    old, new = Link(), Link()
    lane = Lane()
    lane.push(out("m1", old))
    lane.push(out("m1", new))  # re-sent after a reconnect
    lane.pop()  # the stale copy goes
    assert lane.waiting(out("m1", new)), "the new connection's copy still waits"
