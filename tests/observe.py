"""Test helpers for the metrics listener: its URL on a running broker, plain GETs, parsed scrapes,
and the broker as a process whose log is kept."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from chatserver.status import Snapshot
from tests.helpers import ROOT, BrokerThread


def base_url(broker: BrokerThread) -> str:
    host, port = broker.address("metrics")
    return f"http://{host}:{port}"


def get(url: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def scrape(broker: BrokerThread) -> Snapshot:
    status, text = get(base_url(broker) + "/metrics")
    assert status == 200, text
    return Snapshot.parse(text)


class LoggedBroker:
    """``python -m chatserver run`` as its own process with the metrics listener on, its stderr kept in a file."""

    def __init__(self, data_dir: Path, extra_args: list[str], config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, **env} if env else None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.config = data_dir.parent / f"{data_dir.name}.yaml"
        self.config.write_text(json.dumps(config or {}))  # JSON is YAML
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.metrics_url = ""

    def add_users(self, passwords: dict[str, str]) -> None:
        lines = "".join(f"{name}:{password}\n" for name, password in passwords.items())
        subprocess.run([sys.executable, "-m", "chatserver", "user", "import", "-", "--data-dir", str(self.data_dir)],
                       input=lines, text=True, check=True, cwd=ROOT, capture_output=True, timeout=120)

    def start(self) -> LoggedBroker:
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatserver", "run", "-c", str(self.config), "--bind", "127.0.0.1:0",
                 "--metrics-bind", "127.0.0.1:0", "--data-dir", str(self.data_dir), *self.extra_args],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the ready line, or "" if it exited
        assert line.startswith("chat-broker ready"), f"not ready: {line!r} {self.log_path.read_text()}"
        self.port = int(re.search(r"tcp=[^ ]+:(\d+)", line).group(1))  # type: ignore[union-attr]
        self.metrics_url = "http://" + re.search(r"metrics=([^ ]+)", line).group(1)  # type: ignore[union-attr]
        return self

    def stop(self) -> str:
        """SIGTERM, wait, and return everything it logged."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(30) == 0
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                assert self.proc.stdout is not None
                self.proc.stdout.close()
        return self.log_path.read_text()
