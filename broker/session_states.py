"""amqtt's per-session state machine, without the 16 KiB ``transitions.Machine``.

amqtt builds a ``transitions.Machine`` (states, transitions, events, callbacks)
for every ``Session``: 16 KiB per connected phone, the largest single item of a
connection's memory (bench/results/probe-memory.md). The machine has three
states and two triggers; ``SessionStates`` is that, with the same face amqtt and
this broker use (``state``, ``connect``, ``disconnect``, ``is_*``), the same
refusal (``MachineError`` for connect while connected) and the same callbacks
(the session's connect/disconnect times).

``lighten`` also gives a new session queues that are made on first use
(broker/lazy_queue.py): an idle chat session never uses them.
"""

from __future__ import annotations

from amqtt.session import Session
from transitions import MachineError

from broker.lazy_queue import LazyQueue

NEW, CONNECTED, DISCONNECTED = "new", "connected", "disconnected"


class SessionStates:
    __slots__ = ("_session", "state")

    def __init__(self, session: Session, state: str = NEW) -> None:
        self._session = session
        self.state = state

    def connect(self) -> bool:
        if self.state == CONNECTED:
            raise MachineError(f"\"Can't trigger event connect from state {CONNECTED}!\"")
        self.state = CONNECTED
        self._session._on_enter_connected()  # amqtt's own callback, as the Machine calls it
        return True

    def disconnect(self) -> bool:
        self.state = DISCONNECTED
        self._session._on_enter_disconnected()  # as above
        return True

    def is_new(self) -> bool:
        return self.state == NEW

    def is_connected(self) -> bool:
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        return self.state == DISCONNECTED


def lighten(session: Session) -> Session:
    """Replace a new ``session``'s Machine with ``SessionStates`` in the same state, its queues with lazy ones."""
    if session.retained_messages.empty() and session.delivered_message_queue.empty():
        session.retained_messages = LazyQueue()
        session.delivered_message_queue = LazyQueue()
    # Duck-typed: amqtt and this broker only use the members SessionStates has.
    session.transitions = SessionStates(session, session.transitions.state)  # type: ignore[assignment]
    return session
