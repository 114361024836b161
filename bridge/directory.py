"""Known users and their devices, in memory; the messaging core's view of who to deliver to.

PROTOCOL.md: a device becomes known on its first successful login; a message to
a user with no known device is held for the first device that connects. Such
messages wait in the user's placeholder queue ``{user}.*``.
"""

from __future__ import annotations

from collections.abc import Iterable

PLACEHOLDER_DEVICE = "*"


def placeholder(user: str) -> str:
    return f"{user}.{PLACEHOLDER_DEVICE}"


def is_placeholder(device: str) -> bool:
    return device.endswith("." + PLACEHOLDER_DEVICE)


class Directory:
    def __init__(self) -> None:
        self._devices: dict[str, list[str]] = {}

    def load(self, pairs: Iterable[tuple[str, str | None]]) -> None:
        """(user, device or None) rows: every user, with each of their known devices."""
        for user, device in pairs:
            devices = self._devices.setdefault(user, [])
            if device is not None and f"{user}.{device}" not in devices:
                devices.append(f"{user}.{device}")

    def exists(self, user: str) -> bool:
        return user in self._devices

    def add_user(self, user: str, devices: Iterable[str] = ()) -> None:
        self.load([(user, None), *((user, d) for d in devices)])

    def add_device(self, user: str, device: str) -> bool:
        """Record a device; True if it is the user's first known device."""
        devices = self._devices.setdefault(user, [])
        client_id = f"{user}.{device}"
        if client_id in devices:
            return False
        devices.append(client_id)
        return len(devices) == 1

    def remove_device(self, user: str, device: str) -> None:
        """``devices.remove``: the device leaves the recipient set (the user stays known)."""
        devices = self._devices.get(user)
        if devices is not None and f"{user}.{device}" in devices:
            devices.remove(f"{user}.{device}")

    def targets(self, user: str) -> list[str]:
        """The devices a message to ``user`` goes to: every known one, or the placeholder."""
        return list(self._devices.get(user) or [placeholder(user)])
