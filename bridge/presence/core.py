"""The presence core: who is online, who may see it, and what watchers are told.
Pure: no I/O; every method takes the time ``now`` (ms, never going backwards)
and returns a ``PresenceOutcome`` saying which ``presence`` items to send.

Rules (docs/PROTOCOL.md, "Presence"):
1. An active heartbeat (``{}``) of device D of user U at ``now`` makes D a
   *foreground device* of U until ``now + online_window``, and sets U's
   ``last_seen = now``. U is online while U has a foreground device.
2. ``{"state":"away"}`` from a foreground device ends its foreground at once and
   sets ``last_seen = now`` (it was a heartbeat, and U was there until then).
   From a device that is not in the foreground it changes nothing (a late will
   after a dropped connection cannot move ``last_seen`` forward).
3. The window running out, or the device going away (disconnect, keepalive
   timeout, inbox unsubscribed), ends its foreground; ``last_seen`` stays the
   time of its last heartbeat. A device that never sent an active heartbeat
   (a background connection) never makes its user online.
4. Visibility of owner O to viewer V (``view``): O's setting decides whether V
   may see O at all (``everyone``; ``contacts``: V is in O's contact list;
   ``nobody``). Not allowed: ``online: null, last_seen: null``. Reciprocity:
   if V's own setting hides V's last seen from O, V is shown O's ``online``
   but ``last_seen: null``. A user always sees themself. A user id nobody has
   data for has the default setting and no contacts, so it looks exactly like
   a hidden user: requests cannot probe which users exist.
5. Watchers: a device's watch list lives until it disconnects. A watcher gets
   an item when what *it* is shown changes: ``online`` flips, ``last_seen``
   changes while offline, or a privacy change alters its view (a watcher that
   loses permission gets one ``null/null`` item, then nothing). Heartbeats that
   only move ``last_seen`` of an online user send nothing.
6. Coalescing, per (watcher device, watched user): the first change goes at
   once; further changes within ``coalesce`` of the last item wait and go as
   ONE item with the then-current view at ``last item + coalesce`` (nothing if
   the view is back to what was last sent). A user flapping for a second costs
   a watcher at most ``1 + ceil(1 s / coalesce)`` items.
7. Cost: a heartbeat of an already-online device is O(1) (a dict update and a
   dirty mark). Expiry uses one heap entry per foreground device, re-armed
   lazily when popped, so it costs O(log n) per device and window, never a
   scan over all users. ``last_seen`` reaches the disk in batches
   (``take_dirty``), never per heartbeat.
8. Cluster mode (bridge/cluster/presence.py): the core of a node holds its own
   devices as above and *mirrors* the users its devices watch or watch with:
   ``mirror`` sets what the shared store holds of one (``last_seen``, setting,
   contacts, and whether a device of theirs is in the foreground on another
   node), and watchers are told by rules 5-6. ``PresenceOutcome.foreground``
   names the users whose first local foreground device started or whose last
   one ended, for the node to write to the shared store.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from chatproto import PRIVACY_CHOICES, PRIVACY_CONTACTS, PRIVACY_EVERYONE, PresenceItem

NEVER: Final = -(1 << 62)


@dataclass(frozen=True, slots=True)
class PresenceRules:
    online_window_ms: int
    coalesce_ms: int
    max_contacts: int
    max_watched: int


@dataclass(frozen=True, slots=True)
class View:
    """What one viewer is shown of one user."""

    online: bool | None
    last_seen: int | None

    def key(self) -> tuple[bool | None, int | None]:
        """What counts as a change for a watcher: ``last_seen`` of an online user moves with every heartbeat."""
        return (self.online, None if self.online else self.last_seen)

    def as_dict(self) -> dict[str, Any]:
        return {"online": self.online, "last_seen": self.last_seen}


HIDDEN: Final = View(None, None)


def may_see(setting: str, contacts: Collection[str], viewer: str) -> bool:
    """Whether an owner with ``setting`` and ``contacts`` shows their presence to ``viewer``."""
    return setting == PRIVACY_EVERYONE or (setting == PRIVACY_CONTACTS and viewer in contacts)


def visible(viewer: str, owner: str, owner_setting: str, owner_contacts: Collection[str],
            viewer_setting: str, viewer_contacts: Collection[str], online: bool, last_seen: int | None) -> View:
    """Rule 4 as one function: the view of ``owner``'s state that ``viewer`` is allowed."""
    if viewer == owner:
        return View(online, last_seen)
    if not may_see(owner_setting, owner_contacts, viewer):
        return HIDDEN
    if not may_see(viewer_setting, viewer_contacts, owner):  # reciprocity
        return View(online, None)
    return View(online, last_seen)


