"""``chat-broker user ...``: the operator's user management, against the users database."""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker import credentials
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


async def add(data_dir: Path, name: str, password: str) -> None:
    pw_hash = await asyncio.to_thread(credentials.hash_password, password)
    store = await SqliteUserStore.open(data_dir)
    try:
        await store.add_user(check_name(name), pw_hash)
    finally:
        await store.close()


def require_users_db(data_dir: Path) -> None:
    """For a command that has nothing to do without users: a mistyped --data-dir is said,
    instead of creating an empty folder there."""
    if not (data_dir / USERS_DB).is_file():
        raise AdminError(f"no users database in {data_dir.resolve()}: check --data-dir or the config's "
                         "data_dir ('chat-broker user add' creates it)")


async def open_existing(data_dir: Path) -> SqliteUserStore:
    require_users_db(data_dir)
    return await SqliteUserStore.open(data_dir)


async def passwd(data_dir: Path, name: str, password: str) -> None:
    store = await open_existing(data_dir)
    try:
        await store.set_password(name, await asyncio.to_thread(credentials.hash_password, password))
    finally:
        await store.close()


async def delete(data_dir: Path, name: str) -> None:
    store = await open_existing(data_dir)
    try:
        await store.delete_user(name)
    finally:
        await store.close()


async def revoke(data_dir: Path, name: str, device: str | None) -> int:
    store = await open_existing(data_dir)
    try:
        if not await store.user_exists(name):
            raise AdminError(f"no user {name!r}")
        return await store.revoke_tokens(name, device)
    finally:
        await store.close()


async def list_users(data_dir: Path, out: TextIO) -> int:
    store = await open_existing(data_dir)
    try:
        users = await store.list_users()
    finally:
        await store.close()
    for user in users:
        out.write(f"{user.name}\t{user.devices} device(s)\n")
    return len(users)


async def list_devices(data_dir: Path, name: str, out: TextIO) -> int:
    """``device list USER``: one line per device (id, created, last login, token or not)."""
    store = await open_existing(data_dir)
    try:
        if not await store.user_exists(name):
            raise AdminError(f"no user {name!r}")
        devices = await store.devices(name)
    finally:
        await store.close()
    for info in devices:
        out.write(f"{info.device}\tcreated {_stamp(info.created_ms)}\tlast login {_stamp(info.last_login_ms)}"
                  f"\t{'token' if info.token_digest else 'no token'}\n")
    return len(devices)


async def remove_devices(data_dir: Path, name: str, device: str | None) -> list[str]:
    """``device remove USER [DEVICE]``: forget one device (or all), with its token, in users.db.

    Only the row is deleted, so it is safe while the broker runs (WAL, its own connection):
    the slot and the token are freed at once. The running broker keeps the device's keys,
    staged items and place among the recipients until its next start, which drops them
    (``devices.remove`` from another of the user's devices does it all at once)."""
    store = await open_existing(data_dir)
    try:
        if not await store.user_exists(name):
            raise AdminError(f"no user {name!r}")
        wanted = [device] if device is not None else [d.device for d in await store.devices(name)]
        removed = [d for d in wanted if await store.delete_device(name, d)]
    finally:
        await store.close()
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


async def import_users(data_dir: Path, source: TextIO, show_progress: bool, workers: int = 2) -> ImportReport:
    pairs, problems = parse_import_lines(iter(source))
    store = await SqliteUserStore.open(data_dir)
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
    try:
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
    finally:
        await store.close()
    return ImportReport(added, existing, problems)
