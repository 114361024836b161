"""The amqtt 0.12.1 faults 1-4 (docs/AMQTT.md, "The faults") are fixed in broker/server.py.

Each test performs one attack over real sockets and runs twice: against the ChatBroker,
where the attack must fail (``chatbroker-is-fixed``), and against a stock
``amqtt.broker.Broker`` (``stock-amqtt-is-vulnerable``), where the very same attack must
succeed. The stock run proves that the attack is real and that the test would fail if
the fix regressed (or if a new amqtt release changed the internals the fix relies on).
The faults are amqtt's, so the ChatBroker runs with ``mqtt.lean_sessions: false`` (every client
on amqtt's path); the lean path's login and takeover: tests/mqtt/test_lean_chat.py, and the
suites that run on both paths (tests/deployment.py).
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from amqtt.broker import Broker, RetainedApplicationMessage

from tests.helpers import WAIT_S, BrokerThread, Peer, eventually
from tests.stock_amqtt import RawClient, StockBroker, connect_packet, file_auth_plugins, password_file

pytestmark = pytest.mark.filterwarnings("ignore:.*psutil.*:DeprecationWarning")  # stock $SYS plugin

T = TypeVar("T")
USERS = {name: f"{name}-pw" for name in ("alice", "bob", "mallory")}
REFUSED = 0x05  # CONNACK "not authorized" (MQTT 3.1.1 section 3.2.2.3), what both brokers answer
StockConfig = Literal["default", "passwords", "passwords+acl"]



@dataclass
class Target:
    """One broker under attack, seen as a client sees it plus a window on its internals."""

    kind: Literal["chatbroker", "stock"]
    port: int
    broker: Broker
    _call: Callable[[Coroutine[Any, Any, Any]], Any]
    peers: list[Peer] = field(default_factory=list)
    raws: list[RawClient] = field(default_factory=list)

    @property
    def fixed(self) -> bool:
        return self.kind == "chatbroker"

    def expect(self, *, fixed: T, vulnerable: T) -> T:
        """The outcome this target must show: the fix's, or the stock fault's."""
        return fixed if self.fixed else vulnerable

    def inspect(self, fn: Callable[[Broker], T]) -> T:
        """Run ``fn(broker)`` on the broker's own event loop (no races with its tasks)."""

        async def run() -> T:
            return fn(self.broker)

        result: T = self._call(run())
        return result

    def peer(self, user: str, device: str = "phone", password: str | None = None, **kw: Any) -> Peer:
        made = Peer(self.port, user, USERS[user] if password is None else password, device, **kw)
        self.peers.append(made)
        return made

    def connected(self, user: str, device: str = "phone", subscribe: str | None = None) -> Peer:
        made = self.peer(user, device)
        assert made.connect() == 0
        if subscribe is not None:
            assert made.subscribe(subscribe) == [1]
        return made

    def raw(self) -> RawClient:
        made = RawClient(self.port)
        self.raws.append(made)
        return made

    def session_gone(self, client_id: str) -> bool:
        """The broker has finished with ``client_id``'s connection (will handled, if any)."""

        def check(broker: Broker) -> bool:
            entry = broker.sessions.get(client_id)
            return entry is None or not entry[0].transitions.is_connected()

        return self.inspect(check)

    def close(self) -> None:
        for made in self.peers:
            made.close()
        for raw in self.raws:
            raw.close()


@pytest.fixture(params=["chatbroker", "stock"], ids=["chatbroker-is-fixed", "stock-amqtt-is-vulnerable"])
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Target]]:
    """``launch(stock=..., chat_overrides=...)`` starts this run's target with users alice, bob, mallory."""
    stops: list[Callable[[], None]] = []

    def start(stock: StockConfig = "passwords", chat_overrides: dict[str, Any] | None = None) -> Target:
        target: Target
        if request.param == "chatbroker":
            chat = BrokerThread(tmp_path / "data", {"mqtt.lean_sessions": False, **(chat_overrides or {})}).start()
            stops.append(chat.stop)
            for name, pw in USERS.items():
                chat.add_user(name, pw)
            target = Target("chatbroker", chat.port, chat.app.broker, chat.call)
        else:
            plugins: dict[str, Any] | None = None
            if stock != "default":
                acl = {name: [f"u/{name}/#"] for name in USERS} if stock == "passwords+acl" else None
                plugins = file_auth_plugins(password_file(tmp_path / "passwd", USERS), acl)
            amqtt = StockBroker(plugins).start()
            stops.append(amqtt.stop)
            target = Target("stock", amqtt.port, amqtt.broker, amqtt.call)
        stops.append(target.close)
        return target

    yield start
    for stop in reversed(stops):
        stop()


