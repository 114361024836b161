"""The small things an operator meets first, run as an operator runs them (``python -m chatserver``).

Proves: ``--version`` prints the installed version; read-only and changing user commands on a
data folder that is not there say so in one line and create nothing; an empty or spaces-only
password is refused by ``user add``, ``passwd`` and ``import``; a bad setting says where its value
came from (command line flag, config file path, default); ``status --watch`` into a pipe writes
every frame; a bare TCP connect or a plain HTTP request on the WebSocket listener (a load
balancer's health check) is one quiet log line, not an ERROR with a traceback.
"""

from __future__ import annotations

import importlib.metadata
import logging
import socket
from pathlib import Path

import pytest

from tests.helpers import BrokerThread, eventually
from tests.observe import base_url
from tests.test_cli import cli, one_line_error


def test_version(tmp_path: Path) -> None:
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"chat-broker {importlib.metadata.version('chat-broker')}"


@pytest.mark.parametrize("action", [["list"], ["del", "amy"], ["revoke", "amy"], ["passwd", "amy"]])
def test_user_commands_on_a_missing_data_folder_say_so_and_create_nothing(tmp_path: Path, action: list[str]) -> None:
    missing = tmp_path / "typo"
    done = cli("user", *action, "--password-stdin", "--data-dir", str(missing), cwd=tmp_path, stdin="pw-of-amy\n") \
        if action[0] == "passwd" else cli("user", *action, "--data-dir", str(missing), cwd=tmp_path)
    line = one_line_error(done)
    assert str(missing) in line and "no users database" in line, line
    assert not missing.exists()


@pytest.mark.parametrize("password", ["", "   ", " \t "])
def test_blank_passwords_are_refused(tmp_path: Path, password: str) -> None:
    data = str(tmp_path / "data")
    add = cli("user", "add", "amy", "--password-stdin", "--data-dir", data, cwd=tmp_path, stdin=f"{password}\n")
    assert "empty password" in one_line_error(add)
    assert cli("user", "add", "amy", "--password-stdin", "--data-dir", data, cwd=tmp_path,
               stdin="amy-pw\n").returncode == 0
    change = cli("user", "passwd", "amy", "--password-stdin", "--data-dir", data, cwd=tmp_path,
                 stdin=f"{password}\n")
    assert "empty password" in one_line_error(change)
    imported = cli("user", "import", "-", "--data-dir", data, cwd=tmp_path, stdin=f"bea:{password}\ncid:cid-pw\n")
    assert imported.returncode == 1
    assert "line 1: empty password" in imported.stderr, imported.stderr
    assert "1 user(s) imported" in imported.stdout


def test_config_errors_say_where_the_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    config.write_text('auth:\n  free_failures: "three"\n')
    from_file = one_line_error(cli("run", "-c", str(config), "--bind", "127.0.0.1:0", cwd=tmp_path))
    assert "auth.free_failures" in from_file and f"set in {config}" in from_file, from_file
    flag = one_line_error(cli("run", "--bind", "127.0.0.1", "--data-dir", "d", cwd=tmp_path))
    assert "listeners.tcp.bind" in flag and "given on the command line (--bind)" in flag, flag
    assert "Value error" not in flag
    small = tmp_path / "small.yaml"
    small.write_text("mqtt:\n  max_packet_bytes: 2048\n")
    across = one_line_error(cli("run", "-c", str(small), "--bind", "127.0.0.1:0", cwd=tmp_path))
    assert f"mqtt.max_packet_bytes: set in {small}" in across and "limits.max_body_bytes: the default" in across


def test_status_watch_into_a_pipe_writes_every_frame(tmp_path: Path) -> None:
    broker = BrokerThread(tmp_path / "data", {"metrics.bind": "127.0.0.1:0"}).start()
    try:
        done = cli("status", "--url", base_url(broker) + "/metrics", "--watch", "--interval", "0.05",
                   "--count", "3", cwd=tmp_path)
    finally:
        broker.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("staged items") == 4, done.stdout  # the first frame and 3 refreshes


def test_health_checks_on_the_websocket_listener_are_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = BrokerThread(tmp_path / "data", {"listeners.ws.bind": "127.0.0.1:0"}).start()
    try:
        address = broker.address("ws")
        socket.create_connection(address, timeout=5).close()  # a TCP health check
        with socket.create_connection(address, timeout=5) as http:  # an HTTP one, without Upgrade
            http.sendall(b"GET /mqtt HTTP/1.1\r\nHost: lb\r\n\r\n")
            http.recv(1024)

        def quiet_lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "handshake" in r.getMessage()]

        eventually(lambda: len(quiet_lines()) >= 2, what="both health checks logged")
    finally:
        broker.stop()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or (r.exc_info and r.levelno >= logging.INFO)]
    assert not loud, [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in loud]
    assert all(r.levelno <= logging.INFO and not r.exc_info for r in quiet_lines())
