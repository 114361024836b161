"""Through the real broker over HTTP: a flood of tiny uploads is refused clearly (the minimum charge
per file, the per-user creation rate) without touching other users, concurrent creations cannot
pass a limit together, and ``DELETE`` of an upload in progress frees it at once; fuzzed DELETEs,
offsets and sizes, concurrent with PATCHes of the same upload, never crash the broker."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

from tests.helpers import BrokerThread
from tests.media_client import Device, MediaClient, MiB, add_device, charged, connected, media_broker
from tests.test_media_lifecycle import send_raw

KiB = 1024
MIN = 64 * KiB  # media.min_charge_bytes by default


def in_progress(broker: BrokerThread) -> int:
    assert broker.app.media is not None
    return broker.app.media.service.uploads_in_progress


async def tiny(client: MediaClient, dev: Device, to: str = "bob") -> tuple[int, dict[str, Any], str]:
    """Create an 8-byte upload of new bytes (a new blob) and seal it: ``(status of the POST, its
    body, Retry-After)``."""
    async with client.http.post(client.base + "/uploads", json={"size": 8, "to": to}, headers=dev.auth) as r:
        status, body, retry = r.status, await r.json(), r.headers.get("Retry-After", "")
    if status == 201:
        headers = {**dev.auth, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        async with client.http.patch(f"{client.base}/uploads/{body['upload']}", data=os.urandom(8),
                                     headers=headers) as r:
            assert r.status == 200
    return status, body, retry


async def test_a_flood_of_tiny_files_is_refused_clearly_and_others_go_on(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.uploads_burst": 10, "media.uploads_per_minute": 6,
                                                "media.quota_bytes": 40 * MIN})
    try:
        async with connected(broker) as client:
            alice, carol = add_device(broker, "alice", "phone"), add_device(broker, "carol", "phone")
            add_device(broker, "bob", "phone")
            results = [await tiny(client, alice) for _ in range(30)]  # back to back, as fast as it goes
            assert [status for status, _, _ in results[:10]] == [201] * 10
            status, body, retry = results[10]
            assert (status, body["error"], retry) == (429, "rate_limited", "10")
            assert "6 a minute" in body["detail"]
            assert {status for status, _, _ in results[10:]} == {429}
            assert charged(broker) == 10 * MIN  # ten 8-byte blobs, charged the minimum each
            # carol is not limited by alice's flood.
            assert [(await tiny(client, carol))[0] for _ in range(10)] == [201] * 10
            assert charged(broker) == 20 * MIN
    finally:
        broker.stop()


async def test_the_minimum_charge_bounds_the_count_of_tiny_files(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.uploads_burst": 1000, "media.quota_bytes": 16 * MIN})
    try:
        async with connected(broker) as client:
            alice, bob = add_device(broker, "alice", "phone"), add_device(broker, "bob", "phone")
            sealed = [await tiny(client, alice) for _ in range(16)]
            assert {status for status, _, _ in sealed} == {201}
            status, body, _ = await tiny(client, alice)
            assert (status, body["error"]) == (413, "quota_exceeded")
            assert f"at least {MIN} per file" in body["detail"]
            url = (await client.offset(alice, sealed[0][1]["upload"]))["url"]
            assert await client.fetched(bob, url) == 204  # bob has it: its charge is freed
            assert (await tiny(client, alice))[0] == 201
    finally:
        broker.stop()


async def test_concurrent_creations_cannot_pass_a_limit(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.uploads_burst": 12, "media.max_uploads": 100,
                                                "media.quota_bytes": 1000 * MIN})
    try:
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            made = await asyncio.gather(*(client.create(alice, "bob", 1) for _ in range(60)))
            assert sorted(status for status, _ in made) == [201] * 12 + [429] * 48
            assert charged(broker) == 12 * MIN and in_progress(broker) == 12
        # The quota, by another user: 5 fit, whatever the order the 40 POSTs arrive in.
        async with connected(broker) as client:
            carol = add_device(broker, "carol", "phone")
            made = await asyncio.gather(*(client.create(carol, "bob", 200 * MIN) for _ in range(12)))
            assert sorted(status for status, _ in made) == [201] * 5 + [413] * 7
            assert charged(broker) == 12 * MIN + 5 * 200 * MIN
    finally:
        broker.stop()


async def test_delete_of_an_upload_in_progress(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.max_uploads": 1})
    try:
        async with connected(broker) as client:
            http = client.http
            alice, laptop = add_device(broker, "alice", "phone"), add_device(broker, "alice", "laptop")
            bob = add_device(broker, "bob", "phone")
            status, body = await client.create(alice, "bob", 3 * MiB)
            upload = body["upload"]
            assert (await client.patch(alice, upload, 0, MiB))[0] == 204
            staging = broker.settings.data_path / "media" / "staging" / upload
            assert staging.exists() and charged(broker) == 3 * MiB
            assert (await client.create(alice, "bob", MiB))[0] == 429  # max_uploads: 1
            for stranger in (bob, laptop):  # another user, another device of alice: not theirs
                async with http.delete(f"{client.base}/uploads/{upload}", headers=stranger.auth) as r:
                    assert (r.status, (await r.json())["error"]) == (404, "not_found")
            assert staging.exists()
            async with http.delete(f"{client.base}/uploads/{upload}", headers=alice.auth) as r:
                assert r.status == 204
            assert not staging.exists() and charged(broker) == 0 and in_progress(broker) == 0
            async with http.get(f"{client.base}/uploads/{upload}", headers=alice.auth) as r:
                assert r.status == 404
            assert (await client.patch(alice, upload, MiB, 2 * MiB))[0] == 404
            async with http.delete(f"{client.base}/uploads/{upload}", headers=alice.auth) as r:
                assert r.status == 404  # deleted already
            # The slot and the quota are free at once; a sealed upload is not deleted.
            status, body = await client.create(alice, "bob", MiB)
            assert status == 201
            status, sealed = await client.patch(alice, body["upload"], 0, MiB)
            assert status == 200 and sealed is not None
            async with http.delete(f"{client.base}/uploads/{body['upload']}", headers=alice.auth) as r:
                answer = await r.json()
                assert (r.status, answer["error"], answer["url"]) == (409, "sealed", sealed["url"])
            assert (await client.download(bob, sealed["url"]))[0] == 200
    finally:
        broker.stop()


async def test_concurrent_delete_and_patch_of_one_upload(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.uploads_burst": 1000, "media.max_uploads": 100})
    try:
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            rng, seen = random.Random(7), set()
            for round_ in range(12):
                size = 2 * MiB if round_ % 2 else MiB  # odd rounds: the PATCH does not seal
                _, body = await client.create(alice, "bob", size)
                upload = body["upload"]

                async def delete(upload: str = upload) -> int:
                    await asyncio.sleep(rng.random() / 200)
                    async with client.http.delete(f"{client.base}/uploads/{upload}", headers=alice.auth) as r:
                        return r.status

                (patched, _), deleted = await asyncio.gather(client.patch(alice, upload, 0, MiB), delete())
                seen.add((patched, deleted))
                # Either order is fine, each answer agrees with the other and nothing stays charged.
                assert (patched, deleted) in {(204, 204), (404, 204), (200, 409)}, (patched, deleted)
                if deleted == 204:
                    assert not (broker.settings.data_path / "media" / "staging" / upload).exists()
            assert in_progress(broker) == 0
            assert charged(broker) == (MiB if any(p == 200 for p, _ in seen) else 0)  # the same bytes: one blob
    finally:
        broker.stop()


def fuzzed(rng: random.Random, dev: Device, uploads: list[str]) -> list[bytes]:
    auth = dev.auth["Authorization"]
    ids = [*uploads, "x" * 65, "x" * 5000, "%00", "..%2f..%2fetc", "", "a" * 64]
    bodies = ['{"size": 99999999999999999999999999999, "to": "bob"}', '{"size": 1e400, "to": "bob"}',
              '{"size": -1, "to": "bob"}', '{"size": 1, "to": "' + "b" * 3000 + '"}', '{"size": 1, "to": null}',
              '{"size": 1, "to": "bob", "size": 2}', "[]", "{", '{"size": NaN, "to": "bob"}']
    made = []
    for _ in range(150):
        method = rng.choice(["DELETE", "PATCH", "POST", "GET"])
        path = "/v1/media/uploads" if method == "POST" else f"/v1/media/uploads/{rng.choice(ids)}"
        body = rng.choice(bodies).encode() if method == "POST" else rng.randbytes(rng.randint(0, 64))
        offset = rng.choice(["0", "1", "-0", "+1", "1" * 19, "9" * 19, "9" * 40, "0x10", " 1", "1.0", "", "\u0661"])
        head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nUpload-Offset: {offset}\r\n"
                f"Content-Type: {rng.choice(['application/offset+octet-stream', 'application/json'])}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        made.append(head.encode() + body)
    return made


async def test_fuzzed_deletes_offsets_and_sizes_never_crash(tmp_path: Path) -> None:
    broker = media_broker(tmp_path / "data", **{"media.uploads_burst": 1000, "media.max_uploads": 1000})
    try:
        async with connected(broker) as client:
            alice = add_device(broker, "alice", "phone")
            add_device(broker, "bob", "phone")
            uploads = [(await client.create(alice, "bob", 64))[1]["upload"] for _ in range(5)]
            requests = fuzzed(random.Random(1919), alice, uploads)
            for start in range(0, len(requests), 50):
                await asyncio.gather(*(send_raw(broker.address("media"), raw) for raw in requests[start:start + 50]))
            for huge in ("9" * 19, "9" * 18):
                status, body = await client.patch(alice, uploads[0], int(huge), int(huge) + 1)
                assert status in (400, 404, 409, 413) and body is not None and body["error"]
            # Still serving, and the books agree with what is in progress.
            sealed = await client.upload(alice, "bob", MiB)
            assert len(sealed["sha256"]) == 64
            assert broker.app.media is not None
            expected = sum(max(u.size, MIN) for u in broker.app.media.service._uploads.values()) + MiB
            assert charged(broker) == expected
        assert broker.call(broker.app.readiness()) == []
    finally:
        broker.stop()


async def test_a_post_repeated_with_its_idempotency_key_names_the_same_upload(tmp_path: Path) -> None:
    """The answer to a POST is lost (sent on a raw socket, never parsed); the client asks again with
    the same key: the same upload, charged once, and no orphan left."""
    broker = media_broker(tmp_path / "data")
    try:
        async with connected(broker) as client:
            http = client.http
            alice, laptop = add_device(broker, "alice", "phone"), add_device(broker, "alice", "laptop")
            add_device(broker, "bob", "phone")
            key = {"Idempotency-Key": "k" * 32}
            body = b'{"size": 1048576, "to": "bob"}'
            await send_raw(broker.address("media"), (
                f"POST /v1/media/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: {alice.auth['Authorization']}\r\n"
                f"Idempotency-Key: {'k' * 32}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            assert in_progress(broker) == 1
            answers = await asyncio.gather(*(http.post(client.base + "/uploads", json={"size": MiB, "to": "bob"},
                                                       headers={**alice.auth, **key}) for _ in range(5)))
            ids = set()
            for r in answers:
                assert r.status == 201
                ids.add((await r.json())["upload"])
                r.release()
            assert len(ids) == 1 and in_progress(broker) == 1 and charged(broker) == MiB
            upload = ids.pop()
            assert (await client.patch(alice, upload, 0, MiB // 2))[0] == 204
            async with http.post(client.base + "/uploads", json={"size": MiB, "to": "bob"},
                                 headers={**alice.auth, **key}) as r:
                assert (r.status, (await r.json())["offset"]) == (201, MiB // 2)  # where to go on
            for wrong in ({"size": 2 * MiB, "to": "bob"}, {"size": MiB, "to": "alice"}):
                async with http.post(client.base + "/uploads", json=wrong, headers={**alice.auth, **key}) as r:
                    answer = await r.json()
                    assert (r.status, answer["error"]) == (400, "bad_request") and "new key" in answer["detail"]
            for bad in ("short", "k" * 65, "k" * 31 + "/"):
                async with http.post(client.base + "/uploads", json={"size": 1, "to": "bob"},
                                     headers={**alice.auth, "Idempotency-Key": bad}) as r:
                    assert (r.status, (await r.json())["error"]) == (400, "bad_request")
            # The same key from another device is another upload.
            async with http.post(client.base + "/uploads", json={"size": MiB, "to": "bob"},
                                 headers={**laptop.auth, **key}) as r:
                assert r.status == 201 and (await r.json())["upload"] != upload
            sealed = await client.upload(alice, "bob", MiB, start_offset=MiB // 2, upload=upload)
            async with http.post(client.base + "/uploads", json={"size": MiB, "to": "bob"},
                                 headers={**alice.auth, **key}) as r:
                answer = await r.json()
                assert (r.status, answer["error"], answer["url"]) == (409, "sealed", sealed["url"])
    finally:
        broker.stop()
