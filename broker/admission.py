"""How many connections one address may have open before they log in (pure: no sockets, no clock).

A connection costs the broker its buffers and a task from accept until CONNACK; the
CONNECT deadline (``limits.connect_timeout_s``) and the CONNECT size cap
(``mqtt.max_connect_bytes``) bound each one, and this bounds how many one address
may hold at once (``limits.max_unauthenticated_per_address``). Connections that
have logged in do not count, so a flood of unfinished ones from one address never
touches its clients that are already in.
"""

from __future__ import annotations


class AddressSlots:
    """Counts unauthenticated connections per address; ``cap`` 0 means no cap."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._held: dict[str, int] = {}

    def take(self, address: str) -> bool:
        """One more connection from ``address``; False (nothing taken) if it already holds ``cap``."""
        held = self._held.get(address, 0)
        if self._cap and held >= self._cap:
            return False
        self._held[address] = held + 1
        return True

    def give(self, address: str) -> None:
        """A connection taken with ``take`` logged in or ended."""
        held = self._held.get(address, 0) - 1
        if held > 0:
            self._held[address] = held
        else:
            self._held.pop(address, None)  # no entry per address seen once: the table stays small

    def held(self, address: str) -> int:
        return self._held.get(address, 0)
