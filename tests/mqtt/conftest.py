"""Targets of the conformance tests: the ChatBroker, and stock amqtt 0.12.1 that must fail them.

Every test in tests/mqtt/ that takes ``target`` or ``launch`` runs on each target:
``chatbroker-conforms`` (``mqtt.lean_sessions`` on: chat sessions on the lean path, the rest handed to amqtt),
``lean-ws-conforms`` (the same, every packet sent and read over WebSocket: testkit/ws_socket.py)
and ``amqtt-path-conforms`` (``mqtt.lean_sessions`` off: every client on amqtt) must pass;
``stock-amqtt-fails`` runs the very same bytes against an unmodified ``amqtt.broker.Broker``
(default plugins: anyone may connect) and is a strict xfail: if stock amqtt ever passed, the suite would fail, because
the test would no longer prove anything about the broker layer's fixes. Only a
failed assertion or a socket error/timeout counts as the expected failure.

The ChatBroker runs with ``config/open-mqtt.yaml`` (every non-chat topic open to
anonymous clients) unless a test passes another ``mqtt`` section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.packets import RawClient, connect_packet
from tests.helpers import BrokerThread
from tests.stock_amqtt import StockBroker

ROOT = Path(__file__).resolve().parents[2]
OPEN_CONFIG = ROOT / "config" / "open-mqtt.yaml"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
# How long a connection the broker must close may stay open. The ChatBroker closes within
# milliseconds: 5 s is a bound for a loaded machine. Stock amqtt, where such a connection
# is never closed (it waits for bytes that do not come), is given 1 s to keep its runs short.
CHAT_CLOSE_S = 5.0
STOCK_CLOSE_S = 1.0

STOCK_FAILS = pytest.mark.xfail(
    strict=True, raises=(AssertionError, OSError), reason="stock amqtt 0.12.1 breaks this MQTT 3.1.1 rule"
)


def open_mqtt_section() -> dict[str, Any]:
    loaded = yaml.safe_load(OPEN_CONFIG.read_text(encoding="utf-8"))
    return dict(loaded["mqtt"])


@dataclass
class Target:
    """One broker, seen as a client sees it: a port to open raw connections to."""

    name: str
    port: int
    websocket: bool = False
    """MQTT over WebSocket on ``/mqtt`` (``port`` is a ws listener's)."""
    raws: list[RawClient] = field(default_factory=list)

    @property
    def is_chatbroker(self) -> bool:
        return self.name == "chatbroker"

    def raw(self) -> RawClient:
        made = RawClient(self.port, websocket=self.websocket)
        made.close_s = CHAT_CLOSE_S if self.is_chatbroker else STOCK_CLOSE_S
        self.raws.append(made)
        return made

    def connect(
        self, client_id: str, user: str | None = None, *, clean: bool = True, keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None, code: int = 0,
    ) -> tuple[RawClient, bool]:
        """A raw connection after CONNECT; asserts the CONNACK code, returns (client, session present)."""
        raw = self.raw()
        password = USERS[user] if user is not None else None
        raw.send(connect_packet(client_id, user, password, keepalive, clean, will))
        session_present, got = raw.connack_full()
        assert got == code, f"CONNACK {got:#x} for {client_id}, expected {code:#x}"
        return raw, session_present

    def client(self, client_id: str, user: str | None = None, **kw: Any) -> RawClient:
        return self.connect(client_id, user, **kw)[0]

    def close(self) -> None:
        for raw in self.raws:
            raw.close()


@pytest.fixture(params=["chatbroker", "lean-ws", "amqtt-path", pytest.param("stock", marks=STOCK_FAILS)],
                ids=["chatbroker-conforms", "lean-ws-conforms", "amqtt-path-conforms", "stock-amqtt-fails"])
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Target]]:
    """``launch(mqtt=...)`` starts this run's broker; ``mqtt`` is the ChatBroker's ``mqtt:`` section
    (default: config/open-mqtt.yaml's; ``{}`` for the embedded defaults). Stock amqtt ignores it."""
    stops: list[Callable[[], None]] = []

    def start(mqtt: dict[str, Any] | None = None) -> Target:
        if request.param in ("chatbroker", "lean-ws", "amqtt-path"):
            section = open_mqtt_section() if mqtt is None else mqtt
            # pinned: chat sessions on the lean path (the default), or every client on amqtt
            section = {**section, "lean_sessions": request.param != "amqtt-path"}
            websocket = request.param == "lean-ws"  # the same bytes inside WebSocket frames (broker/lean_ws.py)
            ws = {"listeners.ws.bind": "127.0.0.1:0"} if websocket else {}
            chat = BrokerThread(tmp_path / "data", {"mqtt": section, **ws}).start()
            stops.append(chat.stop)
            for name, password in USERS.items():
                chat.add_user(name, password)
            target = Target("chatbroker", chat.address("ws")[1] if websocket else chat.port, websocket)
        else:
            stock = StockBroker().start()
            stops.append(stock.stop)
            target = Target("stock", stock.port)
        stops.append(target.close)
        return target

    yield start
    for stop in reversed(stops):
        stop()


@pytest.fixture
def target(launch: Callable[..., Target]) -> Target:
    """This run's broker with config/open-mqtt.yaml (ChatBroker) or as shipped (stock amqtt)."""
    return launch()


@pytest.fixture
def chatbroker(tmp_path: Path) -> Iterator[Target]:
    """The ChatBroker alone, with config/open-mqtt.yaml: for checks stock amqtt passes too."""
    chat = BrokerThread(tmp_path / "data", {"mqtt": open_mqtt_section()}).start()
    for name, password in USERS.items():
        chat.add_user(name, password)
    target = Target("chatbroker", chat.port)
    yield target
    target.close()
    chat.stop()
