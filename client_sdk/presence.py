"""Presence and contacts for ``Client`` and ``AsyncClient``: argument checks, chunking, results.

The server takes at most ``MAX_USERS_PER_REQUEST`` users per request; the
clients split longer lists into several requests and merge the answers. Calls
that take several requests are written once, as ``Steps``: a generator that
yields each request ``(op, args)``, is sent its result (or has the request's
exception thrown in), and returns the call's value. Each client face runs them
with its own way of making a request (blocking, or awaited).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from chatproto import MAX_USERS_PER_REQUEST, PRIVACY_CHOICES, is_user_id
from client_sdk.errors import RequestError
from client_sdk.events import Presence

T = TypeVar("T")
Steps = Generator[tuple[str, dict[str, Any]], Any, T]
"""Requests ``(op, args)`` out, their results in, the call's value at the end."""

DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
"""A third of the server's default ``presence.online_window_s`` (30 s): two lost heartbeats are survived."""


@dataclass(frozen=True, slots=True)
class Privacy:
    last_seen: str
    """``everyone``, ``contacts`` or ``nobody``."""
    contacts: tuple[str, ...]


def user_list(users: Iterable[str]) -> list[str]:
    """The users as a list without repeats (order kept); ValueError for a malformed id."""
    if isinstance(users, str):
        raise ValueError("pass a list of user ids, not one string")
    names = list(dict.fromkeys(users))
    bad = [u for u in names if not is_user_id(u)]
    if bad:
        raise ValueError(f"not user ids: {bad[:3]!r}")
    return names


def chunks(users: list[str]) -> Iterator[dict[str, Any]]:
    """Request arguments for ``users``, at most MAX_USERS_PER_REQUEST per request."""
    for start in range(0, len(users), MAX_USERS_PER_REQUEST):
        yield {"users": users[start:start + MAX_USERS_PER_REQUEST]}


def check_privacy(last_seen: str) -> None:
    if last_seen not in PRIVACY_CHOICES:
        raise ValueError(f"last_seen must be one of {', '.join(PRIVACY_CHOICES)}, not {last_seen!r}")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def presences_from(result: Any) -> dict[str, Presence]:
    """``{"users": {"bob": {"online": .., "last_seen": ..}}}`` -> ``{"bob": Presence(...)}``."""
    users = result.get("users") if isinstance(result, dict) else None
    found: dict[str, Presence] = {}
    if isinstance(users, dict):
        for user, view in users.items():
            if isinstance(view, dict):
                online = view.get("online")
                found[str(user)] = Presence(str(user), online if isinstance(online, bool) else None,
                                            _int_or_none(view.get("last_seen")))
    return found


def privacy_from(result: Any) -> Privacy:
    data = result if isinstance(result, dict) else {}
    contacts = data.get("contacts")
    return Privacy(str(data.get("last_seen")),
                   tuple(str(c) for c in contacts) if isinstance(contacts, list) else ())


def count_from(result: Any, key: str) -> int:
    value = result.get(key) if isinstance(result, dict) else None
    return value if isinstance(value, int) else 0


# --- calls of several requests, for both client faces -----------------------------------------


def get_steps(users: Iterable[str]) -> Steps[dict[str, Presence]]:
    found: dict[str, Presence] = {}
    for args in chunks(user_list(users)):
        found.update(presences_from((yield "presence.get", args)))
    return found


def watch_steps(
    users: Iterable[str], watch: Callable[[list[str]], None], unwatch: Callable[[list[str]], None]
) -> Steps[dict[str, Presence]]:
    """Add ``users`` to the client's watch list (``watch``), then subscribe; a refused chunk is
    taken off the list again (``unwatch``) and the refusal raised."""
    names = user_list(users)
    watch(names)
    found: dict[str, Presence] = {}
    for args in chunks(names):
        try:
            found.update(presences_from((yield "presence.subscribe", args)))
        except RequestError:
            unwatch(args["users"])
            raise
    return found


def unwatch_steps(users: Iterable[str], unwatch: Callable[[list[str]], None]) -> Steps[None]:
    names = user_list(users)
    unwatch(names)
    for args in chunks(names):
        yield "presence.unsubscribe", args


def contacts_steps(op: str, users: Iterable[str]) -> Steps[int]:
    """``contacts.add`` or ``contacts.remove``; returns the size of the contact list after."""
    size = 0
    for args in chunks(user_list(users)):
        size = count_from((yield op, args), "contacts")
    return size
