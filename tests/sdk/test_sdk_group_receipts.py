"""Group receipts reach the app as one-to-one receipts do, in both client faces: ``Receipt`` events with
``peer`` = the group (``delivered`` once every member has the message, ``seen`` once every one saw it),
``mark_seen(group, ids)``, and the ``group_receipts`` request (docs/SDK.md, "Groups")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from client_sdk import AsyncClient, GroupReceiptInfo, RequestError
from client_sdk.events import Message, Receipt
from tests.helpers import WAIT_S, BrokerThread
from tests.sdk.conftest import Collector, Factory


def online(make_client: Factory, user: str) -> Collector:
    collector = Collector(make_client(user, store=f"{user}.db"))
    collector.client.connect()
    return collector


def receipt(status: str, msg_id: str) -> Any:
    return lambda r: r.status == status and msg_id in r.ids


def test_delivered_to_all_and_seen_by_all_reach_the_sender_app(broker: BrokerThread, make_client: Factory) -> None:
    broker.add_user("carol", "carol-pw")
    alice, bob, carol = (online(make_client, u) for u in ("alice", "bob", "carol"))
    group = alice.client.create_group("team", ["bob", "carol"]).group
    msg_id = alice.client.send(group, "hello team")
    for member in (bob, carol):
        assert member.next(Message, where=lambda m: m.id == msg_id).group == group  # the SDK acks it
    delivered = alice.next(Receipt, where=receipt("delivered", msg_id))
    assert delivered.peer == group
    info = alice.client.group_receipts(group, msg_id)
    assert info.tracked and info.seen_tracked and info.members is not None and set(info.members) == {"bob", "carol"}
    assert all(m.delivered is not None and m.seen is None for m in info.members.values())
    with pytest.raises(RequestError) as caught:
        bob.client.group_receipts(group, msg_id)
    assert caught.value.code == "forbidden"
    bob.client.mark_seen(group, [msg_id])
    carol.client.mark_seen(group, [msg_id])
    seen = alice.next(Receipt, where=receipt("seen", msg_id))
    assert seen.peer == group
    assert alice.client.group_receipts(group, msg_id) == GroupReceiptInfo(group, msg_id, False)
    assert not [e for e in alice.all_now() if isinstance(e, Receipt) and e.status in ("delivered", "seen")]


def test_the_asyncio_face_gets_group_receipts_too(broker: BrokerThread, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (AsyncClient("alice", "alice-pw", port=broker.port, store=tmp_path / "a.db") as alice,
                    AsyncClient("bob", "bob-pw", port=broker.port, store=tmp_path / "b.db") as bob):
            mine, theirs = alice.events(), bob.events()
            group = (await alice.create_group("pair", ["bob"])).group
            msg_id = await alice.send(group, "hi bob")
            while not isinstance(got := await anext(theirs), Message):
                pass
            assert got.id == msg_id
            reading = asyncio.create_task(anext(theirs))  # done with the message: bob's SDK acks it now
            statuses = []
            while "delivered" not in statuses:
                event = await anext(mine)
                if isinstance(event, Receipt) and msg_id in event.ids:
                    assert event.peer == group
                    statuses.append(event.status)
            info = await alice.group_receipts(group, msg_id)
            assert info.members is not None and info.members["bob"].delivered is not None
            await bob.mark_seen(group, [msg_id])
            while not (isinstance(event := await anext(mine), Receipt) and event.status == "seen"):
                pass
            assert (event.ids, event.peer) == ((msg_id,), group)
            assert not (await alice.group_receipts(group, msg_id)).tracked
            reading.cancel()
            await mine.aclose()

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 3))
