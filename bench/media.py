"""``python -m bench media``: the media endpoint's upload and download speed against a plain file copy
on the same disk, and the broker's memory while it moves a large file (1 GiB at full size).

1. Baseline: a file of ``size`` bytes (incompressible, like ciphertext) is written to the work
   folder, then copied with ``shutil.copyfile`` and fsynced: MB/s of the copy.
2. The broker (``python -m chatserver run``, local backend, data folder on the same disk) gets the
   same bytes uploaded over HTTP on loopback (aiohttp client, PATCHes of ``chunk_max``, streamed
   from a generator), then downloaded whole into a SHA-256 (checked against the upload's).
3. A thread samples the broker's RSS (``/proc``) every ``SAMPLE_S`` during each transfer: its peak
   against its RSS before, so memory held per transfer shows (it must not grow with the size).

The client runs in the bench process on the same cores (it only generates the bytes while the clock
runs; the digests it checks are computed outside the timed part): the figures are what one client on
the same machine gets, an underestimate of the endpoint alone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import free_port, machine_line, md_table, rss_kib
from bench.targets import ChatServer
from bench.users import DEVICE, make_template, token_for

MiB = 1024 * 1024
SIZES = {"tiny": 16 * MiB, "quick": 256 * MiB, "full": 1024 * MiB}
CHUNK = 8 * MiB
SAMPLE_S = 0.02
BLOCK = os.urandom(MiB)


def pieces(size: int, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes ``[start, end)`` (``start`` a multiple of MiB) of a ``size``-byte file, in MiB pieces each
    made unique by its index: the file is never in memory."""
    for i in range(start, min(size, end if end is not None else size), MiB):
        yield (i // MiB).to_bytes(8, "big") + BLOCK[8: min(MiB, size - i)]


async def agen(items: Iterator[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


class PeakRss:
    """The highest RSS of ``pid`` while the block runs, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid) or 0)
            self._stop.wait(SAMPLE_S)


def copy_baseline(workdir: Path, size: int) -> float:
    """MB/s of ``shutil.copyfile`` + fsync of a ``size``-byte file on the work folder's disk."""
    source, target = workdir / "media-source.bin", workdir / "media-copy.bin"
    with source.open("wb") as f:
        for piece in pieces(size):
            f.write(piece)
        os.fsync(f.fileno())
    started = time.perf_counter()
    shutil.copyfile(source, target)
    with target.open("rb") as f:
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    source.unlink()
    target.unlink()
    return size / MiB / seconds


def auth(user: str) -> dict[str, str]:
    raw = f"{user}.{DEVICE}:{token_for(user)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def transfer(base: str, size: int, pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/uploads", json={"size": size, "to": "bob"}, headers=auth("alice")) as r:
            upload = (await r.json())["upload"]
        expected = hashlib.sha256()
        for piece in pieces(size):  # before the clock starts: the client's own work is not the endpoint's
            expected.update(piece)
        with PeakRss(pid) as rss:
            started = time.perf_counter()
            for offset in range(0, size, CHUNK):
                length = min(CHUNK, size - offset)
                body = agen(pieces(size, offset, offset + length))
                headers = {**auth("alice"), "Upload-Offset": str(offset), "Content-Length": str(length),
                           "Content-Type": "application/offset+octet-stream"}
                async with http.patch(f"{base}/uploads/{upload}", data=body, headers=headers) as r:
                    assert r.status in (200, 204), await r.text()
                    if r.status == 200:
                        sealed = await r.json()
            out["upload_s"] = time.perf_counter() - started
        out["upload_rss_peak_kib"] = rss.peak
        assert sealed["sha256"] == expected.hexdigest()
        got = hashlib.sha256()
        with PeakRss(pid) as rss:
            started = time.perf_counter()
            async with http.get(base.removesuffix("/v1/media") + sealed["url"], headers=auth("bob")) as r:
                async for piece in r.content.iter_chunked(MiB):
                    got.update(piece)
            out["download_s"] = time.perf_counter() - started
        out["download_rss_peak_kib"] = rss.peak
        assert got.hexdigest() == sealed["sha256"], "the download differs from the upload"
    return out


def run(sizes_name: str, workdir: Path, log: Any = print) -> dict[str, Any]:
    size = SIZES[sizes_name]
    copy_mb_s = copy_baseline(workdir, size)
    log(f"[media] plain copy of {size // MiB} MiB: {copy_mb_s:.0f} MB/s")
    template = workdir / "media-users"
    make_template(template, ["alice", "bob"])
    port = free_port()
    config = (f'media:\n  bind: "127.0.0.1:{port}"\n  max_bytes: {size}\n  chunk_max_bytes: {CHUNK}\n'
              f"  quota_bytes: {2 * size}\n")
    server = ChatServer(workdir, template, config)
    server.fresh_data()
    server.start()
    try:
        rss_before = server.rss_kib() or 0
        figures = asyncio.run(transfer(f"http://127.0.0.1:{port}/v1/media", size, server.pid))
    finally:
        server.stop()
    result = {
        "bytes": size,
        "copy_mb_s": round(copy_mb_s, 1),
        "upload_mb_s": round(size / MiB / figures["upload_s"], 1),
        "download_mb_s": round(size / MiB / figures["download_s"], 1),
        "rss_before_kib": rss_before,
        "upload_rss_peak_kib": figures["upload_rss_peak_kib"],
        "download_rss_peak_kib": figures["download_rss_peak_kib"],
    }
    peak = max(figures["upload_rss_peak_kib"], figures["download_rss_peak_kib"])
    log(f"[media] upload {result['upload_mb_s']} MB/s, download {result['download_mb_s']} MB/s; broker RSS "
        f"{rss_before // 1024} MiB before, peak {peak // 1024} MiB")
    return result


def markdown(result: dict[str, Any]) -> str:
    mib = result["bytes"] // MiB
    rows = [
        ["plain file copy + fsync (same disk)", result["copy_mb_s"], "", ""],
        [f"upload {mib} MiB (PATCH {CHUNK // MiB} MiB, fsync each)", result["upload_mb_s"],
         result["rss_before_kib"] // 1024, result["upload_rss_peak_kib"] // 1024],
        [f"download {mib} MiB (one GET)", result["download_mb_s"], result["rss_before_kib"] // 1024,
         result["download_rss_peak_kib"] // 1024],
    ]
    lines = ["# Media endpoint: throughput and memory", "", machine_line(result["machine"]), "",
             *md_table(["transfer", "MB/s", "broker RSS before (MiB)", "broker RSS peak (MiB)"], rows), "",
             "MB/s are MiB per second over loopback with the client on the same machine (docs/MEDIA.md)."]
    return "\n".join(lines) + "\n"
