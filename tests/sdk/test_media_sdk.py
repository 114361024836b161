"""Media through the real broker and media endpoint with SDK clients, on the local and the S3
backend (moto's server on loopback): alice's SDK sends a 50 MB file to bob and to a group, the
upload and the download are cut halfway (a TCP proxy resets the connection) and resumed from the
server's offset, the received files are byte-identical; the stored blob holds no plaintext; the
blob is gone after the last fetch; tampered bodies and plain mode are refused."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import AsyncClient, Client, MediaBody, MediaBodyError, MediaCryptoError, MediaError
from client_sdk.aio import _in_thread
from client_sdk.events import Message
from client_sdk.media import UPLOADS
from client_sdk.mediabody import MAX_THUMBNAIL_BYTES, parse_media_body
from client_sdk.mediacrypto import MediaKey, ciphertext_size
from client_sdk.mediahttp import MediaHTTP
from testkit.https_server import make_tls
from testkit.proxy import TcpProxy
from tests.helpers import WAIT_S, BrokerThread
from tests.media_client import MiB, charged, media_broker
from tests.media_stores import BACKENDS, backend_settings
from tests.sdk.conftest import Collector, LogWatch

SIZE = 50 * MiB
MARKER = b"PLAINTEXT-MARKER-7f3a9c"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return backend_settings(request, tmp_path / "s3")


@pytest.fixture
def media(tmp_path: Path, backend: dict[str, Any]) -> Iterator[tuple[BrokerThread, TcpProxy]]:
    """A broker with the media endpoint (8 MiB PATCHes) behind a proxy that tests can cut."""
    broker = media_broker(tmp_path / "data", **{"media.quota_bytes": 400 * MiB, **backend})
    for name in ("alice", "bob", "carol"):
        broker.add_user(name, f"{name}-pw")
    proxy = TcpProxy(broker.address("media")[1]).start()
    yield broker, proxy
    proxy.stop()
    broker.stop()


@pytest.fixture
def clients(media: tuple[BrokerThread, TcpProxy], tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    broker, proxy = media
    made: list[Client] = []

    def online(user: str, **options: Any) -> Collector:
        return media_client(made, user, "phone", broker.port, proxy.port, tmp_path / f"{user}.db", **options)

    yield online
    for client in made:
        client.close()


def media_client(made: list[Client], user: str, device: str, port: int, media_port: int, store: Path,
                 **options: Any) -> Collector:
    """``user``'s SDK client on ``device``, connected, its media over ``media_port``; added to ``made``."""
    client = Client(user, f"{user}-pw", device=device, port=port, store=store,
                    media_url=f"http://127.0.0.1:{media_port}", reconnect_delay=(0.1, 1.0), **options)
    made.append(client)
    collector = Collector(client)
    client.connect()
    return collector


