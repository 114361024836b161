"""The SDK installs alone: ``pip install`` of the repository with no extra, in a fresh venv, gives
``import client_sdk`` without any of the server's dependencies, and that venv runs the README's
Python tour against a broker installed the normal way (this suite's own venv, with the server).

Slow (a fresh venv and a pip install: about a minute); it needs the package index pip is set up with.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BrokerProcess
from tests.test_readme import python_blocks

ROOT = Path(__file__).resolve().parents[1]
# What the server needs and the SDK must not: its dependencies, and our modules that import them.
SERVER_ONLY = ("amqtt", "aiosqlite", "yaml", "pydantic", "rich", "prometheus_client", "redis", "httpx", "h2",
               "aiohttp", "aiobotocore", "orjson", "broker.server", "storage.sqlite.db", "chatserver.app")


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the repository installed with no extra; returns its ``bin`` folder."""
    base = tmp_path_factory.mktemp("sdk-alone")
    # Build from a copy: pip builds in the source tree, and this one is in use by the other tests.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist", "chat-data", ".*_cache", ".hypothesis",
        "bench", "tests"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=120)
    bin_dir = base / "venv" / "bin"
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(source)],
                             capture_output=True, text=True, timeout=600, check=False)
    assert install.returncode == 0, install.stderr
    return bin_dir


def run_python(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Outside the repository and with no PYTHONPATH: only what the venv installed is importable.
    return subprocess.run([str(bin_dir / "python"), "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)


@pytest.mark.timeout(900)
def test_the_sdk_imports_without_the_server(sdk_venv: Path, tmp_path: Path) -> None:
    sdk = run_python(sdk_venv, "import client_sdk; print(client_sdk.__file__)", tmp_path)
    assert sdk.returncode == 0, sdk.stderr
    assert Path(sdk.stdout.strip()).is_relative_to(sdk_venv.parent), sdk.stdout  # the installed copy
    for module in SERVER_ONLY:
        server = run_python(sdk_venv, f"import {module}", tmp_path)
        assert server.returncode != 0, f"{module} imports in an SDK-only install"
        assert "ModuleNotFoundError" in server.stderr, server.stderr


@pytest.mark.timeout(900)
def test_the_cli_names_the_missing_extra(sdk_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(sdk_venv / "chat-broker"), "run"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "pip install 'chat-broker[server]'" in result.stderr, result.stderr


@pytest.mark.timeout(900)
def test_the_readme_tour_runs_on_the_sdk_alone(sdk_venv: Path, tmp_path: Path) -> None:
    tour = next(block for block in python_blocks() if "alice.send(" in block)
    broker = BrokerProcess(tmp_path / "data").start()
    try:
        broker.add_users({"alice": "alice-pw", "bob": "bob-pw"})
        result = run_python(sdk_venv, tour.replace("port=1883", f"port={broker.port}"), tmp_path)
    finally:
        broker.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "alice: hello bob" in lines, result.stdout
    statuses = [line.split(":")[0] for line in lines if line.split(":")[0] in {"sent", "delivered", "seen"}]
    assert statuses == ["sent", "delivered", "seen"], result.stdout
