"""The benchmark suite still runs: ``python -m bench compare --tiny --targets chat`` against a real broker
subprocess on 127.0.0.1, and its JSON and Markdown carry the fields the README and summary rely on.

No performance assertion: only that messages flowed end to end (publish -> recipient -> ack -> ``sent``)
without error items, and that the results have their shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_bench(args: list[str], tmp_path: Path, timeout: float) -> Path:
    """``python -m bench ARGS --out tmp_path/results``, which must succeed; returns the results folder."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_bench_compare_tiny(tmp_path: Path) -> None:
    out = run_bench(["compare", "--tiny", "--targets", "chat"], tmp_path, 100)
    result = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "compare"
    assert result["sizes"]["name"] == "tiny"
    assert {"date", "nproc", "python", "amqtt"} <= set(result["machine"])
    chat = result["targets"]["chat"]
    assert chat["dialect"] == "chat"
    modes = {(p["idle"], p["mode"]) for p in chat["phases"]}
    assert modes == {(0, "max"), (0, "rate"), (20, "max"), (20, "rate")}
    for phase in chat["phases"]:
        assert {"msgs_per_s", "deliver", "sent", "puback", "cpu_cores", "errors", "lost_or_late"} <= set(phase)
        assert phase["errors"] == 0, phase["error_samples"]
        assert phase["deliver"]["count"] > 0
        assert phase["sent"]["count"] > 0  # 'sent' receipts came back for measured messages
        assert {"p50_ms", "p99_ms", "p999_ms"} <= set(phase["deliver"])
    table = (out / "compare.md").read_text(encoding="utf-8")
    assert "| chat-broker | 0 |" in table
    assert (out / "summary.md").exists()


def test_bench_scale_tiny(tmp_path: Path) -> None:
    """``python -m bench scale --tiny --targets chat,cluster``: one process on SQLite, then two workers
    in cluster mode on a Redis Cluster the bench starts; Redis counters reach the results."""
    out = run_bench(["scale", "--tiny", "--targets", "chat,cluster"], tmp_path, 150)
    result = json.loads((out / "scale.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "scale"
    assert set(result["targets"]) == {"chat", "cluster"}
    for target in result["targets"].values():
        modes = {(p["idle"], p["mode"]) for p in target["phases"]}
        assert modes == {(0, "max"), (20, "max"), (20, "rate")}
        for phase in target["phases"]:
            assert phase["errors"] == 0, phase["error_samples"]
            assert phase["deliver"]["count"] > 0
            assert phase["sent"]["count"] > 0
    cluster = result["targets"]["cluster"]
    assert cluster["memory"]["processes"] == 3  # the parent and two workers
    assert cluster["phases"][-1]["counters"]["commands"] > 0  # Redis INFO deltas over the window
    counters = cluster["phases"][-1]["counters"]
    assert counters["wb:uplink:out"] > 0 and "wb:held:msg" in counters  # read off the workers' /metrics
    assert cluster["phases"][-1]["cpu_cores"]["redis"] is not None
    # (measured, not checked for sign: at this size, keys expiring meanwhile -- script replies, pending
    # marks -- can free more than 300 staged items take; seen once as -282 bytes per item)
    assert cluster["staged"]["redis_used_memory_after"] > 0 and "redis_bytes_per_item" in cluster["staged"]
    assert "`q:{}`" in (out / "scale.md").read_text(encoding="utf-8")
    assert "## Scale" in (out / "summary.md").read_text(encoding="utf-8")


def test_bench_groups_tiny(tmp_path: Path) -> None:
    """``python -m bench groups --tiny``: a 16-member group against the same body sent one-to-one; every
    unit reached every member once, in gseq order, and each figure of the table was measured."""
    out = run_bench(["groups", "--tiny"], tmp_path, 100)
    result = json.loads((out / "groups.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "groups" and result["recipients"] == 15
    kinds = {(p["mode"], p["kind"]) for p in result["phases"]}
    assert kinds == {(m, k) for m in ("group", "direct") for k in ("latency", "throughput", "staged")}
    for phase in result["phases"]:
        assert (phase["missing_deliveries"], phase["repeats"], phase["order_errors"], phase["error_items"],
                phase["missing_sent"]) == (0, 0, 0, 0, 0), phase
        assert isinstance(phase["late_arrivals"], int), "an earlier phase's arrivals are counted"
        if phase["kind"] != "staged":
            assert phase["complete_units"] == phase["units"]
            assert phase["last_member"]["p99_ms"] >= phase["first_member"]["p50_ms"] > 0
    group = next(p for p in result["phases"] if p["mode"] == "group" and p["kind"] == "staged")
    direct = next(p for p in result["phases"] if p["mode"] == "direct" and p["kind"] == "staged")
    # The body is stored once for a group message, once per recipient when sent one-to-one.
    assert direct["bodies_payload_per_unit"] > 10 * group["bodies_payload_per_unit"] > 0
    assert "| member deliveries/s |" in (out / "groups.md").read_text(encoding="utf-8")


def test_bench_media_tiny(tmp_path: Path) -> None:
    """``python -m bench media --tiny``: 16 MiB up and down through the media endpoint, byte-identical
    (the bench checks the digest), with a copy baseline and the broker's RSS."""
    out = run_bench(["media", "--tiny"], tmp_path, 100)
    result = json.loads((out / "media.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "media" and result["bytes"] == 16 * 1024 * 1024
    for key in ("copy_mb_s", "upload_mb_s", "download_mb_s"):
        assert result[key] > 0
    assert result["upload_rss_peak_kib"] >= result["rss_before_kib"] > 0
    assert "| upload 16 MiB" in (out / "media.md").read_text(encoding="utf-8")


def test_bench_logins_tiny(tmp_path: Path) -> None:
    """``python -m bench logins --tiny``: 100 device-token logins (CONNECT to SUBACK) on both chat paths, SUBSCRIBE
    sent after the CONNACK and then with the CONNECT."""
    out = run_bench(["logins", "--tiny"], tmp_path, 120)
    result = json.loads((out / "logins.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "logins" and set(result["targets"]) == {"chat-amqtt", "chat-lean"}
    for target in result["targets"].values():
        assert [p["pipelined"] for p in target["phases"]] == [False, True]  # SUBSCRIBE after CONNACK, then with it
        for phase in target["phases"]:
            assert phase["logins"] == 100 and phase["failures"] == 0, phase["failure_samples"]
            assert phase["logins_per_s"] > 0 and phase["connack"]["count"] == 100
    assert "| chat-broker (lean sessions) | 1 | 100 |" in (out / "logins.md").read_text(encoding="utf-8")