# --- fault 1: identity takeover before authentication ----------------------------------


def victim_is_served(target: Target, victim: Peer, witness: Peer | None, grace: float = 1.0) -> bool:
    """Does the victim's connection still get what is meant for it?

    ChatBroker: a ``ping`` request round trip through the bridge. Stock amqtt (no bridge):
    a publish to the victim's topic by a witness that is subscribed to it too; once the
    witness has its copy, the victim gets ``grace`` seconds to receive its own.
    """
    if victim.disconnected.is_set():
        return False
    if target.fixed:
        try:
            return victim.request("ping")["ok"] is True
        except (AssertionError, RuntimeError, ValueError):  # no answer / publish failed
            return False
    assert witness is not None
    marker = uuid.uuid4().hex.encode()
    witness.publish("u/alice/in", marker)
    while witness.messages.get(timeout=WAIT_S)[1] != marker:
        pass
    try:
        while victim.messages.get(timeout=grace)[1] != marker:
            pass
    except queue.Empty:
        return False
    return not victim.disconnected.is_set()


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean_session=1", "clean_session=0"])
def test_identity_takeover(launch: Callable[..., Target], clean_session: bool) -> None:
    """A refused CONNECT must not touch the session of the client id it names.

    MQTT 3.1.1 section 3.1.4: the server validates and authenticates the CONNECT (steps
    1-2) before it takes over a connected client (step 3, MQTT-3.1.4-2) or processes
    clean_session (step 4, MQTT-3.1.4-3). amqtt does these in the reverse order: with a wrong
    password and clean_session=1 the victim's subscriptions are wiped (it stays connected
    but deaf); with clean_session=0 the victim is disconnected and its session's
    credentials overwritten. PROTOCOL.md: a refused login "touches no existing session".
    """
    target = launch(stock="passwords")
    victim = target.connected("alice", subscribe="u/alice/in")
    witness = None if target.fixed else target.connected("bob", subscribe="u/alice/in")
    assert victim_is_served(target, victim, witness, grace=WAIT_S), "control: served before the attack"

    attacker = target.raw()
    attacker.send(connect_packet("alice.phone", "alice", "not-alices-password", clean_session=clean_session))
    assert attacker.connack() == REFUSED  # both brokers refuse the login itself...
    assert attacker.closed_within(WAIT_S)

    # ...but only the fixed one leaves the victim alone.
    assert victim_is_served(target, victim, witness) is target.fixed
    subscribers = target.inspect(lambda b: [s.client_id for s, _ in b.subscriptions.get("u/alice/in", [])])
    if target.fixed:
        session = target.inspect(lambda b: b.sessions["alice.phone"][0])
        assert (session.password, "alice.phone" in subscribers) == ("alice-pw", True)
    elif clean_session:  # the symptoms docs/AMQTT.md describes: still connected, but deaf...
        assert not victim.disconnected.is_set()
        assert "alice.phone" not in subscribers
    else:  # ...or thrown out by the refused client (its session, now disconnected, soon expires)
        assert victim.disconnected.is_set()


# --- fault 2: retained messages --------------------------------------------------------

PUBLISH_PLANTS = [f"u/alice/{kind}" for kind in ("out", "ack", "seen", "req")] + ["u/bob/in"]
WILL_PLANTS = ["u/alice/hb", "u/alice/in"]  # an uplink the will's owner may use, and its inbox