class LimitExceeded(Exception):
    """A request would go over a configured limit; nothing was changed."""


@dataclass(slots=True)
class Shown:
    """Per (watcher device, watched user): what was last sent, and whether a newer view waits."""

    view: View
    sent_at: int
    pending: bool = False


@dataclass(slots=True)
class Watch:
    user: str
    owners: dict[str, Shown] = field(default_factory=dict)


@dataclass(slots=True)
class PresenceOutcome:
    items: list[tuple[str, PresenceItem]] = field(default_factory=list)
    foreground: list[tuple[str, bool]] = field(default_factory=list)  # (user, has a local foreground device now)


class PresenceCore:
    def __init__(self, rules: PresenceRules) -> None:
        self.rules = rules
        self._last_seen: dict[str, int] = {}
        self._foreground: dict[str, dict[str, int]] = {}  # user -> {client id: online until}; online users only
        self._expiry: list[tuple[int, str, str]] = []  # (at, client id, user): one entry per armed device
        self._armed: dict[str, int] = {}  # client id -> the time of its heap entry
        self._settings: dict[str, str] = {}  # only users who changed the default
        self._contacts: dict[str, set[str]] = {}
        self._watches: dict[str, Watch] = {}  # watcher client id -> its watch list
        self._watchers: dict[str, set[str]] = {}  # watched user -> watcher client ids
        self._watching_devices: dict[str, set[str]] = {}  # user -> their client ids that watch someone
        self._flushes: list[tuple[int, str, str]] = []  # (at, watcher client id, owner): coalesced items due
        self._dirty: set[str] = set()
        self._remote: set[str] = set()  # cluster mode: users in the foreground on another node

    # --- restore, persistence ----------------------------------------------------------

    def load(self, last_seen: Iterable[tuple[str, int]], settings: Iterable[tuple[str, str]],
             contacts: Iterable[tuple[str, str]]) -> None:
        """What the store holds, after a (re)start: every user starts offline."""
        self._last_seen.update(last_seen)
        for user, setting in settings:
            if setting in PRIVACY_CHOICES:
                self._settings[user] = setting
        for owner, contact in contacts:
            self._contacts.setdefault(owner, set()).add(contact)

    def take_dirty(self) -> list[tuple[str, int]]:
        """``(user, last_seen)`` changed since the last call, for one batched write."""
        rows = [(user, self._last_seen[user]) for user in self._dirty if user in self._last_seen]
        self._dirty.clear()
        return rows

    def write_failed(self, rows: Iterable[tuple[str, int]]) -> None:
        """A batch from ``take_dirty`` was not written: write those users again next time."""
        self._dirty.update(user for user, _ in rows)

    # --- state ---------------------------------------------------------------------------

    def setting(self, user: str) -> str:
        return self._settings.get(user, PRIVACY_CONTACTS)

    def contacts(self, user: str) -> set[str]:
        return self._contacts.get(user, set())

    def is_online(self, user: str) -> bool:
        return user in self._foreground or user in self._remote

    def is_local_online(self, user: str) -> bool:
        """``user`` has a foreground device here (cluster mode: not counting other nodes)."""
        return user in self._foreground

    def local_users(self) -> list[str]:
        """The users with a foreground device here."""
        return list(self._foreground)

    def last_seen(self, user: str) -> int | None:
        return self._last_seen.get(user)

    def view(self, viewer: str, owner: str) -> View:
        return visible(viewer, owner, self.setting(owner), self.contacts(owner), self.setting(viewer),
                       self.contacts(viewer), self.is_online(owner), self._last_seen.get(owner))

    def next_deadline(self) -> int | None:
        """When ``tick`` has work next (an expiry or a coalesced item), or None."""
        times = [heap[0][0] for heap in (self._expiry, self._flushes) if heap]
        return min(times) if times else None

    # --- heartbeats and devices -------------------------------------------------------------

    def heartbeat(self, user: str, device: str, away: bool, now: int) -> PresenceOutcome:
        """An ``hb`` from ``device`` (client id) of ``user``: active (``{}``) or ``away``."""
        out = self.tick(now)
        devices = self._foreground.get(user)
        if away:
            if devices is None or device not in devices:
                return out  # rule 2: not in the foreground, nothing to end
            self._set_last_seen(user, now)
            self._drop_device(user, devices, device, now, out)
            return out
        self._set_last_seen(user, now)
        if devices is None:
            devices = self._foreground[user] = {}
            devices[device] = now + self.rules.online_window_ms
            self._arm(device, user, now + self.rules.online_window_ms)
            out.foreground.append((user, True))
            self._changed(user, now, out)
        else:
            devices[device] = now + self.rules.online_window_ms
            self._arm(device, user, now + self.rules.online_window_ms)
        return out

    def device_offline(self, user: str, device: str, now: int) -> PresenceOutcome:
        """``device`` disconnected (or left its inbox): its foreground and its watch list end."""
        out = self.tick(now)
        devices = self._foreground.get(user)
        if devices is not None and device in devices:
            self._drop_device(user, devices, device, now, out)
        self._unwatch_all(device)
        return out

    def _set_last_seen(self, user: str, now: int) -> None:
        self._last_seen[user] = now
        self._dirty.add(user)

    def _arm(self, device: str, user: str, at: int) -> None:
        if device not in self._armed:  # an armed device is re-armed lazily when its entry comes due
            self._armed[device] = at
            heapq.heappush(self._expiry, (at, device, user))

    def _drop_device(self, user: str, devices: dict[str, int], device: str, now: int, out: PresenceOutcome) -> None:
        del devices[device]
        if not devices:
            del self._foreground[user]
            out.foreground.append((user, False))
            self._changed(user, now, out)

    def tick(self, now: int) -> PresenceOutcome:
        """Expire windows that ran out and send coalesced items that are due."""
        out = PresenceOutcome()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, device, user = heapq.heappop(expiry)
            devices = self._foreground.get(user)
            until = devices.get(device) if devices is not None else None
            if until is not None and until > now:  # heartbeats moved it on: re-arm at its current end
                self._armed[device] = until
                heapq.heappush(expiry, (until, device, user))
                continue
            del self._armed[device]
            if devices is not None and until is not None:
                self._drop_device(user, devices, device, now, out)
        flushes = self._flushes
        while flushes and flushes[0][0] <= now:
            _, watcher, owner = heapq.heappop(flushes)
            watch = self._watches.get(watcher)
            shown = watch.owners.get(owner) if watch is not None else None
            if watch is None or shown is None or not shown.pending:
                continue
            shown.pending = False
            view = self.view(watch.user, owner)
            if view.key() != shown.view.key():
                self._send(watcher, owner, shown, view, now, out)
        return out

    # --- watchers -------------------------------------------------------------------------

    def _changed(self, owner: str, now: int, out: PresenceOutcome) -> None:
        for watcher in self._watchers.get(owner, ()):
            self._touch(watcher, owner, now, out)

    def _touch(self, watcher: str, owner: str, now: int, out: PresenceOutcome) -> None:
        watch = self._watches[watcher]
        shown = watch.owners[owner]
        view = self.view(watch.user, owner)
        if view.key() == shown.view.key():
            shown.pending = False  # flapped back to what the watcher was shown last
            return
        due = shown.sent_at + self.rules.coalesce_ms
        if now >= due:
            shown.pending = False
            self._send(watcher, owner, shown, view, now, out)
        elif not shown.pending:
            shown.pending = True
            heapq.heappush(self._flushes, (due, watcher, owner))

    @staticmethod
    def _send(watcher: str, owner: str, shown: Shown, view: View, now: int, out: PresenceOutcome) -> None:
        shown.view = view
        shown.sent_at = now
        out.items.append((watcher, PresenceItem(owner, view.online, view.last_seen)))

    def get(self, viewer: str, users: Iterable[str], now: int) -> tuple[dict[str, View], PresenceOutcome]:
        out = self.tick(now)
        return {user: self.view(viewer, user) for user in users}, out

    def subscribe(self, watcher: str, viewer: str, users: list[str],
                  now: int) -> tuple[dict[str, View], PresenceOutcome]:
        """Add ``users`` to the watch list of device ``watcher``; their current views.

        Raises LimitExceeded (and adds nothing) past ``max_watched`` per device.
        """
        out = self.tick(now)
        watch = self._watches.get(watcher)
        have = watch.owners if watch is not None else {}
        if len(have) + len(set(users) - set(have)) > self.rules.max_watched:
            raise LimitExceeded(f"a device may watch at most {self.rules.max_watched} users")
        if watch is None:
            watch = self._watches[watcher] = Watch(viewer)
            self._watching_devices.setdefault(viewer, set()).add(watcher)
        views: dict[str, View] = {}
        for owner in users:
            view = views[owner] = self.view(viewer, owner)
            shown = watch.owners.get(owner)
            if shown is None:
                # The answer shows the current view; the first change after it goes at once.
                watch.owners[owner] = Shown(view, NEVER)
                self._watchers.setdefault(owner, set()).add(watcher)
            else:
                shown.view, shown.pending = view, False
        return views, out

    def unsubscribe(self, watcher: str, users: Iterable[str]) -> int:
        """Remove ``users`` from the watch list; how many users the device still watches."""
        watch = self._watches.get(watcher)
        if watch is None:
            return 0
        for owner in users:
            if watch.owners.pop(owner, None) is not None:
                self._forget_watcher(owner, watcher)
        if not watch.owners:
            self._drop_watch(watcher, watch)
            return 0
        return len(watch.owners)

    def watching(self, watcher: str) -> int:
        watch = self._watches.get(watcher)
        return len(watch.owners) if watch is not None else 0

    def watch_list(self, watcher: str) -> list[str]:
        watch = self._watches.get(watcher)
        return list(watch.owners) if watch is not None else []

    def involved(self, user: str) -> bool:
        """A device here watches ``user``, or a device of ``user`` here watches someone."""
        return user in self._watchers or user in self._watching_devices

    def _unwatch_all(self, watcher: str) -> None:
        watch = self._watches.get(watcher)
        if watch is None:
            return
        for owner in watch.owners:
            self._forget_watcher(owner, watcher)
        self._drop_watch(watcher, watch)

    def _forget_watcher(self, owner: str, watcher: str) -> None:
        watchers = self._watchers.get(owner)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[owner]

    def _drop_watch(self, watcher: str, watch: Watch) -> None:
        del self._watches[watcher]
        devices = self._watching_devices.get(watch.user)
        if devices is not None:
            devices.discard(watcher)
            if not devices:
                del self._watching_devices[watch.user]

    # --- privacy ---------------------------------------------------------------------------

    def set_privacy(self, user: str, setting: str, now: int) -> PresenceOutcome:
        if setting not in PRIVACY_CHOICES:
            raise ValueError(f"unknown privacy setting {setting!r}")
        out = self.tick(now)
        if setting == PRIVACY_CONTACTS:
            self._settings.pop(user, None)
        else:
            self._settings[user] = setting
        self._privacy_changed(user, now, out)
        return out

    def check_add_contacts(self, user: str, users: Iterable[str]) -> list[str]:
        """The users ``add_contacts`` would add (new, not ``user``); LimitExceeded past ``max_contacts``."""
        have = self.contacts(user)
        new = sorted({u for u in users if u != user and u not in have})
        if len(have) + len(new) > self.rules.max_contacts:
            raise LimitExceeded(f"a user may have at most {self.rules.max_contacts} contacts")
        return new

    def add_contacts(self, user: str, users: Iterable[str], now: int) -> PresenceOutcome:
        new = self.check_add_contacts(user, users)
        out = self.tick(now)
        if new:
            self._contacts.setdefault(user, set()).update(new)
            self._privacy_changed(user, now, out)
        return out

    def remove_contacts(self, user: str, users: Iterable[str], now: int) -> PresenceOutcome:
        out = self.tick(now)
        have = self._contacts.get(user)
        if have is None:
            return out
        gone = have.intersection(users)
        if gone:
            have.difference_update(gone)
            if not have:
                del self._contacts[user]
            self._privacy_changed(user, now, out)
        return out

    def _privacy_changed(self, user: str, now: int, out: PresenceOutcome) -> None:
        """``user``'s setting or contacts changed: what their watchers see of them, and (reciprocity)
        what their own devices see of the users they watch, may have changed."""
        for watcher in list(self._watchers.get(user, ())):
            self._touch(watcher, user, now, out)
        for device in list(self._watching_devices.get(user, ())):
            for owner in list(self._watches[device].owners):
                self._touch(device, owner, now, out)

    # --- cluster mode (rule 8) -----------------------------------------------------------------

    def mirror(self, user: str, last_seen: int | None, setting: str, contacts: Collection[str],
               online_elsewhere: bool, now: int) -> PresenceOutcome:
        """What the shared store holds of ``user``: watchers here are told what that changes. The
        user's devices here stay as they are; ``last_seen`` only moves forward."""
        out = self.tick(now)
        setting = setting if setting in PRIVACY_CHOICES else PRIVACY_CONTACTS
        privacy = setting != self.setting(user) or set(contacts) != self.contacts(user)
        if setting == PRIVACY_CONTACTS:
            self._settings.pop(user, None)
        else:
            self._settings[user] = setting
        if contacts:
            self._contacts[user] = set(contacts)
        else:
            self._contacts.pop(user, None)
        if last_seen is not None and last_seen > self._last_seen.get(user, NEVER):
            self._last_seen[user] = last_seen
        if online_elsewhere:
            self._remote.add(user)
        else:
            self._remote.discard(user)
        if privacy:
            self._privacy_changed(user, now, out)
        else:
            self._changed(user, now, out)
        return out

    def forget(self, user: str) -> None:
        """Drop what is mirrored of ``user`` once nothing here needs it (no local foreground device,
        not ``involved``); a user still needed is kept."""
        if user in self._foreground or self.involved(user):
            return
        self._remote.discard(user)
        self._settings.pop(user, None)
        self._contacts.pop(user, None)
        self._last_seen.pop(user, None)
        self._dirty.discard(user)

    # --- introspection (tests, benchmarks) -------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "online_users": len(self._foreground),
            "online_elsewhere": len(self._remote),
            "armed_devices": len(self._armed),
            "expiry_heap": len(self._expiry),
            "watch_lists": len(self._watches),
            "watched_users": len(self._watchers),
            "pending_flushes": len(self._flushes),
            "dirty": len(self._dirty),
        }
