"""``chat-broker run --workers N``: the refusal in SQLite mode, and the parent (chatserver/workers.py)
as a process: ready lines, SIGTERM forwarded, a dead worker restarted, a crash loop or a worker that
cannot start ending the parent non-zero. The workers here are stand-ins (a few lines of Python that
speak the ready line), so the parent is tested without cluster mode; two real brokers sharing a port
through ``listeners.reuse_port`` are tested below it."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from chatserver.workers import reserve_port
from tests.helpers import BrokerThread, Peer
from tests.test_cli import cli, one_line_error

WAIT_S = 30.0

STAND_IN = textwrap.dedent("""
    import pathlib, signal, sys, time
    index, folder, mode = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    if mode == "fail" and index == "1":
        print("stand-in: cannot start", file=sys.stderr)
        sys.exit(3)
    def stop(sig, frame):
        (folder / f"{index}.{signal.Signals(sig).name}").touch()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runs = folder / f"{index}.runs"
    runs.write_text((runs.read_text() if runs.exists() else "") + "x")
    first = runs.read_text() == "x"
    print(f"chat-broker ready: tcp=127.0.0.1:1 metrics=127.0.0.1:{100 + int(index)} data_dir={folder}", flush=True)
    crash = folder / f"{index}.crash"
    while not (crash.exists() and (mode == "loop" or (mode == "crash" and first))):
        time.sleep(0.05)  # the stand-in polls; the test waits on lines
    sys.exit(1)
""")

PARENT = textwrap.dedent("""
    import asyncio, sys
    from chatserver.workers import RestartPolicy, Workers
    stand_in, folder, mode = sys.argv[1:4]
    policy = RestartPolicy(max_deaths=3, window_s=60.0, backoff_s=(0.05,))
    command = lambda i: [sys.executable, stand_in, str(i), folder, mode]
    sys.exit(asyncio.run(Workers(2, command, policy).run()))
""")


class Parent:
    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.folder = tmp_path
        stand_in = tmp_path / "stand_in.py"
        stand_in.write_text(STAND_IN)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(stand_in), str(tmp_path), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, start: str) -> str:
        while True:
            line = self.lines.get(timeout=WAIT_S)
            if line.startswith(start):
                return line

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(WAIT_S)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_sqlite_mode_refuses_workers_in_one_line(tmp_path: Path) -> None:
    line = one_line_error(cli("run", "--workers", "2", "--data-dir", str(tmp_path / "d"), "--bind", "127.0.0.1:0",
                              cwd=tmp_path))
    assert "--workers 2 needs cluster mode" in line and "one SQLite file, one writer" in line and "--cluster" in line
    assert not (tmp_path / "d").exists()


def test_bad_cluster_flags_are_one_line(tmp_path: Path) -> None:
    assert "--cluster: 'nope' is not HOST:PORT" in one_line_error(cli("run", "--cluster", "nope", cwd=tmp_path))
    assert "--node-id is for cluster mode" in one_line_error(cli("run", "--node-id", "n1", cwd=tmp_path))
    assert "must be 1 or more" in one_line_error(
        cli("run", "--cluster", "127.0.0.1:7000", "--workers", "0", cwd=tmp_path))


def test_parent_announces_workers_and_forwards_sigterm(tmp_path: Path) -> None:
    parent = Parent(tmp_path, "stay")
    ready = parent.wait_line("chat-broker ready")
    assert ready == "chat-broker ready: tcp=127.0.0.1:1 workers=2"
    parent.proc.send_signal(signal.SIGTERM)
    code, _ = parent.finish()
    assert code == 0
    assert (tmp_path / "0.SIGTERM").exists() and (tmp_path / "1.SIGTERM").exists()


def test_parent_restarts_a_dead_worker(tmp_path: Path) -> None:
    parent = Parent(tmp_path, "crash")
    parent.wait_line("chat-broker ready")
    (tmp_path / "1.crash").touch()
    assert parent.wait_line("worker 1 ready again").startswith("worker 1 ready again: pid=")
    parent.proc.send_signal(signal.SIGINT)
    code, stderr = parent.finish()
    assert code == 0, stderr
    assert "worker 1 exited with 1; restarting it in 0.05 s" in stderr
    assert (tmp_path / "1.runs").read_text() == "xx" and (tmp_path / "0.runs").read_text() == "x"


def test_parent_gives_up_on_a_crash_loop(tmp_path: Path) -> None:
    parent = Parent(tmp_path, "loop")
    parent.wait_line("chat-broker ready")
    (tmp_path / "1.crash").touch()
    code, stderr = parent.finish()
    assert code == 1
    assert "chat-broker: error: worker 1 exited with 1 3 times within 60 s; stopping" in stderr
    assert (tmp_path / "0.SIGTERM").exists()  # the healthy one was stopped, not orphaned


def test_parent_fails_when_a_worker_cannot_start(tmp_path: Path) -> None:
    parent = Parent(tmp_path, "fail")
    code, stderr = parent.finish()
    assert code == 1
    assert "stand-in: cannot start" in stderr
    assert "chat-broker: error: worker 1 exited with 3 before all workers were ready; stopping" in stderr
    assert parent.lines.empty() or not any(
        parent.lines.get_nowait().startswith("chat-broker ready") for _ in range(parent.lines.qsize()))


def test_two_brokers_share_a_port_with_reuse_port(tmp_path: Path) -> None:
    held, port = reserve_port("127.0.0.1")
    brokers = [BrokerThread(tmp_path / f"d{i}", {"listeners.tcp.bind": f"127.0.0.1:{port}",
                                                  "listeners.reuse_port": True}).start() for i in range(2)]
    try:
        assert [broker.port for broker in brokers] == [port, port]
        for broker in brokers:
            broker.add_user("alice", "alice-pw")
        peer = Peer(port, "alice", "alice-pw")
        assert peer.connect() == 0
        peer.close()
    finally:
        for broker in brokers:
            broker.stop()
        held.close()
