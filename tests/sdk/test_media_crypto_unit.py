"""Media encryption and the media message body without a network: the segment format round-trips
at every size (0, exact multiples of the segment, odd sizes), re-encrypts identically from any
offset, and refuses truncated, reordered, altered or foreign ciphertext; a hostile body gives
MediaBodyError, never another exception."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_sdk.mediabody import MediaBody, MediaBodyError, parse_media_body
from client_sdk.mediacrypto import (
    TAG_BYTES,
    MediaCryptoError,
    MediaKey,
    RunningDigest,
    ciphertext_size,
    decrypt_to,
    encrypt_from,
    segments,
)

CHUNK = 1024  # small segments keep the property tests fast; the format is the same at 64 KiB


def seal(mk: MediaKey, plain: bytes, start: int = 0) -> bytes:
    return b"".join(encrypt_from(mk, io.BytesIO(plain), len(plain), start))


def open_(mk: MediaKey, cipher: bytes, size: int) -> bytes:
    out = io.BytesIO()
    decrypt_to(mk, io.BytesIO(cipher), size, out)
    return out.getvalue()


def small_key() -> MediaKey:
    base = MediaKey.random()
    return MediaKey(base.key, base.prefix, CHUNK)


sizes = st.one_of(st.integers(0, 5 * CHUNK), st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(size=sizes, data=st.data())
def test_round_trip_and_resume_from_any_offset(size: int, data: st.DataObject) -> None:
    mk = small_key()
    plain = data.draw(st.binary(min_size=size, max_size=size))
    cipher = seal(mk, plain)
    assert len(cipher) == ciphertext_size(size, CHUNK) == size + segments(size, CHUNK) * TAG_BYTES
    assert open_(mk, cipher, size) == plain
    start = data.draw(st.integers(0, len(cipher)))
    assert seal(mk, plain, start) == cipher[start:]  # re-encryption from any byte is identical


def test_default_segment_size_and_exact_multiples() -> None:
    mk = MediaKey.random()
    assert mk.chunk == 65536
    for size in (0, 65536, 2 * 65536, 2 * 65536 + 7):
        plain = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        cipher = seal(mk, plain)
        assert len(cipher) == ciphertext_size(size)
        assert open_(mk, cipher, size) == plain
    assert ciphertext_size(0) == TAG_BYTES  # an empty file is one authenticated segment


@settings(max_examples=80)
@given(size=st.integers(1, 4 * CHUNK), data=st.data())
def test_any_flipped_bit_fails(size: int, data: st.DataObject) -> None:
    mk = small_key()
    plain = data.draw(st.binary(min_size=size, max_size=size))
    cipher = bytearray(seal(mk, plain))
    at = data.draw(st.integers(0, len(cipher) - 1))
    cipher[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(MediaCryptoError):
        open_(mk, bytes(cipher), size)


def test_truncation_reordering_extension_and_wrong_key_fail() -> None:
    mk = small_key()
    plain = bytes(range(256)) * 16  # 4 segments of 1 KiB
    cipher = seal(mk, plain)
    seg = CHUNK + TAG_BYTES
    parts = [cipher[i:i + seg] for i in range(0, len(cipher), seg)]
    cases = {
        "truncated at a segment boundary, size claimed smaller": (b"".join(parts[:3]), 3 * CHUNK),
        "truncated inside a segment": (cipher[:-5], len(plain)),
        "two segments swapped": (parts[1] + parts[0] + parts[2] + parts[3], len(plain)),
        "a segment repeated": (parts[0] + parts[0] + parts[2] + parts[3], len(plain)),
        "extra bytes": (cipher + b"\0", len(plain)),
        "empty": (b"", len(plain)),
    }
    for what, (bad, size) in cases.items():
        with pytest.raises(MediaCryptoError):
            open_(mk, bad, size)
            pytest.fail(what)
    with pytest.raises(MediaCryptoError):
        open_(small_key(), cipher, len(plain))
    with pytest.raises(MediaCryptoError):  # another prefix with the same key
        open_(MediaKey(mk.key, bytes(8), CHUNK), cipher, len(plain))


def test_a_file_shorter_than_declared_is_refused_while_encrypting() -> None:
    with pytest.raises(ValueError, match="shorter"):
        b"".join(encrypt_from(small_key(), io.BytesIO(b"abc"), 10))


@settings(max_examples=60)
@given(size=st.integers(0, 4 * CHUNK), cuts=st.lists(st.floats(0, 1), max_size=4), data=st.data())
def test_running_digest_survives_resumes(size: int, cuts: list[float], data: st.DataObject) -> None:
    """Sent, cut, resumed from any server offset at or after the last mark: the digest is the
    ciphertext's, as if it had been hashed in one go."""
    mk = small_key()
    plain = data.draw(st.binary(min_size=size, max_size=size))
    cipher = seal(mk, plain)
    digest = RunningDigest()
    stored = 0
    for cut in [*cuts, 1.0]:
        start = digest.rewind(stored)
        until = max(stored, int(cut * len(cipher)))
        for piece in encrypt_from(mk, io.BytesIO(plain), size, start):
            digest.feed(start, piece)
            start += len(piece)
            if start >= until:
                break
        stored = data.draw(st.integers(stored, min(until, len(cipher))))  # what the server kept
        if data.draw(st.booleans()) and digest.offset == stored:
            digest.mark()
    digest.rewind(stored)
    tail_start = digest.offset
    for piece in encrypt_from(mk, io.BytesIO(plain), size, tail_start):
        digest.feed(tail_start, piece)
        tail_start += len(piece)
    assert digest.hexdigest() == hashlib.sha256(cipher).hexdigest()