def big_file(path: Path, size: int = SIZE) -> str:
    """A file of random bytes with ``MARKER`` every MiB; returns its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, size, MiB):
            block = (MARKER + os.urandom(MiB - len(MARKER)))[: size - start]
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class CutOnce:
    """A progress callback that resets the proxied connection once ``done`` passes ``at``.

    With ``watch`` (a LogWatch on the SDK's retry line), it cuts again every MiB until the SDK
    saw a cut: bytes already buffered on loopback may let a reset connection finish its request.
    """

    def __init__(self, proxy: TcpProxy, at: int, watch: LogWatch | None = None) -> None:
        self.proxy, self.at, self.watch = proxy, at, watch
        self.seen: list[int] = []
        self.cut_at: int | None = None

    def __call__(self, done: int, total: int) -> None:
        self.seen.append(done)
        again = self.watch is not None and self.watch.count == 0 and self.cut_at is not None \
            and done >= self.cut_at + MiB
        if (self.cut_at is None and done >= self.at) or again:
            self.cut_at = done
            self.proxy.cut("refuse")  # resets the live connection mid-body
            self.proxy.restore()      # the retry may connect again

    def resumed_from(self) -> int:
        """The lowest offset reported after the first cut: where the resumed transfer went on."""
        assert self.cut_at is not None, "the transfer was never cut"
        first = next(i for i, done in enumerate(self.seen) if done >= self.at)
        return min(self.seen[first + 1:])


MOTO_RETRIES = 20


def stored_blob(broker: BrokerThread, backend: dict[str, Any], sha: str) -> bytes | None:
    """The blob's bytes as the backend holds them (None: not stored)."""
    if not backend:
        found = list((broker.settings.data_path / "media" / "blobs").rglob(sha))
        return found[0].read_bytes() if found else None
    s3 = backend["media.s3"]
    url = f"{s3['endpoint_url']}/{s3['bucket']}/{s3['prefix']}blobs/{sha}"
    for attempt in range(MOTO_RETRIES):
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:  # moto on loopback checks no auth
                return bytes(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            # moto's server answers 500 to a GET that races the DELETE of the same object (CI: a
            # cluster node's ttl sweep deleting a 63 MiB blob while the test polled it): ask again.
            if exc.code != 500 or attempt == MOTO_RETRIES - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def media_message(collector: Collector) -> Message:
    message: Message = collector.next(Message, where=lambda m: m.type == "media")
    return message


def test_50_mb_to_bob_cut_and_resumed_both_ways(media: tuple[BrokerThread, TcpProxy], backend: dict[str, Any],
                                                clients: Callable[..., Collector], tmp_path: Path) -> None:
    broker, proxy = media
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "video.mp4"
    want = big_file(source)
    total = ciphertext_size(SIZE)
    with LogWatch("client_sdk.media", "network: PATCH") as upload_cut:
        up = CutOnce(proxy, total // 2, upload_cut)
        mid = alice.client.send_media("bob", source, thumbnail=b"\xff\xd8thumb", progress=up)
    assert upload_cut.count >= 1, "the upload was cut"
    assert up.resumed_from() >= total // 2 - 8 * MiB, "resumed from the server's offset, not from 0"
    assert up.seen[-1] == total
    message = media_message(bob)
    assert message.id == mid and message.encrypted
    sha = parse_media_body(message.body).sha256
    blob = stored_blob(broker, backend, sha)
    assert blob is not None and len(blob) == total and MARKER not in blob, "the server holds ciphertext only"
    del blob
    # Cut an eighth in: more than the loopback buffers can hold (tcp_rmem up to 32 MB, the
    # server's 4 MB) is then still to come, so the cut always costs the client bytes.
    dest = tmp_path / "bob" / "video.mp4"
    dest.parent.mkdir()
    with LogWatch("client_sdk.media", "network: GET /v1/media/blobs") as download_cut:
        down = CutOnce(proxy, total // 8, download_cut)
        body = bob.client.download_media(message, dest, progress=down)
    assert download_cut.count >= 1, "the download was cut"
    assert down.resumed_from() > 0, "the download resumed with a Range request, not from 0"
    assert (body.name, body.mime, body.size, body.thumbnail) == ("video.mp4", "video/mp4", SIZE, b"\xff\xd8thumb")
    assert file_sha(dest) == want
    assert sorted(p.name for p in dest.parent.iterdir()) == ["video.mp4"], "no .part or temporary file left"
    # bob's phone was the only recipient device: the blob is gone after its fetch.
    assert stored_blob(broker, backend, sha) is None
    with pytest.raises(MediaError) as gone:
        bob.client.download_media(message, tmp_path / "bob" / "again.mp4")
    assert gone.value.code == "gone" and gone.value.status == 410


def test_to_a_group_each_member_gets_identical_bytes(media: tuple[BrokerThread, TcpProxy],
                                                     clients: Callable[..., Collector], tmp_path: Path) -> None:
    alice, bob, carol = clients("alice"), clients("bob"), clients("carol")
    group = alice.client.create_group("team", ["bob", "carol"]).group
    source = tmp_path / "notes.pdf"
    want = big_file(source, 3 * MiB + 5)
    with open(source, "rb") as f:  # a file object works as well as a path
        alice.client.send_media(group, f, name="notes.pdf")
    for member in (bob, carol):
        message = media_message(member)
        assert message.group == group
        dest = tmp_path / f"{member.client.user}.pdf"
        assert member.client.download_media(message, dest).mime == "application/pdf"
        assert file_sha(dest) == want


def test_refusals(media: tuple[BrokerThread, TcpProxy], clients: Callable[..., Collector], tmp_path: Path) -> None:
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "a.txt"
    source.write_bytes(b"hello")
    plain = clients("carol", encryption=False)
    with pytest.raises(MediaError) as refused:
        plain.client.send_media("bob", source)
    assert refused.value.code == "encryption_required"
    with pytest.raises(ValueError, match="not a user id"):
        alice.client.send_media("no body", source)
    with pytest.raises(MediaBodyError, match="thumbnail"):
        alice.client.send_media("bob", source, thumbnail=b"x" * 100_000)
    # The largest thumbnail and a long name that JSON escapes still fit an encrypted message.
    alice.client.send_media("bob", source, name="é" * 255, thumbnail=b"\xff" * MAX_THUMBNAIL_BYTES)
    largest = parse_media_body(media_message(bob).body)
    assert (largest.thumbnail, largest.name) == (b"\xff" * MAX_THUMBNAIL_BYTES, "é" * 255)
    alice.client.send_media("bob", source)
    message = media_message(bob)
    # A hostile sender's body: a link that is not the digest's, a wrong key.
    with pytest.raises(MediaBodyError, match="url"):
        bob.client.download_media(message.body.replace("/v1/media/blobs/", "/v1/media/blobz/"), tmp_path / "x")
    sent = parse_media_body(message.body)
    other_key = MediaBody(sent.url, MediaKey.random(), sent.sha256, sent.size, sent.mime, sent.name)
    with pytest.raises(MediaCryptoError):
        bob.client.download_media(other_key, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*")), "no stray file"
    assert bob.client.download_media(message, tmp_path / "a.txt.copy").size == 5
    assert (tmp_path / "a.txt.copy").read_bytes() == b"hello"


class Abort(Exception):
    pass


def test_a_download_stopped_by_the_app_resumes_from_its_part_file(
        clients: Callable[..., Collector], tmp_path: Path) -> None:
    """The app dies (here: its progress callback raises) halfway through a download; the next
    download_media of the same message goes on from the .part file with a Range request."""
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "clip.bin"
    want = big_file(source, 6 * MiB)
    alice.client.send_media("bob", source)
    message = media_message(bob)
    dest = tmp_path / "got.bin"

    def die_halfway(done: int, total: int) -> None:
        if done >= total // 2:
            raise Abort

    with pytest.raises(Abort):
        bob.client.download_media(message, dest, progress=die_halfway)
    assert not dest.exists()
    seen: list[int] = []
    bob.client.download_media(message, dest, progress=lambda done, total: seen.append(done))
    assert seen[0] > 3 * MiB, "resumed, not downloaded again from 0"
    assert file_sha(dest) == want


@pytest.mark.parametrize("failure", ["abort", "shrink"])
def test_an_upload_that_fails_for_good_is_deleted(media: tuple[BrokerThread, TcpProxy], failure: str,
                                                  clients: Callable[..., Collector], tmp_path: Path) -> None:
    """The app aborts (its progress callback raises), or the file loses its end midway (a failure
    the SDK cannot resume from), past the first PATCH: nothing is sent, and the SDK deletes the
    upload it leaves, so the server frees it at once (not after upload_ttl_s)."""
    broker, _ = media
    alice = clients("alice")
    source = tmp_path / "clip.bin"
    big_file(source, 20 * MiB)

    def fail(done: int, total: int) -> None:
        if done > 9 * MiB and failure == "abort":
            raise Abort
        if done > 9 * MiB and source.stat().st_size > MiB:
            os.truncate(source, MiB)

    raised = pytest.raises(Abort) if failure == "abort" else pytest.raises(ValueError, match="shorter")
    with LogWatch("client_sdk.media", "not deleted") as kept, raised:
        alice.client.send_media("bob", source, progress=fail)
    assert kept.count == 0 and alice.client.outbox() == []
    assert (charged(broker), in_progress(broker)) == (0, 0)
    assert not list((broker.settings.data_path / "media" / "staging").iterdir())


def test_the_answer_to_the_post_lost(media: tuple[BrokerThread, TcpProxy], clients: Callable[..., Collector],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server creates the upload but its answer never arrives: the SDK's retried POST (same
    Idempotency-Key) names the same upload, so none is left behind holding quota."""
    broker, _ = media
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "clip.bin"
    want = big_file(source, MiB)
    real, lost = MediaHTTP.call, []

    def losing(self: MediaHTTP, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        reply = real(self, method, path, *args, **kwargs)
        if method == "POST" and path == UPLOADS and not lost:
            lost.append(reply.data["upload"])
            raise MediaError("network", "POST: the connection ended before the answer")  # as a cut would
        return reply

    monkeypatch.setattr(MediaHTTP, "call", losing)
    alice.client.send_media("bob", source)
    assert lost and (charged(broker), in_progress(broker)) == (ciphertext_size(MiB), 0)
    bob.client.download_media(media_message(bob), tmp_path / "got.bin")
    assert file_sha(tmp_path / "got.bin") == want


def in_progress(broker: BrokerThread) -> int:
    assert broker.app.media is not None
    return broker.app.media.service.uploads_in_progress


async def test_async_client_sends_and_downloads(media: tuple[BrokerThread, TcpProxy], tmp_path: Path) -> None:
    broker, proxy = media
    options: dict[str, Any] = {"device": "phone", "port": broker.port, "media_url": f"http://127.0.0.1:{proxy.port}"}
    source = tmp_path / "photo.jpg"
    want = big_file(source, MiB + 3)
    async with AsyncClient("alice", "alice-pw", store=tmp_path / "a.db", **options) as alice, \
            AsyncClient("bob", "bob-pw", store=tmp_path / "b.db", **options) as bob:
        mid = await alice.send_media("bob", source)
        async for event in bob.events():
            if isinstance(event, Message) and event.type == "media":
                assert event.id == mid
                body = await bob.download_media(event, tmp_path / "got.jpg")
                break
    assert body.mime == "image/jpeg" and file_sha(tmp_path / "got.jpg") == want


def test_the_answer_to_the_last_patch_lost(media: tuple[BrokerThread, TcpProxy],
                                          clients: Callable[..., Collector], tmp_path: Path) -> None:
    """The connection is reset once every byte was sent: the SDK learns from GET that the upload
    was sealed (or sends the rest), checks the digest, and sends the message once."""
    _, proxy = media
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "clip.bin"
    want = big_file(source, 3 * MiB + 1)
    cut = CutOnce(proxy, ciphertext_size(3 * MiB + 1))
    mid = alice.client.send_media("bob", source, progress=cut)
    assert cut.cut_at is not None
    message = media_message(bob)
    assert message.id == mid
    assert bob.client.download_media(message, tmp_path / "got.bin").size == 3 * MiB + 1
    assert file_sha(tmp_path / "got.bin") == want


def test_limits_and_quota_are_refused_clearly(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.max_bytes": 2 * MiB, "media.chunk_max_bytes": MiB,
                                                "media.quota_bytes": 3 * MiB})
    try:
        for name in ("alice", "bob"):
            broker.add_user(name, f"{name}-pw")
        host, port = broker.address("media")
        with Client("alice", "alice-pw", device="phone", port=broker.port, store=tmp_path / "a.db",
                    media_url=f"http://{host}:{port}") as alice:
            source = tmp_path / "f.bin"
            big_file(source, 3 * MiB)
            with pytest.raises(MediaError) as refused:
                alice.send_media("bob", source)
            assert (refused.value.code, refused.value.status) == ("too_large", 413)
            big_file(source, MiB + MiB // 2)
            alice.send_media("bob", source)  # in several PATCHes of at most chunk_max
            with pytest.raises(MediaError) as refused:
                alice.send_media("bob", source)
            assert (refused.value.code, refused.value.status) == ("quota_exceeded", 413)
            assert "quota" in refused.value.detail
    finally:
        broker.stop()


def test_over_https_with_a_private_ca(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    tls = make_tls(tmp_path / "tls")
    broker = media_broker(tmp_path / "data", **{"media.certfile": str(tls.cert_file),
                                                "media.keyfile": str(tls.key_file)})
    try:
        for name in ("alice", "bob"):
            broker.add_user(name, f"{name}-pw")
        url = f"https://127.0.0.1:{broker.address('media')[1]}"
        source = tmp_path / "f.bin"
        big_file(source, MiB)
        with Client("alice", "alice-pw", device="phone", port=broker.port, store=tmp_path / "a.db", media_url=url,
                    media_tls=ssl.create_default_context(cafile=str(tls.ca_file))) as alice:
            alice.send_media("bob", source)
        with Client("bob", "bob-pw", device="phone", port=broker.port, store=tmp_path / "b.db",
                    media_url=url) as bob:  # the system's CAs do not know this one: refused at once
            with pytest.raises(MediaError) as refused:
                bob.send_media("alice", source)
            assert refused.value.code == "tls_failed"
    finally:
        broker.stop()


async def test_cancelling_an_async_transfer_stops_its_thread() -> None:
    """AsyncClient runs a transfer in a thread and sets its ``stop`` when the task is cancelled;
    the transfer checks it between pieces (and while it waits to retry)."""
    started, saw_stop = threading.Event(), threading.Event()

    def transfer(stop: threading.Event) -> None:
        started.set()
        if stop.wait(WAIT_S):
            saw_stop.set()

    task = asyncio.create_task(_in_thread(transfer))
    assert await asyncio.to_thread(started.wait, WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(saw_stop.wait, WAIT_S)


def test_a_media_message_that_arrived_unencrypted_is_refused(clients: Callable[..., Collector],
                                                              tmp_path: Path) -> None:
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "a.txt"
    source.write_bytes(b"hello")
    alice.client.send_media("bob", source)
    message = media_message(bob)
    plain = dataclasses.replace(message, encrypted=False)
    with pytest.raises(MediaError) as refused:
        bob.client.download_media(plain, tmp_path / "x")
    assert refused.value.code == "encryption_required"


def test_an_upload_cut_three_times_still_arrives_whole(media: tuple[BrokerThread, TcpProxy],
                                                      clients: Callable[..., Collector], tmp_path: Path) -> None:
    _, proxy = media
    alice, bob = clients("alice"), clients("bob")
    source = tmp_path / "clip.bin"
    want = big_file(source, 20 * MiB + 123)
    total = ciphertext_size(20 * MiB + 123)
    cuts = [CutOnce(proxy, total * k // 4) for k in (1, 2, 3)]

    def progress(done: int, size: int) -> None:
        for cut in cuts:
            cut(done, size)

    with LogWatch("client_sdk.media", "network: PATCH") as cut_log:
        alice.client.send_media("bob", source, progress=progress)
    assert cut_log.count >= 3
    dest = tmp_path / "got.bin"
    bob.client.download_media(media_message(bob), dest)
    assert file_sha(dest) == want
