"""``chat-broker user ...`` and ``device ...``: the operator's user management, on the data folder's
users database or, in cluster mode, the Redis Cluster's (``AccountStore``, ``Opener``)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker import credentials
from broker.users import DeviceInfo, UserInfo
from chatproto import is_user_id
from storage.sqlite.users import USERS_DB, SqliteUserStore

IMPORT_BATCH = 500


class AdminError(Exception):
    """A user command cannot be carried out; the message says why and what to do."""


def check_name(name: str) -> str:
    if not is_user_id(name):
        raise AdminError(f"invalid user name {name!r}: use 1-32 of a-z, 0-9 and _")
    return name


def password_problem(password: str) -> str | None:
    """Why ``password`` is refused, or None. Only spaces would pass for a password but guard nothing."""
    if not password.strip():
        return "empty password refused (only spaces count as empty)"
    if len(password.encode("utf-8")) > credentials.MAX_PASSWORD_BYTES:
        return f"password longer than {credentials.MAX_PASSWORD_BYTES} bytes refused"
    return None


def check_password(password: str) -> str:
    problem = password_problem(password)
    if problem:
        raise AdminError(problem)
    return password


def read_password(from_stdin: bool, stdin: TextIO = sys.stdin) -> str:
    """One password: the first line of stdin with ``--password-stdin``, else a prompt (twice)."""
    if from_stdin:
        return check_password(stdin.readline().rstrip("\r\n"))
    if not stdin.isatty():
        raise AdminError("no terminal to prompt for the password: pipe it in and pass --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise AdminError("the passwords did not match")
    return check_password(first)


class AccountStore(Protocol):
    """What the user and device commands need of the users store. ``SqliteUserStore`` (the data
    folder) and ``RedisUserStore`` implement it; in cluster mode the commands use
    ``ClusterAccounts`` (chatserver/cluster_admin.py): ``RedisUserStore``, with removals that also
    drop the device's keys and queue and close its connection on the node holding it."""

    async def add_user(self, name: str, pw_hash: str) -> None: ...

    async def add_users(self, rows: Iterable[tuple[str, str]]) -> tuple[int, list[str]]:
        """Add users (name, password hash); returns (added, names that already existed)."""

    async def user_exists(self, name: str) -> bool: ...

    async def set_password(self, name: str, pw_hash: str) -> None:
        """Change the password and revoke every token of the user (``StoreError`` if no such user)."""

    async def delete_user(self, name: str) -> None:
        """Delete the user and their devices (``StoreError`` if no such user)."""

    def iter_users(self) -> AsyncIterator[UserInfo]:
        """Every user by name, with their number of devices."""

    async def devices(self, user: str) -> list[DeviceInfo]:
        """The user's devices by id."""

    async def delete_device(self, user: str, device: str) -> bool:
        """Forget a device and its token; True if it existed."""

    async def revoke_tokens(self, user: str, device: str | None = None) -> int:
        """Clear the token of one device (or all of the user's); returns how many were set."""

    async def close(self) -> None: ...


Opener = Callable[[bool], Awaitable[AccountStore]]
"""Opens the users store the commands work on; True: create it if there is none (``add``, ``import``)."""


def sqlite_opener(data_dir: Path) -> Opener:
    """The users database in ``data_dir``."""
    async def open_store(create: bool) -> AccountStore:
        if not create:
            require_users_db(data_dir)
        return await SqliteUserStore.open(data_dir)
    return open_store


@contextlib.asynccontextmanager
async def opened(open_store: Opener, create: bool = False) -> AsyncIterator[AccountStore]:
    store = await open_store(create)
    try:
        yield store
    finally:
        await store.close()


def require_users_db(data_dir: Path) -> None:
    """For a command that has nothing to do without users: a mistyped --data-dir is said,
    instead of creating an empty folder there."""
    if not (data_dir / USERS_DB).is_file():
        raise AdminError(f"no users database in {data_dir.resolve()}: check --data-dir or the config's "
                         "data_dir ('chat-broker user add' creates it)")


async def add(open_store: Opener, name: str, password: str) -> None:
    pw_hash = await asyncio.to_thread(credentials.hash_password, password)
    async with opened(open_store, create=True) as store:
        await store.add_user(check_name(name), pw_hash)


