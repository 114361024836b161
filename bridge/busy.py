"""Which devices a periodic round has to look at (pure).

The redelivery round (each second) and the expiry sweep (each minute) used to walk every
device's box to find the few with something to do: with 10,000 idle phones the
redelivery round held the event loop 3-8 ms every second and the sweep several ms
more, whatever the traffic, and both grow with the connections, not with the traffic
(bench/results/lean/profiles.md). ``BusyDevices`` holds the devices marked since the last
round (an item sent, an item staged); a round keeps those that still have something.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized


class BusyDevices:
    """Devices marked since the last round, until a round finds nothing of theirs left."""

    __slots__ = ("_devices",)

    def __init__(self) -> None:
        self._devices: set[str] = set()

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[str]:
        """The devices marked (a superset of those with something), without dropping any."""
        return iter(self._devices)

    def add(self, device: str) -> None:
        self._devices.add(device)

    def still(self, what: Callable[[str], Sized | None]) -> list[str]:
        """The devices for which ``what`` (their items in flight, their staged items; None: gone) is not
        empty; the others are dropped, so the next round does not look at them again."""
        busy = [device for device in self._devices if what(device)]
        self._devices = set(busy)
        return busy