# --- the media body -------------------------------------------------------------------------

def body(**over: object) -> MediaBody:
    mk = MediaKey.random()
    fields: dict[str, object] = {"url": "/v1/media/blobs/" + "a" * 64, "key": mk, "sha256": "a" * 64,
                                 "size": 10, "mime": "image/jpeg", "name": "cat.jpg", "thumbnail": b"\xff\xd8"}
    fields.update(over)
    return MediaBody(**fields)  # type: ignore[arg-type]


def test_body_round_trip() -> None:
    for b in (body(), body(name=None, thumbnail=None, size=0)):
        assert parse_media_body(b.encode()) == b
    assert body().blob == "a" * 64


@pytest.mark.parametrize("change", [
    {"v": 2}, {"v": True}, {"url": "/v1/media/blobs/" + "b" * 64}, {"url": "https://evil/x"},
    {"sha256": "A" * 64}, {"sha256": 5}, {"key": "AAAA"}, {"key": "not base64!"}, {"nonce": "AAAA"},
    {"chunk": 0}, {"chunk": True}, {"chunk": 1 << 30}, {"size": -1}, {"size": 1.5}, {"size": 10 ** 30},
    {"mime": "jpeg"}, {"mime": 3}, {"name": "../../etc/passwd"}, {"name": "a\\b"}, {"name": ""},
    {"name": "x\u0000"}, {"name": ".."}, {"name": "\ud800"}, {"name": "x" * 256},
    {"thumbnail": "A" * 100_000}, {"thumbnail": 7},
])
def test_hostile_fields_are_refused_clearly(change: dict[str, object]) -> None:
    obj = json.loads(body().encode())
    obj.update(change)
    with pytest.raises(MediaBodyError, match="media body"):
        parse_media_body(json.dumps(obj))


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda kids: st.lists(kids) | st.dictionaries(st.text(max_size=8), kids),
                              max_leaves=20).map(json.dumps)))
def test_any_input_parses_or_raises_media_body_error(text: str | bytes) -> None:
    with contextlib.suppress(MediaBodyError):
        parse_media_body(text)


def test_deeply_nested_or_huge_bodies() -> None:
    for bad in ("[" * 100_000, "x" * 100_000, '{"v":1' + ',"a":1' * 10_000 + "}"):
        with pytest.raises(MediaBodyError):
            parse_media_body(bad)