async def passwd(open_store: Opener, name: str, password: str) -> None:
    async with opened(open_store) as store:
        await store.set_password(name, await asyncio.to_thread(credentials.hash_password, password))


async def delete(open_store: Opener, name: str) -> None:
    async with opened(open_store) as store:
        await store.delete_user(name)


async def _existing(store: AccountStore, name: str) -> None:
    if not await store.user_exists(name):
        raise AdminError(f"no user {name!r}")


async def revoke(open_store: Opener, name: str, device: str | None) -> int:
    async with opened(open_store) as store:
        await _existing(store, name)
        return await store.revoke_tokens(name, device)


async def list_users(open_store: Opener, out: TextIO) -> int:
    """One line per user, written as the users are read (many thousands in cluster mode)."""
    count = 0
    async with opened(open_store) as store:
        async for user in store.iter_users():
            out.write(f"{user.name}\t{user.devices} device(s)\n")
            count += 1
    return count


async def list_devices(open_store: Opener, name: str, out: TextIO) -> int:
    """``device list USER``: one line per device (id, created, last login, token or not)."""
    async with opened(open_store) as store:
        await _existing(store, name)
        devices = await store.devices(name)
    for info in devices:
        out.write(f"{info.device}\tcreated {_stamp(info.created_ms)}\tlast login {_stamp(info.last_login_ms)}"
                  f"\t{'token' if info.token_digest else 'no token'}\n")
    return len(devices)


async def remove_devices(open_store: Opener, name: str, device: str | None) -> list[str]:
    """``device remove USER [DEVICE]``: forget one device (or all), with its token.

    With the data folder only the row is deleted, so it is safe while the broker runs (WAL, its
    own connection): the slot and the token are freed at once. The running broker keeps the
    device's keys, staged items and place among the recipients until its next start, which drops
    them (``devices.remove`` from another of the user's devices does it all at once). In cluster
    mode everything goes at once (``ClusterAccounts.delete_device``)."""
    async with opened(open_store) as store:
        await _existing(store, name)
        wanted = [device] if device is not None else [d.device for d in await store.devices(name)]
        removed = [d for d in wanted if await store.delete_device(name, d)]
    if device is not None and not removed:
        raise AdminError(f"{name} has no device {device!r}")
    return removed


def _stamp(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


@dataclass(frozen=True, slots=True)
class ImportReport:
    added: int
    existing: list[str]
    bad_lines: list[str]


def parse_import_lines(lines: Iterator[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``name:password`` lines -> (pairs, problems); blank and ``#`` lines are skipped."""
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep:
            problems.append(f"line {number}: expected name:password")
        elif not is_user_id(name):
            problems.append(f"line {number}: invalid user name {name!r}")
        elif problem := password_problem(password):
            problems.append(f"line {number}: {problem} for {name!r}")
        elif name in seen:
            problems.append(f"line {number}: {name!r} appears twice; the first one is used")
        else:
            seen.add(name)
            pairs.append((name, password))
    return pairs, problems


async def import_users(open_store: Opener, source: TextIO, show_progress: bool, workers: int = 2) -> ImportReport:
    pairs, problems = parse_import_lines(iter(source))
    added = 0
    existing: list[str] = []
    loop = asyncio.get_running_loop()
    # The bar goes to stderr, the terminal the caller checked (``show_progress``):
    # rich's default console is stdout, which put the bar into redirected output
    # and showed nothing on the terminal (tests/test_cli.py).
    progress = Progress(
        TextColumn("importing users"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not show_progress, transient=False,
    )
    async with opened(open_store, create=True) as store:
        with progress, ThreadPoolExecutor(max_workers=workers) as pool:
            task = progress.add_task("import", total=len(pairs))
            for start in range(0, len(pairs), IMPORT_BATCH):
                batch = pairs[start:start + IMPORT_BATCH]
                todo = [n for n, _ in batch if not await store.user_exists(n)]
                wanted = set(todo)
                existing.extend(n for n, _ in batch if n not in wanted)
                futures = [
                    loop.run_in_executor(pool, credentials.hash_password, pw) for n, pw in batch if n in wanted
                ]
                hashed: list[str] = []
                for future in futures:
                    hashed.append(await future)
                    progress.advance(task)
                progress.advance(task, len(batch) - len(futures))
                count, raced = await store.add_users(zip(todo, hashed, strict=True))
                added += count
                existing.extend(raced)
    return ImportReport(added, existing, problems)
