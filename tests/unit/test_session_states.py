"""SessionStates (broker/session_states.py) behaves as amqtt's transitions.Machine for every
sequence of connect/disconnect: same states, same refusals, same connect/disconnect times."""

from __future__ import annotations

import gc

from amqtt.session import Session
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from broker.session_states import lighten, set_aside


def _run(session: Session, triggers: list[str]) -> list[str]:
    seen = []
    for trigger in triggers:
        try:
            getattr(session.transitions, trigger)()
            outcome = "ok"
        except MachineError:
            outcome = "refused"
        flags = (session.transitions.is_new(), session.transitions.is_connected(),
                 session.transitions.is_disconnected())
        seen.append(f"{trigger}:{outcome}:{session.transitions.state}:{flags}:"
                    f"{session.last_connect_time is not None}:{session.last_disconnect_time is not None}")
    return seen


@given(st.lists(st.sampled_from(["connect", "disconnect"]), max_size=12))
def test_same_as_amqtt_machine(triggers: list[str]) -> None:
    assert _run(lighten(Session()), triggers) == _run(Session(), triggers)


def test_keeps_the_state_it_replaces() -> None:
    session = Session()
    session.transitions.connect()
    assert lighten(session).transitions.is_connected()


def test_the_replaced_machine_is_freed_at_once_not_left_to_the_cyclic_gc() -> None:
    gc.collect()
    gc.disable()
    try:
        session = lighten(Session())
        assert gc.collect() == 0, "the old Machine's cycles became garbage for the collector"
        assert session.transitions.is_new()
    finally:
        gc.enable()


def test_an_incoming_session_set_aside_is_freed_at_once() -> None:
    gc.collect()
    gc.disable()
    try:
        incoming = Session()
        set_aside(incoming)  # a stored session was resumed in its place
        del incoming
        assert gc.collect() == 0
    finally:
        gc.enable()