def retained_chat_topics(target: Target) -> set[str]:
    return target.inspect(lambda b: {t for t in b.retained_messages if t.startswith("u/")})


def test_retained_cannot_be_planted(launch: Callable[..., Target]) -> None:
    """No client can leave a retained message on a ``u/...`` topic (PROTOCOL.md).

    Tried: the RETAIN flag on PUBLISH to uplink topics, to the own inbox and to another
    user's inbox (MQTT 3.1.1 section 3.3.1.3, MQTT-3.3.1-5), and a will with Will Retain
    set, fired by an abnormal disconnect (section 3.1.2.7, MQTT-3.1.2-17). Stock amqtt
    keeps all of them, as the spec asks; PROTOCOL.md deliberately departs from it for
    ``u/...`` topics, and the ChatBroker's retained store stays empty.
    """
    target = launch(stock="passwords")
    alice = target.connected("alice", subscribe="u/alice/in")
    for topic in PUBLISH_PLANTS:
        alice.publish(topic, b'{"kind":"msg","body":"planted"}', retain=True)

    will_codes = []
    for n, topic in enumerate(WILL_PLANTS):
        raw = target.raw()
        raw.send(connect_packet(f"alice.will{n}", "alice", USERS["alice"], will=(topic, b"{}", 1, True)))
        will_codes.append(raw.connack())
        raw.abort()  # no DISCONNECT: the will must be published (MQTT-3.1.2-8)
    # A will the sender could not publish itself is refused at CONNECT by the ChatBroker.
    assert will_codes == target.expect(fixed=[0, REFUSED], vulnerable=[0, 0])
    for n in range(len(WILL_PLANTS)):
        eventually(lambda n=n: target.session_gone(f"alice.will{n}"), what=f"alice.will{n} handled")

    planted = set(PUBLISH_PLANTS) | set(WILL_PLANTS)
    if target.fixed:
        assert victim_is_served(target, alice, None)  # ping: alice's publishes were all handled before it
    else:
        eventually(lambda: retained_chat_topics(target) == planted, what="stock retains every plant")
    assert retained_chat_topics(target) == target.expect(fixed=set(), vulnerable=planted)
    assert target.inspect(lambda b: len(b.retained_messages)) == target.expect(fixed=0, vulnerable=len(planted))


def test_retained_leak_to_other_users(launch: Callable[..., Target]) -> None:
    """A retained message on alice's inbox never reaches mallory (defence in depth).

    amqtt, on every CONNECT, pushes the retained messages matching EVERY client's
    subscription filters to the newcomer, with no topic ACL check (MQTT 3.1.1 section
    3.3.1.3 sends retained messages only for the subscriber's own new subscription,
    MQTT-3.3.1-6). Even with its ACL plugin refusing mallory's SUBSCRIBE to u/alice/in,
    stock amqtt hands her alice's data. The message is planted directly into the broker,
    since test_retained_cannot_be_planted shows no client can plant it on the ChatBroker.
    """
    target = launch(stock="passwords+acl")
    target.connected("alice", subscribe="u/alice/in")  # puts u/alice/in among the broker's filters
    secret = b'{"kind":"msg","from":"bob","body":"for alice only"}'

    def plant(broker: Broker) -> None:
        broker._retained_messages["u/alice/in"] = RetainedApplicationMessage(None, "u/alice/in", secret, 1)

    target.inspect(plant)

    mallory = target.connected("mallory")
    # The ACL is in force on both brokers; its SUBACK also comes after any retained
    # message pushed at connect time, so everything that leaked is in the queue now.
    assert mallory.subscribe("u/alice/in") == [0x80]
    leaked = [mallory.messages.get_nowait() for _ in range(mallory.messages.qsize())]
    assert [(topic, payload) for topic, payload, _ in leaked] == target.expect(
        fixed=[], vulnerable=[("u/alice/in", secret)]
    )
    # The plant is still live on both: the ChatBroker's "nothing" is its choice, not luck.
    assert target.inspect(lambda b: b.retained_messages["u/alice/in"].data) == secret

    if target.fixed:  # and alice's own new device is not served the planted message either
        tablet = target.connected("alice", "tablet", subscribe="u/alice/in")
        assert mallory.nothing_arrives(within=0)
        rid = "after-plant"
        arrived = []
        tablet.publish("u/alice/req", {"rid": rid, "op": "ping"})
        while (item := tablet.messages.get(timeout=WAIT_S))[1].find(rid.encode()) < 0:
            arrived.append(item)
        assert all(payload != secret and not retain for _, payload, retain in arrived)


