"""Admission rules shared by the single-node staging core (bridge/messaging/core.py) and cluster
mode (bridge/cluster/messaging.py): holds after a transient refusal (rule 4) and the olm target
check (rule 8). Pure: no I/O; the caller passes the time and the keyed devices.
"""

from __future__ import annotations

from bridge.keys.core import KeyedDevices
from bridge.messaging.records import Hold
from chatproto import ChatMessage, ErrorCode, ErrorItem

HOLD_S = 60.0  # how long a device's later messages wait for the re-send of a refused one
ANSWERED_MAX = 64  # per device: the ids answered 'sent' a hold must not wait for (see Holds.answered)
# Refused ids a hold remembers per device: a client publishing new ids under a hold, without end,
# cannot grow it past this (a few KB). An honest client refused more than this in a row (a long
# outbox published at once) loses nothing: see ``Holds.check``.
MAX_HELD_IDS = 256


class Refused(Exception):
    """An uplink is refused; ``item`` is the error answering it."""

    def __init__(self, item: ErrorItem) -> None:
        super().__init__(item.detail)
        self.item = item


class Holds:
    """Per sending device (client id): the ids of its messages refused for a transient reason, in
    order. Its later messages are refused too until it re-sends those, first one first, so a retry
    cannot land behind newer ones. At most ``MAX_HELD_IDS`` ids are remembered per device."""

    def __init__(self) -> None:
        self._held: dict[str, Hold] = {}
        self._answered: dict[str, dict[str, float]] = {}  # origin -> ids answered 'sent' -> when

    def answered(self, origin: str, msg_id: str, now: float) -> None:
        """``msg_id`` was answered ``sent``: the device will not send it again, so no hold waits for
        it. Where repeats are recognised only after admission (cluster mode: the dedup mark is in
        Redis), a re-send that crossed its ``sent`` -- the SDK re-sends what is unanswered after 10 s,
        a lane held up by a failover answers late -- was refused and held the device's later
        messages behind an id it never sent again, a minute per such id (``bench chaos --cluster``).
        Remembered for HOLD_S, the last ``ANSWERED_MAX`` per device."""
        answered = self._answered.setdefault(origin, {})
        answered.pop(msg_id, None)
        answered[msg_id] = now
        while len(answered) > ANSWERED_MAX or now - next(iter(answered.values())) >= HOLD_S:
            del answered[next(iter(answered))]
        hold = self._held.get(origin)
        if hold is not None and msg_id in hold.ids:
            if hold.ids[0] == msg_id:
                hold.until = now + HOLD_S  # the next one gets its full time
            hold.ids.remove(msg_id)
            if not hold.ids:
                del self._held[origin]

    def was_answered(self, origin: str, msg_id: str, now: float) -> bool:
        when = self._answered.get(origin, {}).get(msg_id)
        return when is not None and now - when < HOLD_S

    def prune(self, now: float) -> None:
        """Forget the answered ids older than HOLD_S of every device (a periodic sweep)."""
        for origin in list(self._answered):
            answered = self._answered[origin]
            for msg_id in [m for m, when in answered.items() if now - when >= HOLD_S]:
                del answered[msg_id]
            if not answered:
                del self._answered[origin]

    def check(self, origin: str, msg_id: str, now: float) -> None:
        """Raises ``Refused`` if earlier refused messages of ``origin`` must come before ``msg_id``.
        A message answered ``sent`` already passes: it is a repeat, answered ``sent`` again."""
        hold = self._held.get(origin)
        if hold is None or self.was_answered(origin, msg_id, now):
            return
        while now >= hold.until:
            # Its first message was not re-sent within HOLD_S (a client that gave it up): the next one
            # leads now. The others keep their order -- dropping the whole hold let whatever came
            # next overtake them (bench chaos --cluster: a new message before 80 refused ones).
            hold.ids.pop(0)
            hold.until += HOLD_S
            if not hold.ids:
                del self._held[origin]
                return
        if msg_id != hold.ids[0]:
            if not hold.full and msg_id not in hold.ids:
                # Refused under the hold: it must come back in its turn, not ahead of the others
                # refused before it (a message published after the first re-send was accepted
                # would otherwise overtake them).
                if len(hold.ids) < MAX_HELD_IDS:
                    hold.ids.append(msg_id)
                else:
                    # Refused all the same, not remembered. From now on no new id is remembered until
                    # the remembered ones are through: one remembered once a place freed up would
                    # lead a message refused unremembered before it. The unremembered ones then come
                    # in the order the client re-sends them, after every remembered one.
                    hold.full = True
            raise Refused(ErrorItem(hold.code, f"message {hold.ids[0]!r} was refused first; re-send it before "
                                    "later ones", msg_id))
        hold.ids.pop(0)
        hold.until = now + HOLD_S
        if not hold.ids:
            del self._held[origin]

    def hold(self, origin: str, msg_id: str, code: str, now: float) -> None:
        """``msg_id`` was refused: the device's later messages wait until it is re-sent (first in line);
        not if it was answered ``sent`` (a repeat), which the device does not send again."""
        if self.was_answered(origin, msg_id, now):
            return
        hold = self._held.get(origin)
        if hold is None:
            self._held[origin] = Hold([msg_id], code, now + HOLD_S)
        else:  # refused again on its re-send: still first, the others still behind it
            hold.ids.insert(0, msg_id)
            hold.code, hold.until = code, now + HOLD_S

    def forget(self, origin: str) -> None:
        self._held.pop(origin, None)
        self._answered.pop(origin, None)

    def remembered(self, origin: str) -> int:
        """How many refused ids of ``origin`` are remembered (at most ``MAX_HELD_IDS``)."""
        hold = self._held.get(origin)
        return 0 if hold is None else len(hold.ids)


def required_devices(keyed: KeyedDevices, origin: str, sender: str, to: str) -> frozenset[str]:
    """Client ids an olm message from ``origin`` to ``to`` must carry a ciphertext for."""
    return (keyed.of_user(to) | keyed.of_user(sender)) - {origin}


def olm_targets(keyed: KeyedDevices, holds: Holds, origin: str, sender: str, message: ChatMessage,
                now: float) -> list[str]:
    """The devices of an olm message; raises ``Refused`` (a mismatch holds the device's later messages)."""
    bodies = set(message.bodies or {})
    if not keyed.of_user(message.to) - {origin}:
        raise Refused(ErrorItem(ErrorCode.NO_KEYS, f"{message.to} has no device with published keys", message.id))
    required = required_devices(keyed, origin, sender, message.to)
    # Without 'keys' (an SDK older than them) only the ids are checked.
    stale = keyed.stale(message.keys, bodies & required) if message.keys is not None else []
    if bodies != required or stale:
        holds.hold(origin, message.id, ErrorCode.DEVICES_MISMATCH, now)
        raise Refused(ErrorItem(ErrorCode.DEVICES_MISMATCH, "'bodies' must name exactly the devices with "
                                "published keys, encrypted to their current identity keys", message.id,
                                tuple(sorted(required - bodies)), tuple(sorted(bodies - required)), tuple(stale)))
    return sorted(required)
