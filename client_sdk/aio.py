"""``AsyncClient``: the asyncio face of the SDK, over the same engine as ``Client``.

In the style of aiomqtt: paho's network thread and the dispatcher thread hand
work to the event loop with ``loop.call_soon_threadsafe``; each request waits
on a future kept in ``_pending`` under its ``rid`` and removed in a
``finally``; ``async with`` connects and closes; ``async for event in
client.events()`` reads ``Message``, ``GroupEvent``, ``Receipt``, ``Presence``,
``ErrorEvent`` (and the security warnings) in arrival order.

An event counts as handed over when the ``async for`` body has finished with
it (the loop asks for the next one, or leaves the loop): only then is a
message acked to the server. Events wait for you while you are not iterating
(nothing is acked meanwhile), so iterate ``events()`` in one task for the
client's whole life. It ends when the client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

from chatproto import OP_DEVICES_REMOVE, OP_PUSH_PENDING, OP_PUSH_REGISTER, OP_PUSH_UNREGISTER, ResItem
from client_sdk.engine import Engine, EngineFront, result_of
from client_sdk.errors import ConnectTimeout, RequestTimeout
from client_sdk.events import Event, Message, Presence
from client_sdk.groups import (
    GroupInfo,
    GroupReceiptInfo,
    GroupSummary,
    admins_steps,
    create_steps,
    info_steps,
    leave_steps,
    list_steps,
    members_steps,
    receipts_steps,
    rename_steps,
)
from client_sdk.media import Progress
from client_sdk.mediabody import MediaBody
from client_sdk.mediaclient import MediaFile, download_media, send_media
from client_sdk.options import ClientOptions, ClientSettings
from client_sdk.presence import (
    Privacy,
    Steps,
    check_privacy,
    contacts_steps,
    get_steps,
    privacy_from,
    unwatch_steps,
    watch_steps,
)
from client_sdk.preview import PushPreview
from client_sdk.push import FETCH_POLL_S, items_left, register_args

T = TypeVar("T")
_Entry = tuple[Event, threading.Event] | None


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args, stop)`` in a thread of its own (a transfer must not hold up the client's
    one worker); a cancel sets ``stop``, which the transfer checks between pieces."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(function, *args, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


class AsyncClient(EngineFront):
    """Same arguments as ``Client`` (``ClientOptions``); use ``async with AsyncClient(...) as c:``."""

    def __init__(
        self, user: str, password: str | None, options: ClientOptions | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        resolved = ClientOptions.of(options, settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[ResItem | BaseException]] = {}
        # One worker: blocking calls (store writes, joins) keep the order they were made in.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"chat-aio-{user}.{resolved.device}")
        self._engine = Engine(user, password, resolved, self._deliver)

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        self._engine.check_open()
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- lifecycle -----------------------------------------------------------------

    async def connect(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (same API as Client)
        """Connect and return once subscribed; raises like ``Client.connect``."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[BaseException | None] = loop.create_future()

        def outcome(error: BaseException | None) -> None:  # any thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, error)

        await self._blocking(self._engine.connect_async, outcome)
        try:
            error = await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            last = await asyncio.shield(self._blocking(self._engine.cancel_connect, outcome))
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ConnectTimeout(f"not connected within {timeout:.1f}s (last error: {last})") from last
        if error is not None:
            raise error

    async def close(self) -> None:
        """Disconnect and stop; idempotent. ``events()`` iterators end."""
        if self._engine.closing.is_set():
            return
        await self._blocking(self._engine.close)
        self._queue.put_nowait(None)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        try:
            await self.connect()
        except BaseException:
            await self.close()  # nobody can close a client ``async with`` never handed out
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- events --------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[Event, None]:
        """Events in arrival order until the client is closed; iterate it from one task."""
        while True:
            entry = await self._queue.get()
            if entry is None:
                self._queue.put_nowait(None)  # let any other iterator end too
                return
            event, handed = entry
            try:
                yield event
            finally:
                handed.set()

    def _deliver(self, event: Event) -> bool:
        """Dispatcher thread: queue the event on the loop, wait until the app is done with it."""
        loop = self._loop
        if loop is None:
            return False
        handed = threading.Event()
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, (event, handed))
        except RuntimeError:  # the loop is closed
            return False
        while not handed.wait(0.1):
            if self._engine.closing.is_set():
                return handed.is_set()
        return True

    # --- messaging -----------------------------------------------------------------

    async def send(self, to: str, body: str, type: str = "text", preview: str | None = None) -> str:
        """Store a message in the outbox and return its id (see ``Client.send``)."""
        return await self._blocking(self._engine.send, to, body, type, preview)

    async def mark_seen(self, peer: str, ids: list[str]) -> None:
        """Tell ``peer`` that these messages from them were displayed."""
        self._engine.mark_seen(peer, list(ids))

    async def heartbeat(self, away: bool = False) -> None:
        self._engine.heartbeat(away)

    # --- media (see Client) ------------------------------------------------------------

    async def send_media(self, to: str, file: MediaFile, mime: str | None = None, name: str | None = None,
                         thumbnail: bytes | None = None, progress: Progress | None = None) -> str:
        """Encrypt, upload and send ``file`` to ``to`` (see ``Client.send_media``), in a thread of its
        own; ``progress`` is called in that thread. Cancelling stops the transfer."""
        return await _in_thread(send_media, self._engine, to, file, mime, name, thumbnail, progress)

    async def download_media(self, message_or_body: Message | MediaBody | str, dest: str | os.PathLike[str],
                             progress: Progress | None = None) -> MediaBody:
        """Download, verify and decrypt a media message's file into ``dest`` (see ``Client.download_media``)."""
        return await _in_thread(download_media, self._engine, message_or_body, dest, progress)

    # --- presence (see Client for the details) -------------------------------------

    async def set_foreground(self, foreground: bool = True) -> None:
        """Foreground: heartbeats every ``heartbeat_interval`` while connected; background: ``away`` once."""
        self._engine.set_foreground(foreground)

    async def presence(self, users: Iterable[str], timeout: float = 10.0) -> dict[str, Presence]:  # noqa: ASYNC109
        return await self._run(get_steps(users), timeout)

    async def watch_presence(
        self, users: Iterable[str], timeout: float = 10.0,  # noqa: ASYNC109 (same API as Client)
    ) -> dict[str, Presence]:
        """Current presence of ``users``; later changes arrive as ``Presence`` events (also after reconnects)."""
        return await self._run(watch_steps(users, self._engine.watch, self._engine.unwatch), timeout)

    async def unwatch_presence(self, users: Iterable[str], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await self._run(unwatch_steps(users, self._engine.unwatch), timeout)

    async def set_privacy(self, last_seen: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        check_privacy(last_seen)
        await self.request("privacy.set", {"last_seen": last_seen}, timeout)

    async def privacy(self, timeout: float = 10.0) -> Privacy:  # noqa: ASYNC109
        return privacy_from(await self.request("privacy.get", None, timeout))

    async def add_contacts(self, users: Iterable[str], timeout: float = 10.0) -> int:  # noqa: ASYNC109
        return await self._run(contacts_steps("contacts.add", users), timeout)

    async def remove_contacts(self, users: Iterable[str], timeout: float = 10.0) -> int:  # noqa: ASYNC109
        return await self._run(contacts_steps("contacts.remove", users), timeout)

    # --- groups (see Client for the details) ---------------------------------------

    async def create_group(self, name: str, members: Iterable[str] = (),
                           timeout: float = 10.0) -> GroupInfo:  # noqa: ASYNC109 (same API as Client)
        return await self._run(create_steps(name, members, self._engine.membership), timeout)

    async def add_members(self, group: str, users: Iterable[str],
                          timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        return await self._run(members_steps(group, users, False, self._engine.membership), timeout)

    async def remove_members(self, group: str, users: Iterable[str],
                             timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        return await self._run(members_steps(group, users, True, self._engine.membership), timeout)

    async def leave_group(self, group: str, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        return await self._run(leave_steps(group, self._engine.membership), timeout)

    async def rename_group(self, group: str, name: str, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        return await self._run(rename_steps(group, name), timeout)

    async def set_admins(self, group: str, add: Iterable[str] = (), remove: Iterable[str] = (),
                         timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        return await self._run(admins_steps(group, add, remove), timeout)

    async def group_info(self, group: str, timeout: float = 10.0) -> GroupInfo:  # noqa: ASYNC109
        return await self._run(info_steps(group, self._engine.membership), timeout)

    async def list_groups(self, timeout: float = 10.0) -> list[GroupSummary]:  # noqa: ASYNC109
        return await self._run(list_steps(), timeout)

    async def group_receipts(self, group_id: str, message_id: str,
                             timeout: float = 10.0) -> GroupReceiptInfo:  # noqa: ASYNC109
        return await self._run(receipts_steps(group_id, message_id), timeout)

    # --- requests ------------------------------------------------------------------

    async def request(
        self, op: str, args: dict[str, Any] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (the issue's API: request(op, args, timeout), as in Client)
    ) -> Any:
        """Run a request and return its ``result``; raises like ``Client.request``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResItem | BaseException] = loop.create_future()

        def answer(value: ResItem | BaseException) -> None:  # paho's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_settle, future, value)

        rid = self._engine.request_async(op, args, answer)
        self._pending[rid] = future
        try:
            value = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimeout(f"{op}: no answer within {timeout:.1f}s") from None
        finally:
            del self._pending[rid]
            self._engine.forget(rid)
        return result_of(op, value)

    async def _run(self, steps: Steps[T], timeout: float) -> T:  # noqa: ASYNC109 (passed to each request)
        """Make the requests of ``steps`` one after another (see ``presence.Steps`` and ``Client._run``)."""
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                op, args = steps.send(result) if error is None else steps.throw(error)
            except StopIteration as done:
                return cast(T, done.value)
            try:
                result, error = await self.request(op, args, timeout), None
            except Exception as exc:
                result, error = None, exc

    async def ping(self, timeout: float = 10.0) -> float:  # noqa: ASYNC109 (same API as Client)
        """Round-trip time of a ``ping`` request, in seconds."""
        start = time.monotonic()
        await self.request("ping", None, timeout)
        return time.monotonic() - start

    # --- push (see Client) -------------------------------------------------------------

    async def register_push(self, platform: str, timeout: float = 10.0,  # noqa: ASYNC109 (same API as Client)
                            previews: bool = True, **registration: Any) -> None:
        """Have the server wake this device through ``platform`` (see ``Client.register_push``)."""
        preview_key = await self._blocking(self._preview_key, previews)
        await self.request(OP_PUSH_REGISTER, register_args(platform, registration, preview_key), timeout)

    async def decrypt_preview(self, payload: Mapping[str, Any] | bytes | str) -> PushPreview | None:
        """The push preview in a wake-up (see ``Client.decrypt_preview``)."""
        return await self._blocking(self._e2e().decrypt_preview, payload)

    async def unregister_push(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (same API as Client)
        """No more wake-ups for this device; False if it had no registration."""
        return bool((await self.request(OP_PUSH_UNREGISTER, None, timeout))["removed"])

    async def fetch_pending(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109 (same API as Client)
        """Connect, take everything waiting, close (see ``Client.fetch_pending``); iterate ``events()``
        in another task meanwhile: each is acked once the iteration goes on past it."""
        deadline = time.monotonic() + timeout
        try:
            await self.connect(timeout)
            while True:
                left = items_left(await self.request(OP_PUSH_PENDING, None, max(0.1, deadline - time.monotonic())))
                if not left or time.monotonic() >= deadline:
                    return left
                await asyncio.sleep(FETCH_POLL_S)
        finally:
            await self.close()

    # --- end-to-end encryption (see Client) ----------------------------------------

    async def fingerprint(self, user: str | None = None, device: str | None = None) -> str:
        """This device's fingerprint, or ``user``'s ``device`` as trusted here (see ``Client.fingerprint``)."""
        return await self._blocking(self._e2e().fingerprint, user, device)

    async def safety_number(self, user: str) -> str:
        """The safety number of this user and ``user`` (see ``Client.safety_number``)."""
        return await self._blocking(self._e2e().safety_number, user)

    async def remove_device(self, device: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Forget one of this user's devices on the server (see ``Client.remove_device``)."""
        await self.request(OP_DEVICES_REMOVE, {"device": device}, timeout)