# --- fault 3: failed logins leave sessions behind --------------------------------------

FAILED_LOGINS = 50


def test_failed_logins_leave_no_session(launch: Callable[..., Target]) -> None:
    """Refused CONNECTs must leave no session behind (MQTT 3.1.1 section 3.2.2.3:
    a non-zero CONNACK return code ends the connection, and MQTT-3.2.2-5 the server
    then closes it; nothing of it may be kept).

    Stock amqtt registers the session before authenticating and never removes it: each
    failed login is a "connected" session forever. The ChatBroker's login throttle is
    opened up here so that every attempt goes through the full password check, and its CONNECT
    deadline raised: 50 scrypt checks queued behind 2 slots passed 10 s on a loaded machine.
    """
    target = launch(stock="passwords", chat_overrides={"auth.free_failures": 10_000, "limits.connect_timeout_s": 60})
    before = target.inspect(lambda b: len(b.sessions))
    clients = [target.raw() for _ in range(FAILED_LOGINS)]
    for n, raw in enumerate(clients):
        raw.send(connect_packet(f"mallory.guess{n}", "mallory", f"guess-{n}"))
    assert [raw.connack() for raw in clients] == [REFUSED] * FAILED_LOGINS
    assert all(raw.closed_within(WAIT_S) for raw in clients)  # MQTT-3.2.2-5

    after = target.inspect(lambda b: len(b.sessions))
    assert after - before == target.expect(fixed=0, vulnerable=FAILED_LOGINS)
    still_connected = target.inspect(
        lambda b: sum(s.transitions.is_connected() for cid, (s, _) in b.sessions.items() if cid.startswith("mallory."))
    )
    assert still_connected == target.expect(fixed=0, vulnerable=FAILED_LOGINS)


# --- fault 4: anonymous sessions -------------------------------------------------------


def test_anonymous_connect_and_marking(launch: Callable[..., Target]) -> None:
    """A CONNECT without user name is refused, and a logged-in session is not anonymous.

    MQTT 3.1.1 section 3.1.3.4/5 leaves it to the server whether user name and password
    are required; PROTOCOL.md requires them. Stock amqtt's default AnonymousAuthPlugin
    (allow_anonymous: true) accepts anyone and marks EVERY session anonymous, which turns
    off offline queueing for all of them (``Broker._run_broadcast``).
    """
    target = launch(stock="default")
    anonymous = target.raw()
    anonymous.send(connect_packet("alice.anon"))
    assert anonymous.connack() == target.expect(fixed=REFUSED, vulnerable=0x00)

    target.connected("alice", subscribe="u/alice/in")
    assert target.inspect(lambda b: b.sessions["alice.phone"][0].is_anonymous) is target.expect(
        fixed=False, vulnerable=True
    )


# --- found by the benchmarks: quadratic login storms -----------------------------------


def test_subscribe_cost_does_not_grow_with_clients(launch: Callable[..., Target]) -> None:
    """amqtt runs ``logger.debug(repr(self._subscriptions))`` after every SUBSCRIBE, debug
    logging off or not: each login renders every client's subscriptions, so logging in
    10,000 phones is quadratic (bench/results/analysis.md section 3: 71% of the CPU of a
    login storm). The fixed table renders its size, whatever the number of clients.
    """
    target = launch(stock="passwords")
    for n, user in enumerate(USERS):
        target.connected(user, f"dev{n}", subscribe=f"u/{user}/in")

    def rendered(broker: Broker) -> int:
        return len(repr(broker._subscriptions))  # what amqtt builds per SUBSCRIBE

    size = target.inspect(rendered)
    assert (size < 40) == target.fixed, size
