"""The ``chat-broker`` CLI, run as an operator runs it: ``python -m chatserver`` in subprocesses.

Proves: ``run`` serves on the flags' address with the embedded defaults or the shipped
config, prints one ready line, and SIGTERM/SIGINT end it cleanly (sessions closed, exit 0);
flags override the config; a bad config, a port in use or a bad certificate ends in ONE
stderr line naming the key or file, never a traceback; ``user add|passwd|del|revoke|list``
work against a running broker's data directory (SQLite WAL, two processes) and the
broker honours the change at the next login without a restart; passwords never come
from argv, a prompt needs a terminal; ``user import`` creates 1,000 users, reports bad
lines by number and existing users, and draws a progress bar only on a terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Peer
from tests.test_listeners import make_cert

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "config" / "broker.yaml"
START_S = 30.0  # amqtt is slow to import on a busy 2-core machine
STOP_S = 10.0
CMD_S = 120.0  # a bound, not a measurement: a loaded 2-core CI box imports 1,000 users in ~20-60 s
PAHO_NOT_AUTHORIZED = 135  # CONNACK 0x05 as paho 2.x reports it (see test_auth.py)
READY = re.compile(r"^chat-broker ready: (?P<where>.*) data_dir=(?P<data_dir>\S+)$")
IMPORT_USERS = 1_000  # scrypt (~25 ms a hash, 2 workers): ~15-25 s; 3,000 took ~60 s here


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(
    *args: str, cwd: Path, stdin: str | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m chatserver ARGS`` to completion; stdin is /dev/null unless given; ``prefix`` wraps the command."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "chatserver", *args], cwd=cwd, env=_env(), text=True, capture_output=True,
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, timeout=CMD_S, check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The operator-facing failure contract: non-zero exit, exactly one stderr line, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@dataclass
class Running:
    proc: subprocess.Popen[str]
    port: int
    data_dir: Path
    addresses: dict[str, tuple[str, int]]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=STOP_S)


@contextlib.contextmanager
def broker_process(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> Iterator[Running]:
    """``python -m chatserver run ARGS``; yields once the ready line is read (with a deadline); ``prefix``
    wraps the command."""
    log = cwd / f"broker-{time.monotonic_ns()}.log"
    with log.open("w") as err:  # a file, not a pipe: the broker's log must never block it
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "chatserver", "run", *args], cwd=cwd, env=_env(), text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            first = lines.get(timeout=START_S)
        except queue.Empty:
            pytest.fail(f"no ready line within {START_S}s; log:\n{log.read_text()}")
        if first is None:
            pytest.fail(f"exited {proc.wait(STOP_S)} before ready; log:\n{log.read_text()}")
        match = READY.match(first)
        assert match, first
        addresses: dict[str, tuple[str, int]] = {}
        for part in match["where"].split():
            name, _, bind = part.partition("=")
            host, _, port = bind.rpartition(":")
            addresses[name] = (host, int(port))
        yield Running(proc, addresses["tcp"][1], Path(match["data_dir"]), addresses, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_S)
        if proc.stdout is not None:
            proc.stdout.close()


def login(port: int, user: str, password: str, device: str = "phone") -> int:
    peer = Peer(port, user, password, device)
    try:
        return peer.connect()
    finally:
        peer.close()


def ping(peer: Peer) -> None:
    assert peer.subscribe() == [1]
    res = peer.request("ping")
    assert res["ok"] is True and isinstance(res["result"]["pong"], int)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# --- run, signals, defaults, shipped config ------------------------------------------------


def test_run_on_defaults_serves_then_sigterm_closes_sessions_and_exits_0(tmp_path: Path) -> None:
    # No -c and no --data-dir: embedded defaults, data under ./chat-data.
    added = cli("user", "add", "alice", "--password-stdin", cwd=tmp_path, stdin="alice-pw\n")
    assert added.returncode == 0, added.stderr
    assert "alice added" in added.stdout
    with broker_process("--bind", "127.0.0.1:0", cwd=tmp_path) as running:
        assert running.port > 0 and list(running.addresses) == ["tcp"]
        assert running.data_dir == (tmp_path / "chat-data").resolve()
        assert (running.data_dir / "users.db").exists()
        alice = Peer(running.port, "alice", "alice-pw")
        try:
            assert alice.connect() == 0
            ping(alice)
            started = time.monotonic()
            assert running.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < STOP_S
            assert alice.disconnected.wait(STOP_S), "the session was not closed"
        finally:
            alice.close()
        assert refused(running.port)
        log = running.log.read_text()
        assert "Traceback" not in log
        assert "stopped" in log


def test_shipped_config_runs_with_flags_and_sigint_exits_0(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli("user", "add", "bob", "--password-stdin", "--data-dir", str(data), cwd=tmp_path,
               stdin="bob-pw\n").returncode == 0
    with broker_process("-c", str(SHIPPED_CONFIG), "--bind", "127.0.0.1:0", "--data-dir", str(data),
                        cwd=tmp_path) as running:
        assert running.data_dir == data.resolve()
        bob = Peer(running.port, "bob", "bob-pw")
        try:
            assert bob.connect() == 0
            ping(bob)
        finally:
            bob.close()
        assert running.stop(signal.SIGINT) == 0
        assert refused(running.port)
    assert not (tmp_path / "chat-data").exists()  # the config's data_dir was overridden


def test_every_configured_listener_is_in_the_ready_line(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    config = tmp_path / "all.yaml"
    config.write_text(
        f'listeners:\n  tls:\n    bind: "127.0.0.1:0"\n    certfile: "{cert}"\n    keyfile: "{key}"\n'
        '  ws:\n    bind: "127.0.0.1:0"\n'
    )
    data = tmp_path / "data"
    assert cli("user", "add", "cy", "--password-stdin", "--data-dir", str(data), cwd=tmp_path,
               stdin="cy-pw\n").returncode == 0
    with broker_process("-c", str(config), "--bind", "127.0.0.1:0", "--data-dir", str(data),
                        cwd=tmp_path) as running:
        assert sorted(running.addresses) == ["tcp", "tls", "ws"]
        assert len({port for _, port in running.addresses.values()}) == 3
        cy = Peer(running.addresses["tls"][1], "cy", "cy-pw")
        cy.client.tls_set(ca_certs=str(cert))
        try:
            assert cy.connect() == 0
            ping(cy)
        finally:
            cy.close()
        assert running.stop() == 0


def test_python_m_broker_help(tmp_path: Path) -> None:
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0
    assert "run" in top.stdout and "user" in top.stdout
    user = cli("user", "--help", cwd=tmp_path)
    assert user.returncode == 0
    for action in ("add", "del", "list", "passwd", "import", "revoke"):
        assert action in user.stdout


# --- bad configurations: one line, non-zero, no traceback ----------------------------------


def _tls_config(tmp_path: Path, certfile: Path | str, keyfile: Path | str) -> str:
    path = tmp_path / "tls.yaml"
    path.write_text(
        f'listeners:\n  tls:\n    bind: "127.0.0.1:0"\n    certfile: "{certfile}"\n    keyfile: "{keyfile}"\n'
    )
    return str(path)


BAD_YAML = {
    "unknown-nested-key": ('listeners:\n  tcp:\n    bnd: "127.0.0.1:0"\n', "listeners.tcp.bnd"),
    "unknown-top-key": ("data_dri: x\n", "data_dri"),
    "wrong-type": ('auth:\n  free_failures: "three"\n', "auth.free_failures"),
    "bad-bind": ('listeners:\n  ws:\n    bind: "nowhere"\n', "listeners.ws.bind"),
    "invalid-yaml": ("listeners: [\n  tcp: {\n", "broken.yaml"),
    "not-a-mapping": ("- just\n- a list\n", "broken.yaml"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, case: str) -> None:
    text, named = BAD_YAML[case]
    (tmp_path / "broken.yaml").write_text(text)
    result = cli("run", "-c", "broken.yaml", "--bind", "127.0.0.1:0", "--data-dir", "d", cwd=tmp_path)
    assert named in one_line_error(result)
    assert "ready" not in result.stdout


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = cli("run", "-c", "no-such.yaml", "--bind", "127.0.0.1:0", cwd=tmp_path)
    assert "no-such.yaml" in one_line_error(result)


def test_bad_bind_flag_names_the_key(tmp_path: Path) -> None:
    result = cli("run", "--bind", "127.0.0.1", "--data-dir", "d", cwd=tmp_path)
    assert "listeners.tcp.bind" in one_line_error(result)


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", "--bind", f"127.0.0.1:{port}", "--data-dir", "d", cwd=tmp_path)
    line = one_line_error(result)
    assert "listeners.tcp.bind" in line and str(port) in line
    assert "ready" not in result.stdout


@pytest.mark.parametrize("fault", ["missing-cert", "missing-key", "cert-is-a-directory", "garbage-cert",
                                   "unreadable-cert", "no-keyfile"])
def test_bad_tls_files_are_one_line_naming_the_file(tmp_path: Path, fault: str, request: pytest.FixtureRequest) -> None:
    cert, key = make_cert(tmp_path)
    as_user: tuple[str, ...] = ()
    named: str
    if fault == "missing-cert":
        config, named = _tls_config(tmp_path, tmp_path / "gone.pem", key), "gone.pem"
    elif fault == "missing-key":
        config, named = _tls_config(tmp_path, cert, tmp_path / "gone.key"), "gone.key"
    elif fault == "cert-is-a-directory":
        (tmp_path / "dir.pem").mkdir()
        config, named = _tls_config(tmp_path, tmp_path / "dir.pem", key), "dir.pem"
    elif fault == "garbage-cert":
        (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        config, named = _tls_config(tmp_path, tmp_path / "garbage.pem", key), "garbage.pem"
    elif fault == "unreadable-cert":
        if os.geteuid() == 0:
            # Root reads any file: run this broker as nobody (setpriv, util-linux), from a directory
            # nobody can reach (pytest's own temporary directories are private to root).
            as_user = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
            tmp_path = Path(tempfile.mkdtemp(prefix="chat-cli-"))
            request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
            tmp_path.chmod(0o777)
            cert, key = make_cert(tmp_path)
            key.chmod(0o644)
        cert.chmod(0)
        config, named = _tls_config(tmp_path, cert, key), cert.name
        Path(config).chmod(0o644)
    else:
        path = tmp_path / "half.yaml"
        path.write_text('listeners:\n  tls:\n    bind: "127.0.0.1:0"\n')
        config, named = str(path), "listeners.tls"
    # A plain listener opens first: its start-up log lines must not reach stderr either.
    result = cli("run", "-c", config, "--bind", "127.0.0.1:0", "--data-dir", "d", cwd=tmp_path, prefix=as_user)
    line = one_line_error(result)
    assert named in line
    assert "listeners.tls" in line
    assert "ready" not in result.stdout


# --- user commands against a running broker -------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One broker process for the user-command tests; its config is overridden by the flags."""
    home = tmp_path_factory.mktemp("live")
    config = home / "live.yaml"
    # free_failures high: these tests make wrong-password logins from one address on purpose.
    config.write_text(
        f'data_dir: "{home / "unused"}"\nlisteners:\n  tcp:\n    bind: "127.0.0.1:1"\n'
        "auth:\n  free_failures: 1000\n"
    )
    with broker_process("-c", str(config), "--bind", "127.0.0.1:0", "--data-dir", str(home / "data"),
                        cwd=home) as running:
        assert running.port != 1  # --bind beat the config
        yield running
        assert running.stop() == 0
    assert not (home / "unused").exists()  # --data-dir beat the config


