"""What both presence services share -- ``PresenceService`` (bridge/presence/service.py, one
node) and ``ClusterPresence`` (bridge/cluster/presence.py, many): heartbeats into the core, the
table of requests, their arguments, and the one timer at the core's next deadline."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, TypeVar

from bridge.background import Supervisor
from bridge.clock import Clock
from bridge.links import LinkRegistry
from bridge.presence.core import PresenceCore, PresenceOutcome
from bridge.presence.timer import DeadlineTimer
from bridge.requests import Op, OpError, check_args
from bridge.store import StoreError
from chatproto import PRIVACY_CHOICES, Caller, DecodeError, ErrorCode, ErrorItem, Heartbeat, parse_user_list

log = logging.getLogger(__name__)

T = TypeVar("T")


def user_args(args: dict[str, Any]) -> list[str]:
    """The ``users`` argument of a presence or contacts request (section 8), or ``OpError``."""
    check_args(args, {"users"})
    try:
        return parse_user_list(args)
    except DecodeError as exc:
        raise OpError(exc.code, exc.detail) from None


def privacy_arg(args: dict[str, Any]) -> str:
    """The setting of a ``privacy.set``, or ``OpError``."""
    check_args(args, {"last_seen"})
    setting = args.get("last_seen")
    if setting not in PRIVACY_CHOICES:
        raise OpError(ErrorCode.BAD_ENVELOPE, f"'last_seen' must be one of {', '.join(PRIVACY_CHOICES)}")
    return str(setting)


async def saved(write: Awaitable[T]) -> T:
    """A store write of a request: a ``StoreError`` becomes the request's ``internal`` answer."""
    try:
        return await write
    except StoreError as exc:
        log.error("presence: %s", exc)
        raise OpError(ErrorCode.INTERNAL, "the server could not save this change; try again") from None



class PresenceShell(ABC):
    """The common part of a presence service: the core (``core``, read by stats and tests), the
    link registry, the clock (``steady_ms``: windows must not jump, ``last_seen`` is wall time;
    bridge/clock.py) and the timer, which calls ``_fire``."""

    def __init__(self, core: PresenceCore, links: LinkRegistry, *, clock: Clock, supervisor: Supervisor) -> None:
        self.core = core
        self._links = links
        self._now = clock.steady_ms
        self._supervisor = supervisor
        self._timer = DeadlineTimer(self._now, self._fire, supervisor)

    def on_heartbeat(self, caller: Caller, payload: bytes) -> None:
        try:
            heartbeat = Heartbeat.decode(payload)
        except DecodeError as exc:
            self._links.send(caller.client_id, ErrorItem(exc.code, exc.detail, exc.ref))
            return
        self._apply(self.core.heartbeat(caller.user, caller.client_id, heartbeat.away, self._now()))

    def ops(self) -> dict[str, Op]:
        return {
            "presence.get": self._get,
            "presence.subscribe": self._subscribe,
            "presence.unsubscribe": self._unsubscribe,
            "privacy.get": self._privacy_get,
            "privacy.set": self._privacy_set,
            "contacts.add": self._contacts_add,
            "contacts.remove": self._contacts_remove,
        }

    @abstractmethod
    def _apply(self, out: PresenceOutcome) -> None:
        """Carry out what the core decided (send its items, ...), and re-arm the timer."""

    @abstractmethod
    def _fire(self) -> None: ...

    @abstractmethod
    async def _get(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _subscribe(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _unsubscribe(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _privacy_get(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _privacy_set(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _contacts_add(self, caller: Caller, args: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def _contacts_remove(self, caller: Caller, args: dict[str, Any]) -> Any: ...
