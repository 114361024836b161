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
from transitions import Machine, MachineError

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
    machine = session.transitions
    # Duck-typed: amqtt and this broker only use the members SessionStates has.
    session.transitions = SessionStates(session, machine.state)  # type: ignore[assignment]
    _free(machine)
    return session


def set_aside(incoming: Session) -> None:
    """A new ``incoming`` session that is not used (a stored one is resumed instead): free its Machine now."""
    if not isinstance(incoming.transitions, SessionStates):
        _free(incoming.transitions)


def _free(machine: Machine) -> None:
    # A Machine is a web of cycles (~170 objects, 16 KiB): dropped as it is, it waits for the
    # cyclic GC, and under gc.freeze (chatserver/gc_policy.py) possibly for a full collection.
    # Emptied, it is freed by reference counting at once.
    vars(machine).clear()
