"""A device's lane in cluster mode: its uplinks (``out`` and ``seen``) waiting for Redis, handled one
at a time in the order they came (bridge/cluster/uplinks.py). Pure.

A copy of a message whose earlier copy still waits in the lane, from the same connection, is not
queued again: the earlier copy's answer (``sent`` or an error) answers both. The SDK re-sends what is
unanswered every 10 s; while a failover held a lane up that doubled its length every 10 s and
drew the answers out further (``bench chaos --cluster``: three copies of each message handled).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bridge.links import DeviceLink
from chatproto import Caller


@dataclass(frozen=True, slots=True)
class Uplink:
    """An uplink waiting in its device's lane, with the connection it came on."""

    kind: str  # "out", "seen", or "busy" (refused on arrival, answered in its turn)
    caller: Caller
    payload: bytes
    link: DeviceLink | None
    ref: str | None = None  # an ``out``'s message id, when known on arrival


@dataclass(slots=True)
class Lane:
    entries: deque[Uplink] = field(default_factory=deque)
    _refs: dict[str, DeviceLink | None] = field(default_factory=dict)  # message ids waiting -> their connection

    def __len__(self) -> int:
        return len(self.entries)

    def waiting(self, uplink: Uplink) -> bool:
        """Whether a copy of ``uplink``'s message from the same connection waits here already."""
        return uplink.ref is not None and uplink.ref in self._refs and self._refs[uplink.ref] is uplink.link

    def push(self, uplink: Uplink) -> None:
        self.entries.append(uplink)
        if uplink.ref is not None:
            self._refs[uplink.ref] = uplink.link

    def head(self) -> Uplink:
        return self.entries[0]

    def pop(self) -> None:
        uplink = self.entries.popleft()
        if uplink.ref is not None and uplink.ref in self._refs and self._refs[uplink.ref] is uplink.link:
            del self._refs[uplink.ref]
