"""A local S3 API server on 127.0.0.1 for tests: moto in server mode, as a child process.

``S3Server.start()`` runs ``python -m moto.server`` on a free loopback port and waits until it
answers; ``endpoint`` is its URL, ``make_bucket(name)`` creates a bucket, ``stop()`` ends it.
The server keeps everything in its memory: it starts empty and forgets it all when stopped.
Credentials are anything (moto checks none); tests pass fixed ones so botocore signs requests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from testkit.redis_cluster import free_ports

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"  # noqa: S105 (moto checks no credential)
REGION = "us-east-1"


class S3ServerError(RuntimeError):
    pass


class S3Server:
    def __init__(self, log_dir: Path, deadline_s: float = 30.0) -> None:
        self._log_dir = log_dir
        self._deadline_s = deadline_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        (self.port,) = free_ports(1)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_dir / "moto.log", "ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self._deadline_s
        while not self._answers():
            if self._process.poll() is not None:
                raise S3ServerError(f"moto server exited with {self._process.returncode}: see {log.name}")
            if time.monotonic() > deadline:
                self.stop()
                raise S3ServerError(f"moto server not answering on {self.endpoint} after {self._deadline_s}s")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1):  # noqa: S310 (loopback http)
                return True
        except (urllib.error.URLError, OSError):
            return False

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (an unsigned PUT: moto takes it)."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 (loopback http)
            pass

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process = None
