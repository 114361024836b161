"""Groups through the real broker with SDK clients, end-to-end encrypted with sender keys:
three members create a group and exchange messages (the broker's files never hold the text);
one is removed, gets no new key, and the later ciphertext handed to its SDK does not open; a
new member reads from its join on and not before; the asyncio face does the same."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from chatproto import GROUP_CREATED, GROUP_MEMBER_ADDED, GROUP_MEMBER_REMOVED, MEGOLM_TYPE, MsgItem
from client_sdk import AsyncClient, RequestError
from client_sdk.events import ErrorEvent, GroupEvent, Message, Receipt, Undecryptable
from client_sdk.groupflow import SHARE_ID_PREFIX
from client_sdk.groupkeys import GroupItem as SealedItem
from client_sdk.groupkeys import Pending
from client_sdk.senderkeys import Envelope
from tests.helpers import WAIT_S, BrokerThread, Peer, eventually
from tests.sdk.conftest import Collector, Factory


def online(make_client: Factory, user: str, **options: Any) -> Collector:
    collector = Collector(make_client(user, store=f"{user}.db", **options))
    collector.client.on_group = collector.events.put
    collector.client.on_warning = collector.events.put
    collector.client.connect()
    return collector


def spy(broker: BrokerThread, user: str) -> Peer:
    """A raw device of ``user`` without keys: it receives what the server fans out to the group."""
    peer = Peer(broker.port, user, f"{user}-pw", device="spy")
    peer.connect()
    peer.subscribe()
    return peer


def group_item(peer: Peer, msg_id: str) -> MsgItem:
    """The group message ``msg_id`` as the server handed it to ``peer``."""
    while True:
        _topic, payload, _retain = peer.messages.get(timeout=WAIT_S)
        obj = json.loads(payload)
        if obj.get("kind") == "msg" and obj.get("id") == msg_id:
            return MsgItem.decode(payload)


def files_hold(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.parametrize("deployment", ["single", "cluster"], indirect=True)
def test_three_members_chat_encrypted_and_a_removed_one_reads_nothing_after(
        broker: BrokerThread, make_client: Factory, tmp_path: Path, deployment: str) -> None:
    for name in ("carol", "dave"):
        broker.add_user(name, f"{name}-pw")
    alice, bob, carol = (online(make_client, u) for u in ("alice", "bob", "carol"))
    info = alice.client.create_group("team", ["bob", "carol"])
    assert (info.name, info.members, info.admins, info.gseq) == ("team", ("alice", "bob", "carol"), ("alice",), 1)
    group = info.group
    for member in (alice, bob, carol):
        created = member.next(GroupEvent)
        assert (created.group, created.event, created.users, created.gseq) == (
            group, GROUP_CREATED, ("alice", "bob", "carol"), 1)
    watcher = spy(broker, "bob")

    marker = f"GROUP-PLAINTEXT-{uuid.uuid4().hex}"
    carol.client.close()  # offline: what she is sent is written to the broker's disk (or Redis)
    first = alice.client.send(group, f"hello {marker}")
    got = bob.next(Message)
    assert (got.id, got.body, got.group, got.sender, got.encrypted, got.to) == (
        first, f"hello {marker}", group, "alice", True, group)
    assert got.gseq is not None and got.gseq > 1
    assert group_item(watcher, first).type == MEGOLM_TYPE
    reply = bob.client.send(group, "hi alice")
    assert alice.next(Message).id == reply  # the sending device does not get its own message back
    if deployment == "single":
        eventually(lambda: bool(files_hold(tmp_path / "data", first)), what="the message for carol written to disk")
    carol = online(make_client, "carol")  # back: catches up, in order, decrypted
    assert [m.body for m in carol.messages(2)] == [f"hello {marker}", "hi alice"]
    assert files_hold(tmp_path, marker) == []  # broker files (staging, WAL) and the SDK stores: ciphertext only

    assert alice.client.remove_members(group, ["carol"]) == ["carol"]
    for member in (alice, bob, carol):
        removed = member.next(GroupEvent)
        assert (removed.event, removed.users) == (GROUP_MEMBER_REMOVED, ("carol",))
    secret = alice.client.send(group, "after carol left")
    assert bob.next(Message).body == "after carol left"
    leaked = group_item(watcher, secret)
    sentinel = alice.client.send("carol", "are you there")
    assert carol.next(Message).id == sentinel  # nothing of the group came before it
    engine = carol.client._engine
    assert engine.groups is not None
    outcome = engine.groups._crypto.decrypt(
        SealedItem(Envelope(leaked.id, group, "alice", "phone"), leaked.body, leaked.ts, leaked.gseq or 0))
    assert isinstance(outcome, Pending)  # carol's SDK never got the new key: the ciphertext does not open
    assert not [e for e in carol.all_now() if isinstance(e, Message) and e.group == group]
    refused = carol.client.send(group, "still here?")  # her SDK asks who is in it: not her
    assert carol.next(ErrorEvent, where=lambda e: e.ref == refused).code == "not_member"
    with pytest.raises(RequestError) as caught:
        bob.client.add_members(group, ["carol"])  # bob is no admin
    assert caught.value.code == "forbidden"

    dave = online(make_client, "dave")
    assert alice.client.add_members(group, ["dave"]) == ["dave"]
    assert dave.next(GroupEvent).event == GROUP_MEMBER_ADDED
    welcome = alice.client.send(group, "welcome dave")
    got = dave.next(Message)
    assert (got.id, got.body, got.group) == (welcome, "welcome dave", group)
    engine = dave.client._engine
    engine.on_payload(MsgItem(10 ** 15, leaked.id, "alice", group, MEGOLM_TYPE, leaked.body, leaked.ts, "phone",
                              leaked.gseq).encode())  # the message from before dave joined, handed to his SDK
    before = dave.next(Undecryptable)
    assert before.id == secret and "does not decrypt" in before.reason
    sent = alice.next(Receipt, where=lambda r: r.status == "sent" and welcome in r.ids)
    assert sent.peer == group
    about = [i for e in alice.all_now() + bob.all_now()
             for i in (e.ids if isinstance(e, Receipt) else (e.ref,) if isinstance(e, ErrorEvent) else ()) if i]
    assert about and not [i for i in about if i.startswith(SHARE_ID_PREFIX)]  # the key shares stay the SDK's
    assert bob.client.group_info(group).members == ("alice", "bob", "dave")
    assert [(g.group, g.members, g.admin) for g in bob.client.list_groups()] == [(group, 3, False)]
    watcher.close()


@pytest.mark.parametrize("deployment", ["single", "cluster"], indirect=True)
def test_the_asyncio_face_makes_a_group_and_reads_its_messages(broker: BrokerThread, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (AsyncClient("alice", "alice-pw", port=broker.port, store=tmp_path / "a.db") as alice,
                    AsyncClient("bob", "bob-pw", port=broker.port, store=tmp_path / "b.db") as bob):
            events = bob.events()
            info = await alice.create_group("pair", ["bob"])
            first = await anext(events)
            assert isinstance(first, GroupEvent) and (first.group, first.event) == (info.group, GROUP_CREATED)
            msg_id = await alice.send(info.group, "hi bob")
            message = await anext(events)
            assert isinstance(message, Message)
            assert (message.id, message.body, message.group, message.encrypted) == (msg_id, "hi bob", info.group,
                                                                                   True)
            assert (await bob.group_info(info.group)).members == ("alice", "bob")
            assert await alice.rename_group(info.group, "us") > message.gseq
            renamed = await anext(events)
            assert isinstance(renamed, GroupEvent) and (renamed.event, renamed.name) == ("renamed", "us")
            await events.aclose()

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 3))
