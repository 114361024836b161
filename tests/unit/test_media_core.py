"""bridge/media/core.py, the media rules; storage/sqlite/media.py, their records; the s3 wiring's refusal."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.media import core
from bridge.media.core import MediaError, MediaLimits, Upload, Usage
from broker.front import ListenerError, tls_context
from chatserver import media as media_wiring
from chatserver.config import ConfigError, build_settings
from storage.sqlite.media import MEDIA_DB, MIGRATIONS, SqliteMediaStore

LIMITS = MediaLimits(max_bytes=100, chunk_max=10, quota_bytes=150, max_uploads=2, upload_ttl_ms=1000, ttl_ms=5000,
                     min_charge=20, uploads_per_minute=6, uploads_burst=3)
UP = Upload("u1", "alice", "phone", "bob", 25, 0, 0)


def code(exc: pytest.ExceptionInfo[MediaError]) -> str:
    return exc.value.code


@pytest.mark.parametrize(("body", "expected"), [
    ({"size": 5, "to": "bob"}, "ok"), ({"size": 5, "to": "g:abc"}, "ok"), ({"size": 101, "to": "bob"}, "too_large"),
    ({"size": 0, "to": "bob"}, "bad_request"), ({"size": True, "to": "bob"}, "bad_request"),
    ({"size": 5, "to": "a.b"}, "bad_request"), ({"size": 5}, "bad_request"), ([], "bad_request"),
    ({"size": 5, "to": "bob", "x": 1}, "bad_request"), ({"size": "5", "to": "bob"}, "bad_request"),
])
def test_new_upload_bodies(body: object, expected: str) -> None:
    if expected == "ok":
        assert core.parse_new_upload(body, LIMITS) == (5, body["to"])  # type: ignore[index]
        return
    with pytest.raises(MediaError) as info:
        core.parse_new_upload(body, LIMITS)
    assert code(info) == expected


def test_quota_and_uploads_in_progress() -> None:
    usage = Usage(LIMITS)
    assert usage.admit("alice", 100, 0.0) == 100
    with pytest.raises(MediaError) as info:
        usage.admit("alice", 51, 0.0)
    assert code(info) == "quota_exceeded" and info.value.status == 413
    assert usage.admit("alice", 50, 0.0) == 50
    with pytest.raises(MediaError) as info:
        usage.admit("alice", 1, 0.0)
    assert code(info) == "rate_limited" and info.value.retry_after_s == 60
    usage.end_upload("alice", 100, keep_charge=True)  # sealed: the blob keeps its charge
    usage.end_upload("alice", 50, keep_charge=False)  # abandoned
    assert usage.charged == {"alice": 100} and usage.uploads == {"alice": 0}
    usage.free("alice", 100)
    assert usage.charged == {}
    usage.admit("bob", 150, 0.0)  # each user has their own quota


def test_every_upload_is_charged_at_least_the_minimum() -> None:
    usage = Usage(replace(LIMITS, max_uploads=100, uploads_burst=100))
    assert [usage.admit("alice", 1, 0.0) for _ in range(7)] == [20] * 7  # 1-byte files cost 20 each
    with pytest.raises(MediaError) as info:
        usage.admit("alice", 1, 0.0)  # 140 + 20 > 150: a quota of Q holds at most Q / min_charge files
    assert code(info) == "quota_exceeded" and "at least 20 per file" in info.value.detail
    assert usage.charged == {"alice": 140} and usage.uploads == {"alice": 7}
    assert core.charge(25, LIMITS) == 25 and core.charge(0, replace(LIMITS, min_charge=0)) == 0
    sealed = core.seal(replace(UP, size=3), "s" * 64, {}, [], 0, LIMITS)
    assert sealed.blob.charge == 20  # the blob keeps the upload's charge


def test_upload_creation_rate_per_user() -> None:
    usage = Usage(replace(LIMITS, max_uploads=100, quota_bytes=10**6))
    for _ in range(3):  # the burst
        usage.admit("alice", 1, 100.0)
    with pytest.raises(MediaError) as info:
        usage.admit("alice", 1, 100.0)
    assert code(info) == "rate_limited" and info.value.status == 429 and info.value.retry_after_s == 10
    assert "6 a minute" in info.value.detail
    assert usage.charged == {"alice": 60} and usage.uploads == {"alice": 3}  # a refusal charges nothing
    usage.admit("bob", 1, 100.0)  # another user is not limited by alice
    usage.admit("alice", 1, 110.0)  # 6 a minute: one more after 10 s
    with pytest.raises(MediaError):
        usage.admit("alice", 1, 115.0)


def test_an_idempotency_key_names_one_upload_per_device() -> None:
    key = "k" * 22
    first = core.keyed_upload_id("alice", "phone", key)
    assert first == core.keyed_upload_id("alice", "phone", key) and len(first) == 23
    assert first[0] == core.user_shard("alice") == core.new_upload_id("alice")[0]  # the uploader's shard first
    assert len({first, core.keyed_upload_id("alice", "laptop", key), core.keyed_upload_id("bob", "phone", key),
                core.keyed_upload_id("alice", "phone", "j" * 22)}) == 4
    for bad in ("k" * 15, "k" * 65, "k" * 20 + "/.", "k" * 20 + "é"):
        with pytest.raises(MediaError) as info:
            core.keyed_upload_id("alice", "phone", bad)
        assert code(info) == "bad_request"
    core.check_replay(UP, 25, "bob")
    for size, to in ((26, "bob"), (25, "carol")):
        with pytest.raises(MediaError) as info:
            core.check_replay(UP, size, to)
        assert code(info) == "bad_request"


def test_patch_rules() -> None:
    core.check_patch(UP, 10, 10, 10, LIMITS)
    core.check_patch(UP, 20, 20, 5, LIMITS)
    for offset, stored, length, expected in ((0, 10, 5, "offset_mismatch"), (10, 10, 11, "too_large"),
                                              (20, 20, 6, "too_large"), (0, 0, None, "bad_request")):
        with pytest.raises(MediaError) as info:
            core.check_patch(UP, offset, stored, length, LIMITS)
        assert code(info) == expected
        if expected == "offset_mismatch":
            assert info.value.offset == stored


def test_seal_fixes_readers_and_waiting_devices() -> None:
    sealed = core.seal(UP, "s" * 64, {"bob": ["phone", "laptop"]}, ["phone", "tablet"], 100, LIMITS)
    assert sealed.readers == {"alice", "bob"}
    assert sealed.waiting == {"bob.phone", "bob.laptop", "alice.tablet"}  # not the uploading device
    assert (sealed.blob.owner, sealed.blob.size, sealed.blob.expires_ms) == ("alice", 25, 5100)
    to_self = core.seal(UP, "s" * 64, {}, ["phone"], 0, LIMITS)
    assert to_self.readers == {"alice"} and to_self.waiting == frozenset()


def test_who_may_read() -> None:
    blob = core.Blob("s" * 64, "alice", 5, 0, 10, 20)
    assert core.readable(blob, True) is blob
    for found, reader, expected in ((blob, False, "not_found"), (None, True, "not_found"),
                                    (core.Blob("s" * 64, "alice", 5, 0, 10, 20, deleted=True), True, "gone"),
                                    (core.Blob("s" * 64, "alice", 5, 0, 10, 20, deleted=True), False, "not_found")):
        with pytest.raises(MediaError) as info:
            core.readable(found, reader)
        assert code(info) == expected


def test_abandoned_uploads() -> None:
    old, fresh, busy = (Upload(i, "a", "p", "b", 1, 0, t) for i, t in (("old", 0), ("fresh", 900), ("busy", 0)))
    assert core.abandoned([old, fresh, busy], {"busy"}, 1000, LIMITS) == [old]


def test_the_bytes_of_a_cut_off_seal_go_unless_a_live_blob_is_made_of_them() -> None:
    live = core.Blob("a" * 64, "bob", 5, 0, 10, 20)
    assert core.orphaned(None)  # no record: nobody sealed these bytes
    assert core.orphaned(replace(live, deleted=True))  # deleted: its bytes are to go anyway
    assert not core.orphaned(live)  # another upload of the same bytes made this blob


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-", (0, 10)), ("bytes=2-4", (2, 5)), ("bytes=-3", (7, 10)), ("bytes=5-100", (5, 10)),
    ("bytes=-20", (0, 10)), (" bytes=9-9 ", (9, 10)),
])
def test_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert core.parse_range(header, 10) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-2", "bytes=-", "bytes=0-1,3-4", "items=0-1", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(MediaError) as info:
        core.parse_range(header, 10)
    assert info.value.status == 416


async def test_sqlite_records(tmp_path: Path) -> None:
    store = await SqliteMediaStore.open(tmp_path)
    try:
        await store.add_upload(UP)
        await store.add_upload(Upload("u2", "carol", "phone", "bob", 25, 0, 0))
        await store.touch_upload("u1", 7)
        assert (await store.load())[0][0].touched_ms == 7
        sealed = core.seal(UP, "a" * 64, {"bob": ["phone", "laptop"]}, ["phone"], 100, LIMITS)
        assert await store.seal("u1", sealed)
        again = core.seal(Upload("u2", "carol", "phone", "bob", 25, 0, 0), "a" * 64, {"bob": ["tv"]}, [], 100, LIMITS)
        assert not await store.seal("u2", again)  # the same bytes: one blob, more readers and waiting devices
        assert await store.is_reader("a" * 64, "carol") and not await store.is_reader("a" * 64, "eve")
        found = await store.sealed("u1")
        assert found is not None and found[1] == "a" * 64
        assert await store.load() == ([], {"alice": 25}, 1, 25)
        assert await store.waiting_devices() == {"bob.phone", "bob.laptop", "bob.tv"}
        assert await store.fetched("a" * 64, "bob.phone") is None
        assert await store.fetched("a" * 64, "bob.phone") is None  # again: nothing
        assert await store.remove_devices(["bob.tv"]) == []
        done = await store.fetched("a" * 64, "bob.laptop")
        assert done is not None and done.owner == "alice"
        blob = await store.blob("a" * 64)
        assert blob is not None and blob.deleted
        assert await store.forget(blob.expires_ms) == []
        assert await store.forget(blob.expires_ms + 1) == ["a" * 64]
        assert await store.blob("a" * 64) is None
        tiny = core.seal(replace(UP, size=3), "c" * 64, {"bob": ["phone"]}, [], 0, LIMITS)
        assert await store.seal("u1", tiny)  # charged the minimum, 20: a restart sums that, not 3
        assert (await store.load())[1:] == ({"alice": 20}, 1, 3)
        assert await store.blob("c" * 64) == tiny.blob
        other = core.seal(UP, "b" * 64, {"bob": ["phone"]}, [], 0, LIMITS)
        await store.seal("u1", other)
        assert sorted(b.sha256 for b in await store.expire(other.blob.expires_ms)) == ["b" * 64, "c" * 64]
        assert await store.sealed_uploads(10**6) == ["u1", "u2"]
        await store.drop_upload("u1")
        assert await store.sealed("u1") is None
    finally:
        await store.close()


async def test_an_s3_backend_without_its_module_stops_the_start(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media_wiring, "S3_MODULE", "storage.media.no_such_module")
    settings = build_settings({"media": {"backend": "s3", "s3": {"bucket": "b"}}}).media
    with pytest.raises(ConfigError, match=r"media.backend is s3 but storage.media.no_such_module cannot be imported"):
        await media_wiring.open_blobs(settings, tmp_path)


def test_a_bad_media_certificate_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ListenerError, match=r"^media\.certfile: cannot read .*nope\.pem"):
        tls_context("media", str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"), section="media")


async def test_a_media_db_of_before_the_minimum_charge_keeps_charging_sizes(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / MEDIA_DB) as db:
        db.executescript(MIGRATIONS[0] + ";PRAGMA user_version=1")
        db.execute("INSERT INTO blobs VALUES (?, 'alice', 3, 0, 10, 0)", ("a" * 64,))
    store = await SqliteMediaStore.open(tmp_path)
    try:
        assert await store.load() == ([], {"alice": 3}, 1, 3)  # what was charged then
    finally:
        await store.close()
