"""Group messages end to end between SDK devices in one process, without a broker: each
device has a real local store, Olm account, outbox, inbox and ``GroupChannel``; a small hub
stands in for the server's routing (key directory, ``group.info``, fanout with ``gseq``, Olm
messages per device) so that what the SDK does can be checked item by item: shares travel
as Olm messages the app never sees, a message waits for its key, a removed member gets no
new key and cannot read later ciphertext, a new member reads from its join on, a re-send
is the same ciphertext, repeats are handed over once."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from chatproto import (
    GROUP_CREATED,
    GROUP_MEMBER_ADDED,
    GROUP_MEMBER_REMOVED,
    MEGOLM_TYPE,
    OLM_TYPE,
    OP_KEYS_CLAIM,
    OP_KEYS_COUNT,
    OP_KEYS_LIST,
    OP_KEYS_PUBLISH,
    ChatMessage,
    ErrorCode,
    GroupItem,
    MsgItem,
)
from client_sdk.e2e import E2E
from client_sdk.errors import RequestError
from client_sdk.events import Event, GroupEvent, Message, Undecryptable
from client_sdk.groupflow import DEVICE_LIST_TTL_S, GroupChannel
from client_sdk.groupkeys import GroupCrypto
from client_sdk.groups import Membership
from client_sdk.inbox import Inbox
from client_sdk.localstore import LocalStore, OutMessage
from client_sdk.megolm import Outbound
from client_sdk.outbox import Outbox
from client_sdk.senderkeys import SHARE_TYPE, Envelope, GroupCiphertext, KeyShare, payload

G = "g:team"


class Hub:
    """What the server does for these tests: keys, groups, and staging items per device."""

    def __init__(self) -> None:
        self.phones: dict[str, Phone] = {}
        self.keys: dict[str, dict[str, Any]] = {}  # cid -> published device keys
        self.one_time: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.members: list[str] = []
        self.gseq = 0
        self.seqs = itertools.count(1)
        self.staged: list[bytes] = []  # every item the hub staged, as the server would hold it
        self.info_calls = 0

    def call_for(self, user: str, device: str) -> Any:
        def call(op: str, args: dict[str, Any]) -> Any:
            cid = f"{user}.{device}"
            if op == OP_KEYS_COUNT:
                return {"one_time_keys": len(self.one_time.get(cid, [])), "fallback_key": True}
            if op == OP_KEYS_PUBLISH:
                self.keys[cid] = args["device_keys"]
                self.one_time.setdefault(cid, []).extend(args.get("one_time_keys", {}).items())
                return {}
            if op == OP_KEYS_LIST:
                return {"user": args["user"], "devices": {c.split(".")[1]: k for c, k in self.keys.items()
                                                          if c.split(".")[0] == args["user"]}}
            if op == OP_KEYS_CLAIM:
                found = {}
                for dev in args["devices"]:
                    key_id, key = self.one_time[f"{args['user']}.{dev}"].pop(0)
                    found[dev] = {"id": key_id, **key, "fallback": False}
                return {"user": args["user"], "devices": found}
            if op == "group.info":
                self.info_calls += 1
                if user not in self.members:
                    raise RequestError(op, ErrorCode.NOT_MEMBER, "not a member")
                return {"group": G, "name": "team", "members": list(self.members), "admins": [self.members[0]],
                        "gseq": self.gseq, "created_at": 1}
            raise AssertionError(op)
        return call

    def join(self, phone: Phone) -> None:
        self.phones[phone.cid] = phone
        phone.e2e.sync_keys()

    def stage(self, cid: str, item: MsgItem | GroupItem) -> None:
        payload = item.encode()
        self.staged.append(payload)
        self.phones[cid].inbox.stage(item.seq, payload)

    def change(self, event: str, *users: str) -> None:
        """A membership change: the members after it and those it removed get the item."""
        self.gseq += 1
        before = list(self.members)
        if event == GROUP_CREATED:
            self.members = list(users)
        elif event == GROUP_MEMBER_ADDED:
            self.members += [u for u in users if u not in self.members]
        else:
            self.members = [u for u in self.members if u not in users]
        for cid in self.phones:
            if cid.split(".")[0] in set(self.members) | (set(before) & set(users)):
                self.stage(cid, GroupItem(next(self.seqs), G, self.gseq, event, "alice", 1000, tuple(users)))

    def route(self, sender: Phone, chat: ChatMessage) -> list[str]:
        """Stage a published message for its devices, as the server does; the cids it went to."""
        targets: list[str] = []
        if chat.type == OLM_TYPE:
            assert chat.bodies is not None
            for cid, body in chat.bodies.items():
                self.stage(cid, MsgItem(next(self.seqs), chat.id, sender.user, chat.to, OLM_TYPE, body, 2000,
                                        sender.device))
                targets.append(cid)
            return targets
        assert chat.type == MEGOLM_TYPE and sender.user in self.members
        self.gseq += 1
        for cid in self.phones:
            if cid.split(".")[0] in self.members and cid != sender.cid:
                self.stage(cid, MsgItem(next(self.seqs), chat.id, sender.user, G, MEGOLM_TYPE, chat.body, 2000,
                                        sender.device, self.gseq))
                targets.append(cid)
        return targets


class Phone:
    def __init__(self, hub: Hub, user: str, device: str = "phone") -> None:
        self.hub, self.user, self.device = hub, user, device
        self.now = 0.0  # the group channel's clock (device lists are fetched again after DEVICE_LIST_TTL_S)
        self.cid = f"{user}.{device}"
        self.store = LocalStore(None, user, device)
        key = self.store.unlock(None).subkey("olm-pickle")
        call = hub.call_for(user, device)
        self.warnings: list[Event] = []
        self.e2e = E2E(self.store, user, device, key, call, self.warnings.append)
        self.outbox = Outbox(self.store)
        self.membership = Membership(self.store, user)
        self.channel = GroupChannel(self.store, self.e2e, GroupCrypto(self.store, user, device, key),
                                    self.membership, self.outbox, call, clock=lambda: self.now)
        self.inbox = Inbox(self.store, decrypt=self._open, consume=self.channel.take_share)
        hub.join(self)

    def _open(self, seq: int, item: MsgItem) -> list[Event]:
        if item.type == MEGOLM_TYPE:
            return self.channel.open(seq, item)
        return [self.e2e.open_message(seq, item)]

    def publish(self, message: OutMessage) -> list[ChatMessage]:
        """What the engine publishes for an outbox message (shares first), without the network."""
        if message.to.startswith("g:"):
            group_message, shares = self.channel.seal(message)
            return [c for s in shares for c in self.publish(s)] + [group_message]
        sealed = self.e2e.bodies_for(message)
        return [ChatMessage(message.id, message.to, "", OLM_TYPE, message.ts, sealed.bodies, sealed.keys)]

    def send(self, body: str, route: bool = True) -> tuple[str, list[ChatMessage]]:
        message = self.outbox.add(G, body)
        chats = self.publish(message)
        if route:
            for chat in chats:
                self.hub.route(self, chat)
        return message.id, chats

    def take(self) -> list[Event]:
        """Hand over what is stored (the dispatcher's job): the events the app gets."""
        events: list[Event] = []
        assert self.inbox.hand_over(lambda e: events.append(e) is None, lambda seq: None)
        for event in events:
            if isinstance(event, GroupEvent):
                self.membership.apply(event)  # as Engine._hand_over does
        return events


def texts(events: list[Event]) -> list[str]:
    return [e.body for e in events if isinstance(e, Message)]


@pytest.fixture
def team() -> tuple[Hub, Phone, Phone, Phone]:
    hub = Hub()
    alice, bob, carol = Phone(hub, "alice"), Phone(hub, "bob"), Phone(hub, "carol")
    hub.change(GROUP_CREATED, "alice", "bob", "carol")
    for phone in (alice, bob, carol):
        assert [type(e) for e in phone.take()] == [GroupEvent]
    return hub, alice, bob, carol


def test_members_read_the_message_and_never_see_the_shares(team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, carol = team
    msg_id, chats = alice.send("hello team")
    assert [c.type for c in chats] == [OLM_TYPE, OLM_TYPE, MEGOLM_TYPE]  # a share per user, then the message
    for phone in (bob, carol):
        [message] = phone.take()
        assert isinstance(message, Message)
        assert (message.id, message.body, message.group, message.to, message.sender, message.encrypted) == (
            msg_id, "hello team", G, G, "alice", True)
        assert message.gseq == hub.gseq
    alice.send("second")
    assert texts(bob.take()) == ["second"] and texts(carol.take()) == ["second"]
    assert not any(b"hello team" in p or b"second" in p for p in hub.staged)  # the hub saw ciphertext only
    assert not any(isinstance(e, Message) and e.type == SHARE_TYPE for p in (bob, carol) for e in p.take())


def test_a_message_waits_for_its_key_and_is_handed_over_with_it(team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, _carol = team
    _msg_id, chats = alice.send("early", route=False)
    *shares, message = chats
    hub.route(alice, message)  # the message overtakes its key
    assert bob.take() == []  # waiting, acked: nothing for the app yet
    for share in shares:
        hub.route(alice, share)
    assert texts(bob.take()) == ["early"]


def test_a_resend_is_the_same_ciphertext_and_repeats_are_handed_over_once(
        team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, _carol = team
    _msg_id, chats = alice.send("once")
    message = alice.outbox.take_due()[-1]
    assert message.body == "once"
    again = alice.publish(message)
    assert again == [chats[-1]]  # kept in the outbox: no new index, no new shares
    hub.gseq -= 1
    hub.route(alice, again[0])  # the server stages a repeat under another seq
    assert texts(bob.take()) == ["once"]
    hub.stage("bob.phone", GroupItem(next(hub.seqs), G, 1, GROUP_CREATED, "alice", 1000, ("alice", "bob")))
    assert bob.take() == []  # a group change seen before (same gseq) is a repeat too


def test_a_removed_member_gets_no_new_key_and_cannot_read_later_messages(
        team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, carol = team
    _id, before = alice.send("before")
    assert texts(carol.take()) == ["before"] == texts(bob.take())
    hub.change(GROUP_MEMBER_REMOVED, "carol")
    for phone in (alice, bob, carol):
        [event] = phone.take()
        assert isinstance(event, GroupEvent) and event.event == GROUP_MEMBER_REMOVED
    assert carol.membership.members(G) is None
    staged_before = len(hub.staged)
    _msg_id, chats = alice.send("after")
    shared_to = {cid for c in chats if c.type == OLM_TYPE for cid in (c.bodies or {})}
    assert shared_to == {"bob.phone"}  # the new sender key goes to bob only
    assert GroupCiphertext.from_wire(chats[-1].body).session_id != GroupCiphertext.from_wire(before[-1].body).session_id
    assert texts(bob.take()) == ["after"]
    assert not any(b"carol" in p for p in hub.staged[staged_before:])
    # Handed the ciphertext anyway, carol's SDK has no key for it: it waits, and never opens.
    item = MsgItem(next(hub.seqs), "leak", "alice", G, MEGOLM_TYPE, chats[-1].body, 3000, "phone", hub.gseq)
    hub.stage("carol.phone", item)
    assert carol.take() == []
    old_session = chats[0]
    hub.stage("carol.phone", MsgItem(next(hub.seqs), "replay", "alice", "carol", OLM_TYPE,
                                     (old_session.bodies or {})["bob.phone"], 3000, "phone"))
    assert all(not isinstance(e, Message) for e in carol.take())  # bob's share is not carol's to open


def test_a_new_member_reads_from_its_join_on(team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, _carol = team
    before_id, before = alice.send("before dave")
    bob.take()
    dave = Phone(hub, "dave")
    hub.change(GROUP_MEMBER_ADDED, "dave")
    alice.take(), bob.take()
    assert [e.event for e in dave.take() if isinstance(e, GroupEvent)] == [GROUP_MEMBER_ADDED]
    assert dave.membership.members(G) is None  # not known from an add alone: fetched when needed
    calls = hub.info_calls
    alice.send("welcome dave")
    assert texts(dave.take()) == ["welcome dave"]
    assert hub.info_calls == calls + 1  # dave's SDK asked who is in the group before taking the share
    hub.stage("dave.phone", MsgItem(next(hub.seqs), before_id, "alice", G, MEGOLM_TYPE, before[-1].body, 3000,
                                    "phone", 2))
    [event] = dave.take()
    assert isinstance(event, Undecryptable)  # the key dave got starts after it: the earlier message does not open
    assert "does not decrypt" in event.reason


def test_a_share_from_a_non_member_is_ignored() -> None:
    hub = Hub()
    alice, bob, mallory = Phone(hub, "alice"), Phone(hub, "bob"), Phone(hub, "mallory")
    hub.change(GROUP_CREATED, "alice", "bob")
    alice.take(), bob.take()
    session = Outbound()
    share = KeyShare(G, session.id, session.session_key(), session.index).encode()
    for chat in mallory.publish(mallory.outbox.add("bob", share, SHARE_TYPE)):
        hub.route(mallory, chat)
    calls = hub.info_calls
    assert bob.take() == []
    assert hub.info_calls == calls + 1  # asked the server whether mallory joined meanwhile: no
    ciphertext = GroupCiphertext(session.id, session.encrypt(payload(Envelope("m1", G, "mallory", "phone"), "text",
                                                                     "trust me"))).to_wire()
    hub.stage("bob.phone", MsgItem(next(hub.seqs), "m1", "mallory", G, MEGOLM_TYPE, ciphertext, 3000, "phone", 9))
    assert bob.take() == []  # no key was taken from mallory: the message never opens


def test_a_plain_message_of_an_sdk_type_never_reaches_the_app(team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, _alice, bob, _carol = team
    hub.stage("bob.phone", MsgItem(next(hub.seqs), "x1", "alice", "bob", SHARE_TYPE, "{}", 3000, "phone"))
    hub.stage("bob.phone", MsgItem(next(hub.seqs), "x2", "alice", G, "text", "plain", 3000, "phone", 7))
    [message] = bob.take()
    assert isinstance(message, Message) and (message.body, message.group, message.gseq, message.encrypted) == (
        "plain", G, 7, False)


def test_a_members_new_device_gets_the_key_once_its_list_is_fetched_again(
        team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, _carol = team
    alice.send("one")
    assert texts(bob.take()) == ["one"]
    laptop = Phone(hub, "bob", "laptop")  # publishes its keys; alice's SDK fetched bob's list before
    alice.send("two")
    assert laptop.take() == []  # no key for it yet: it waits
    alice.now += DEVICE_LIST_TTL_S
    alice.send("three")
    undecryptable, three = laptop.take()  # the key came at the current index: "two" stays unreadable
    assert isinstance(undecryptable, Undecryptable) and texts([three]) == ["three"]
    assert texts(bob.take()) == ["two", "three"]


def test_a_crash_between_opening_a_share_and_taking_it_loses_nothing(team: tuple[Hub, Phone, Phone, Phone]) -> None:
    hub, alice, bob, _carol = team
    _id, chats = alice.send("early", route=False)
    *shares, message = chats
    hub.route(alice, message)
    assert bob.take() == []
    take = bob.channel.take_share

    def crash(seq: int, opened: Message) -> list[Event]:
        raise RuntimeError("the app died here")

    bob.inbox._consume = crash  # the Olm message is opened and its row restaged, then the process dies
    for share in shares:
        hub.route(alice, share)
    with pytest.raises(RuntimeError):
        bob.take()
    bob.inbox._consume = take  # the next run: the stored share is taken now, and opens the message
    assert texts(bob.take()) == ["early"]
