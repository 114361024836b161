"""``python -m bench metrics-cost --tiny`` still runs: the 1:1 throughput with the metrics endpoint on
(scraped while measured) and off, against real broker processes; its results have their shape.
No performance assertion (tiny sizes: numbers meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_bench_metrics_cost_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "metrics-cost", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "metrics_cost.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "metrics-cost"
    assert [run["metrics"] for run in result["runs"]] == [True, False]
    on = result["runs"][0]
    assert on["scrapes"] >= 1 and on["scrape_failures"] == 0
    for run in result["runs"]:
        assert run["errors"] == 0 and run["deliver"]["count"] > 0
    assert result["ratio_on_off"] > 0
    assert result["counters"]["per_message_ns"] > 0
    assert "on / off" in (out / "metrics_cost.md").read_text(encoding="utf-8")