def user_cmd(live: Running, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return cli("user", *args, "--data-dir", str(live.data_dir), cwd=live.data_dir.parent, stdin=stdin)


def listed(live: Running) -> dict[str, str]:
    result = user_cmd(live, "list")
    assert result.returncode == 0, result.stderr
    return dict(line.split("\t", 1) for line in result.stdout.splitlines())


def test_user_added_while_running_logs_in_without_restart(live: Running) -> None:
    assert login(live.port, "carol", "carol-pw") == PAHO_NOT_AUTHORIZED
    result = user_cmd(live, "add", "carol", "--password-stdin", stdin="carol-pw\n")
    assert result.returncode == 0, result.stderr
    carol = Peer(live.port, "carol", "carol-pw")
    try:
        assert carol.connect() == 0
        ping(carol)
    finally:
        carol.close()
    assert listed(live)["carol"] == "1 device(s)"


def test_duplicate_add_fails_clearly(live: Running) -> None:
    assert user_cmd(live, "add", "dup", "--password-stdin", stdin="first-pw\n").returncode == 0
    again = user_cmd(live, "add", "dup", "--password-stdin", stdin="second-pw\n")
    assert "already exists" in one_line_error(again)
    assert login(live.port, "dup", "second-pw") == PAHO_NOT_AUTHORIZED
    assert login(live.port, "dup", "first-pw") == 0


def test_passwd_changes_the_password_at_the_running_broker(live: Running) -> None:
    assert user_cmd(live, "add", "dave", "--password-stdin", stdin="old-pw\n").returncode == 0
    assert login(live.port, "dave", "old-pw") == 0
    result = user_cmd(live, "passwd", "dave", "--password-stdin", stdin="new-pw\n")
    assert result.returncode == 0, result.stderr
    assert login(live.port, "dave", "old-pw") == PAHO_NOT_AUTHORIZED
    assert login(live.port, "dave", "new-pw") == 0
    assert "no user" in one_line_error(user_cmd(live, "passwd", "nobody", "--password-stdin", stdin="x\n"))


def test_del_removes_the_user(live: Running) -> None:
    assert user_cmd(live, "add", "erin", "--password-stdin", stdin="erin-pw\n").returncode == 0
    assert login(live.port, "erin", "erin-pw") == 0
    assert "erin" in listed(live)
    result = user_cmd(live, "del", "erin")
    assert result.returncode == 0, result.stderr
    assert "erin" not in listed(live)
    assert login(live.port, "erin", "erin-pw") == PAHO_NOT_AUTHORIZED
    assert "no user" in one_line_error(user_cmd(live, "del", "erin"))


def test_revoke_ends_a_device_token_at_the_running_broker(live: Running) -> None:
    assert user_cmd(live, "add", "fay", "--password-stdin", stdin="fay-pw\n").returncode == 0
    fay = Peer(live.port, "fay", "fay-pw", device="tablet")
    try:
        assert fay.connect() == 0
        assert fay.subscribe() == [1]
        token = fay.request("auth.token")["result"]["token"]
    finally:
        fay.close()
    assert login(live.port, "fay", token, device="tablet") == 0
    result = user_cmd(live, "revoke", "fay", "--device", "tablet")
    assert result.returncode == 0, result.stderr
    assert "1 device token(s)" in result.stdout
    assert login(live.port, "fay", token, device="tablet") == PAHO_NOT_AUTHORIZED
    assert login(live.port, "fay", "fay-pw", device="tablet") == 0
    assert "no user" in one_line_error(user_cmd(live, "revoke", "nobody"))


def test_password_is_never_taken_from_argv(live: Running) -> None:
    result = user_cmd(live, "add", "gus", "gus-pw")
    assert result.returncode == 2  # argparse: there is no positional for a password
    assert "unrecognized arguments" in result.stderr and "gus-pw" in result.stderr
    assert "gus" not in listed(live)


@pytest.mark.parametrize(("args", "stdin", "says"), [
    (("add", "hal"), None, "--password-stdin"),  # no terminal to prompt on
    (("add", "hal", "--password-stdin"), "\n", "empty password"),
    (("add", "Hal!", "--password-stdin"), "pw\n", "invalid user name"),
])
def test_refused_user_adds_say_why(live: Running, args: tuple[str, ...], stdin: str | None, says: str) -> None:
    assert says in one_line_error(user_cmd(live, *args, stdin=stdin))
    assert "hal" not in listed(live)


# --- terminals -------------------------------------------------------------------------------


class Pty:
    """A child process with a pseudo-terminal on the given standard streams."""

    def __init__(self, args: list[str], cwd: Path, on: tuple[str, ...]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = _env() | {"TERM": "xterm-256color"}
        streams = {name: (slave if name in on else subprocess.PIPE) for name in ("stdin", "stdout", "stderr")}
        # A new session: no controlling terminal, so getpass falls back to the pty on stdin
        # instead of opening the /dev/tty of whoever runs the tests.
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, start_new_session=True, **streams)
        os.close(slave)
        self.seen = b""

    def read_until(self, text: bytes, timeout: float = CMD_S) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return False
        return True

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every slave end is closed
            return False
        self.seen += chunk
        return bool(chunk)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> tuple[int, bytes]:
        """Read the terminal to its end; return (exit code, what the process wrote to pipes)."""
        deadline = time.monotonic() + CMD_S
        while time.monotonic() < deadline and self._read(deadline - time.monotonic()):
            pass
        out, _ = self.proc.communicate(timeout=CMD_S)
        os.close(self.master)
        return self.proc.returncode, out or b""


def test_prompt_on_a_terminal_asks_twice_without_echo(live: Running) -> None:
    args = [sys.executable, "-m", "chatserver", "user", "add", "ivy", "--data-dir", str(live.data_dir)]
    term = Pty(args, live.data_dir.parent, on=("stdin", "stdout", "stderr"))
    try:
        assert term.read_until(b"Password: ")
        term.send("ivy-pw\n")
        assert term.read_until(b"Repeat password: ")
        term.send("ivy-pw\n")
        assert term.read_until(b"user ivy added")
        code, _ = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code == 0
    assert b"ivy-pw" not in term.seen  # echo was off
    assert login(live.port, "ivy", "ivy-pw") == 0


def test_prompt_mismatch_is_refused(live: Running) -> None:
    args = [sys.executable, "-m", "chatserver", "user", "add", "jay", "--data-dir", str(live.data_dir)]
    term = Pty(args, live.data_dir.parent, on=("stdin", "stdout", "stderr"))
    try:
        assert term.read_until(b"Password: ")
        term.send("one\n")
        assert term.read_until(b"Repeat password: ")
        term.send("two\n")
        code, _ = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code == 1
    assert b"did not match" in term.seen and b"Traceback" not in term.seen
    assert "jay" not in listed(live)


def test_import_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    source = tmp_path / "few.txt"
    source.write_text("".join(f"bar{i}:pw{i}\n" for i in range(30)))
    args = [sys.executable, "-m", "chatserver", "user", "import", str(source), "--data-dir", str(tmp_path / "d")]
    term = Pty(args, tmp_path, on=("stderr",))
    try:
        code, out = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code == 0
    assert b"importing users" in term.seen and b"30/30" in term.seen  # rich's bar, on the terminal
    assert out.decode().strip() == "30 user(s) imported"  # ... and not in the piped output


# --- bulk import -----------------------------------------------------------------------------


def test_import_thousand_users_reports_bad_lines_and_existing(live: Running) -> None:
    for name in ("old1", "old2"):
        assert user_cmd(live, "add", name, "--password-stdin", stdin="keep-pw\n").returncode == 0
    lines = [f"imp{i:04d}:pw-{i}" for i in range(IMPORT_USERS)]
    lines.insert(10, "no colon on this line")       # line 11
    lines.insert(20, "# a comment")                  # line 21, skipped silently
    lines.insert(30, "Bad-Name:pw")                  # line 31
    lines.insert(40, "imp0005:other-pw")             # line 41, repeats line 6's user
    lines.insert(50, "old1:new-pw")                  # line 51, exists already
    lines.insert(60, "old2:new-pw")                  # line 61
    lines.insert(70, "")                              # blank, skipped
    source = live.data_dir.parent / "users.txt"
    source.write_text("\n".join(lines) + "\n")

    started = time.monotonic()
    result = user_cmd(live, "import", str(source))
    took = time.monotonic() - started
    print(f"imported {IMPORT_USERS} users in {took:.1f}s")

    assert result.returncode == 1, result.stderr  # bad lines were skipped
    assert "Traceback" not in result.stderr
    assert "importing users" not in result.stderr  # no terminal, no bar
    assert result.stdout.strip() == f"{IMPORT_USERS} user(s) imported"
    problems = result.stderr.splitlines()
    assert any(p.startswith("skipped line 11:") for p in problems), problems
    assert any(p.startswith("skipped line 31:") and "Bad-Name" in p for p in problems), problems
    assert any(p.startswith("skipped line 41:") and "imp0005" in p for p in problems), problems
    assert not any("line 21" in p or "line 71" in p for p in problems), problems
    assert any("2 existing user(s)" in p and "old1" in p and "old2" in p for p in problems), problems

    users = listed(live)
    assert sum(name.startswith("imp") for name in users) == IMPORT_USERS
    # The running broker sees them at once; duplicates and existing users kept the first password.
    assert login(live.port, f"imp{IMPORT_USERS - 1:04d}", f"pw-{IMPORT_USERS - 1}") == 0
    assert login(live.port, "imp0005", "pw-5") == 0
    assert login(live.port, "imp0005", "other-pw") == PAHO_NOT_AUTHORIZED
    assert login(live.port, "old1", "keep-pw") == 0

    # Importing the same file again adds nothing and reports every name as existing.
    again = user_cmd(live, "import", str(source))
    assert again.stdout.strip() == "0 user(s) imported"
    assert f"{IMPORT_USERS + 2} existing user(s)" in again.stderr


def test_import_of_unreadable_or_binary_file_is_one_line(tmp_path: Path) -> None:
    assert "missing.txt" in one_line_error(cli("user", "import", "missing.txt", "--data-dir", "d", cwd=tmp_path))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9:pw\n")
    assert "latin1.txt" in one_line_error(cli("user", "import", "latin1.txt", "--data-dir", "d", cwd=tmp_path))


def test_read_only_data_dir_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """A data directory on a read-only file system (or a full one): the broker does not start, and
    says so in one line with what to do, instead of SQLite's bare 'attempt to write a readonly database'."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root): {mounted.stderr.strip()}")
    try:
        added = cli("user", "add", "alice", "--password-stdin", "--data-dir", str(disk / "data"),
                    cwd=tmp_path, stdin="alice-pw\n")
        assert added.returncode == 0, added.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        line = one_line_error(cli("run", "--bind", "127.0.0.1:0", "--data-dir", str(disk / "data"), cwd=tmp_path))
        assert "read-only: make it writable" in line, line
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
