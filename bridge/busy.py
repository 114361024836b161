"""Which devices have items on the way: what a redelivery round looks at (pure).

A round used to walk every connected device's box once a second to find the few with
unacked items: with 10,000 idle phones that was 3-8 ms of the event loop every second,
during which nothing was delivered (bench/results/lean/profiles.md, ``Staging.redeliver``),
and it grows with the connections, not with the traffic. ``Sending`` holds the devices an
item was sent to since the last round; a round keeps those still waiting for an ack.
"""

from __future__ import annotations

from collections.abc import Callable, Sized


class Sending:
    """Devices an item was sent to, until a redelivery round finds nothing of theirs in flight."""

    __slots__ = ("_devices",)

    def __init__(self) -> None:
        self._devices: set[str] = set()

    def __len__(self) -> int:
        return len(self._devices)

    def add(self, device: str) -> None:
        self._devices.add(device)

    def waiting(self, in_flight: Callable[[str], Sized | None]) -> list[str]:
        """The devices with items in flight (``in_flight``: a device's unacked items, None: it is gone or
        offline); the others are dropped, so the next round does not look at them again."""
        busy = []
        for device in self._devices:
            unacked = in_flight(device)
            if unacked:
                busy.append(device)
        self._devices = set(busy)
        return busy
