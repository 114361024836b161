"""Fixtures for the SDK tests: clients that are always closed, event collectors, log watches."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import Client
from client_sdk.events import Event, Message
from tests.helpers import WAIT_S, BrokerProcess, BrokerThread


class Collector:
    """Wires a Client's callbacks to one queue of events, in the order they were handed over."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: queue.Queue[Event] = queue.Queue()
        self.stash: list[Event] = []
        client.on_message = self.events.put
        client.on_receipt = self.events.put
        client.on_presence = self.events.put
        client.on_error = self.events.put

    def next(self, kind: type[Any] = object, timeout: float = WAIT_S,
             where: Callable[[Any], bool] = lambda e: True) -> Any:
        """The first event (in hand-over order) of ``kind`` matching ``where``.

        Events that do not match are kept for later calls, so asking for a
        message first cannot lose a receipt that came before it.
        """
        def match(event: Event) -> bool:
            return isinstance(event, kind) and bool(where(event))

        for index, event in enumerate(self.stash):
            if match(event):
                return self.stash.pop(index)
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    event = self.events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if match(event):
                    return event
                self.stash.append(event)
        finally:
            timer.cancel()
        raise AssertionError(f"{self.client.user}.{self.client.device}: no {kind.__name__} within {timeout}s")

    def messages(self, count: int, timeout: float = WAIT_S) -> list[Message]:
        return [self.next(Message, timeout) for _ in range(count)]

    def all_now(self) -> list[Event]:
        """Every event not yet taken by ``next``, without waiting."""
        drained, self.stash = self.stash, []
        while True:
            try:
                drained.append(self.events.get_nowait())
            except queue.Empty:
                return drained


class LogWatch(logging.Handler):
    """Counts log records containing ``text`` (from any thread) and lets a test wait for them."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.count = 0
        self._changed = threading.Condition()
        self._logger = logging.getLogger(logger)

    def __enter__(self) -> LogWatch:
        self._logger.addHandler(self)
        self._old_level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait(self, count: int = 1, timeout: float = WAIT_S) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count, timeout), \
                f"log line {self.text!r} seen {self.count} times, expected {count}"


Factory = Callable[..., Client]


@pytest.fixture
def make_client(broker: BrokerThread | BrokerProcess, tmp_path: Path) -> Iterator[Factory]:
    """make_client("alice", device="phone", store="name.db", **options) -> an unconnected Client.

    The password defaults to the conftest one ("<user>-pw"); ``store`` names a
    file under the test's tmp_path. Every client made is closed at the end.
    """
    made: list[Client] = []

    def factory(user: str, password: str | None = "", device: str = "phone", store: str | None = None,
                **options: Any) -> Client:
        client = Client(
            user, f"{user}-pw" if password == "" else password, device=device, port=broker.port,
            store=None if store is None else tmp_path / store, reconnect_delay=(0.1, 1.0), **options,
        )
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()

