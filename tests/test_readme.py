"""The README's promises: its Python tour runs as written against a real broker and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import BrokerThread

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_the_python_tour_runs_as_written(tmp_path: Path) -> None:
    tour = next(block for block in python_blocks() if "alice.send(" in block)
    broker = BrokerThread(tmp_path / "data").start()
    try:
        broker.add_user("alice", "alice-pw")
        broker.add_user("bob", "bob-pw")
        script = tour.replace("port=1883", f"port={broker.port}")
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=False)
    finally:
        broker.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "alice: hello bob" or "alice: hello bob" in lines
    statuses = [line.split(":")[0] for line in lines if line.split(":")[0] in {"sent", "delivered", "seen"}]
    assert statuses == ["sent", "delivered", "seen"], result.stdout
