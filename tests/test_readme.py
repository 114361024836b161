"""The README's promises: its Python tour runs as written against a real broker and prints what it says."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from client_sdk import Client
from tests.helpers import WAIT_S, BrokerThread

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


def test_the_asyncio_example_reads_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    example = next(block for block in python_blocks() if "AsyncClient(" in block)
    broker = BrokerThread(tmp_path / "data").start()
    lines: queue.Queue[str] = queue.Queue()
    try:
        broker.add_user("alice", "alice-pw")
        broker.add_user("bob", "bob-pw")
        proc = subprocess.Popen([sys.executable, "-c", example.replace("port=1883", f"port={broker.port}")],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout or ()],
                         daemon=True).start()
        try:
            assert "online" in lines.get(timeout=60)  # connected, its keys published
            alice = Client("alice", "alice-pw", device="laptop", host="127.0.0.1", port=broker.port,
                           store=str(tmp_path / "alice.db"))
            alice.connect()
            try:
                alice.send("bob", "hello tablet")
                assert lines.get(timeout=WAIT_S) == "alice: hello tablet"
            finally:
                alice.close()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=WAIT_S) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        broker.stop()
