"""``chat-broker user ...`` and ``device ...`` in cluster mode, run as the operator runs them
(``python -m chatserver ... --cluster redis://... --key-prefix P`` in subprocesses) against the
session's Redis Cluster and a broker node in cluster mode on the same key prefix.

Proves: the same output, errors and exit codes as with the data folder (tests/test_cli.py,
tests/test_cli_devices.py); a password change and a token revocation are honoured at the running
node's next login; ``device remove`` and ``user del`` close the device's live connection on the
node holding it and leave none of its keys, tokens or staged queue in Redis; ``import`` of 1,000
users and ``list`` of them, sorted, across the cluster's masters.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from testkit.redis_cluster import RedisCluster
from tests.helpers import BrokerThread, Peer
from tests.test_cli import CMD_S, IMPORT_USERS, PAHO_NOT_AUTHORIZED, Pty, _env, cli, login, one_line_error
from tests.test_messaging import send

IMPORT_S = 240.0  # 1,000 scrypt hashes: 80-120+ s seen on a 2-core box loaded by other test runs


class Admin:
    """The CLI pointed at one deployment (a key prefix) of the session's Redis Cluster."""

    def __init__(self, cluster: RedisCluster, root: Path) -> None:
        self.prefix = f"a{uuid.uuid4().hex[:10]}:"
        self.url = "redis://" + ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes[:2])
        self.root = root
        host, port = cluster.startup_nodes[0]
        self.redis = redis.RedisCluster(host=host, port=port, decode_responses=True)

    def __call__(self, *args: str, stdin: str | None = None,
                 timeout: float = CMD_S) -> subprocess.CompletedProcess[str]:
        """``cli`` with this deployment's flags, and a bound of its own (an import of 1,000 users)."""
        return subprocess.run(
            [sys.executable, "-m", "chatserver", *args, "--cluster", self.url, "--key-prefix", self.prefix],
            cwd=self.root, env=_env(), text=True, capture_output=True, input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None, timeout=timeout, check=False)

    def ok(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = self(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result

    def listed(self) -> dict[str, str]:
        return dict(line.split("\t", 1) for line in self.ok("user", "list").stdout.splitlines())

    def keys_of(self, user: str) -> list[str]:
        """Every key of ``user`` under this prefix, on whichever master holds the user's slot."""
        return sorted(self.redis.keys(f"{self.prefix}*{{{user}}}*", target_nodes=redis.RedisCluster.PRIMARIES))


@pytest.fixture
def admin(redis_cluster: RedisCluster, tmp_path: Path) -> Iterator[Admin]:
    made = Admin(redis_cluster, tmp_path)
    try:
        yield made
    finally:
        made.redis.close()


@pytest.fixture
def node(admin: Admin, tmp_path: Path) -> Iterator[BrokerThread]:
    """One broker node in cluster mode on the admin's prefix."""
    broker = BrokerThread(tmp_path / "node", {
        "cluster.redis": admin.url.removeprefix("redis://").split(","), "cluster.key_prefix": admin.prefix,
        "cluster.node_id": "node-a", "cluster.lease_s": 3.0}).start()
    try:
        yield broker
    finally:
        broker.stop()


def online(port: int, user: str, password: str, device: str, made: list[Peer]) -> Peer:
    peer = Peer(port, user, password, device=device)
    made.append(peer)
    assert peer.connect() == 0
    assert peer.subscribe() == [1]
    return peer


def publish_keys(peer: Peer, device: str) -> None:
    keys = {"user": peer.user, "device": device, "curve25519": "Q1VSVkU", "ed25519": f"RUQ{device}",
            "signature": "U0lH"}
    assert peer.request("keys.publish", {"device_keys": keys})["ok"] is True


def test_user_and_device_commands_against_a_running_cluster_node(admin: Admin, node: BrokerThread) -> None:
    assert admin.ok("user", "add", "alice", "--password-stdin", stdin="alice-pw\n").stdout == "user alice added\n"
    admin.ok("user", "add", "bob", "--password-stdin", stdin="bob-pw\n")
    assert "already exists" in one_line_error(admin("user", "add", "bob", "--password-stdin", stdin="x\n"))
    assert admin.listed() == {"alice": "0 device(s)", "bob": "0 device(s)"}

    made: list[Peer] = []
    try:
        phone = online(node.port, "alice", "alice-pw", "phone", made)
        laptop = online(node.port, "alice", "alice-pw", "laptop", made)
        tablet = online(node.port, "alice", "alice-pw", "tablet", made)
        for peer, device in ((phone, "phone"), (laptop, "laptop"), (tablet, "tablet")):
            publish_keys(peer, device)
        token = tablet.request("auth.token")["result"]["token"]
        tablet.close()
        bob = online(node.port, "bob", "bob-pw", "phone", made)
        send(bob, "alice", "m1")
        phone.expect(lambda item: item.get("kind") == "msg" and item.get("id") == "m1")
        assert admin.redis.exists(f"{admin.prefix}q:{{alice}}:tablet"), "staged for the offline tablet"

        listed = admin.ok("device", "list", "alice")
        lines = listed.stdout.splitlines()
        assert [line.split("\t")[0] for line in lines] == ["laptop", "phone", "tablet"]
        assert all("created 20" in line and "last login 20" in line for line in lines), lines
        assert lines[2].endswith("\ttoken") and lines[0].endswith("no token"), lines
        assert listed.stderr == "3 device(s) of alice\n"
        assert admin.listed()["alice"] == "3 device(s)"

        # revoke: the token stops working at the node's next login; the password still does.
        assert login(node.port, "alice", token, "tablet") == 0
        assert admin.ok("user", "revoke", "alice", "--device", "tablet").stdout == \
            "1 device token(s) of alice revoked\n"
        assert login(node.port, "alice", token, "tablet") == PAHO_NOT_AUTHORIZED
        assert "no user 'carol'" in one_line_error(admin("user", "revoke", "carol"))

        # device remove: the live connection on the node is closed; keys, token, queue gone.
        removed = admin.ok("device", "remove", "alice", "laptop")
        assert removed.stdout == "1 device(s) of alice removed: laptop\n"
        assert "alice.laptop: its connection to node node-a is closed" in removed.stderr
        assert laptop.disconnected.wait(10), "the removed device's connection was closed"
        assert not phone.disconnected.is_set()
        assert not [k for k in admin.keys_of("alice") if k.endswith(":laptop")], admin.keys_of("alice")
        assert "laptop" not in admin.redis.hkeys(f"{admin.prefix}k:{{alice}}:id")
        assert sorted(phone.request("keys.list", {"user": "alice"})["result"]["devices"]) == ["phone", "tablet"]
        assert "no device 'laptop'" in one_line_error(admin("device", "remove", "alice", "laptop"))

        removed = admin.ok("device", "remove", "alice", "tablet")  # offline: nothing to close
        assert removed.stdout == "1 device(s) of alice removed: tablet\n" and removed.stderr == ""
        assert not admin.redis.exists(f"{admin.prefix}q:{{alice}}:tablet", f"{admin.prefix}qe:{{alice}}:tablet")

        # passwd: the old password stops working at the node, the new one works, tokens are revoked.
        phone_token = phone.request("auth.token")["result"]["token"]
        changed = admin.ok("user", "passwd", "alice", "--password-stdin", stdin="new-pw\n")
        assert changed.stdout == "password of alice changed; its device tokens are revoked\n"
        assert login(node.port, "alice", "alice-pw", "phone2") == PAHO_NOT_AUTHORIZED
        assert login(node.port, "alice", phone_token, "phone") == PAHO_NOT_AUTHORIZED
        assert login(node.port, "alice", "new-pw", "phone2") == 0
        assert "no user 'carol'" in one_line_error(admin("user", "passwd", "carol", "--password-stdin",
                                                         stdin="x\n"))

        # del: the user's live connection is closed, their account, keys and queues are gone.
        phone = online(node.port, "alice", "new-pw", "phone", made)
        deleted = admin.ok("user", "del", "alice")
        assert deleted.stdout == "user alice deleted\n"
        assert "alice.phone: its connection to node node-a is closed" in deleted.stderr
        assert phone.disconnected.wait(10)
        # Left: the seq counters (kept on purpose, storage/redis/queues.py) and the dedup marks and
        # script replies, which expire by themselves.
        left = [k for k in admin.keys_of("alice") if admin.redis.pttl(k) < 0]
        assert left == [f"{admin.prefix}qs:{{alice}}"], admin.keys_of("alice")
        assert login(node.port, "alice", "new-pw") == PAHO_NOT_AUTHORIZED
        assert admin.listed() == {"bob": "1 device(s)"}
        assert "no user 'alice'" in one_line_error(admin("user", "del", "alice"))
        assert "no user 'alice'" in one_line_error(admin("device", "list", "alice"))
    finally:
        for peer in made:
            peer.close()


@pytest.mark.timeout(2 * IMPORT_S)
def test_import_thousand_users_then_list_them(admin: Admin) -> None:
    admin.ok("user", "add", "old1", "--password-stdin", stdin="keep-pw\n")
    lines = [f"imp{i:04d}:pw-{i}" for i in range(IMPORT_USERS)]
    lines.insert(10, "no colon on this line")  # line 11
    lines.insert(50, "old1:new-pw")  # line 51, exists already
    source = admin.root / "users.txt"
    source.write_text("\n".join(lines) + "\n")

    started = time.monotonic()
    result = admin("user", "import", str(source), timeout=IMPORT_S)
    print(f"imported {IMPORT_USERS} users into the cluster in {time.monotonic() - started:.1f}s")
    assert result.returncode == 1, result.stderr  # a bad line was skipped
    assert "Traceback" not in result.stderr and "importing users" not in result.stderr
    assert result.stdout == f"{IMPORT_USERS} user(s) imported\n"
    assert any(p.startswith("skipped line 11:") for p in result.stderr.splitlines()), result.stderr
    assert "skipped 1 existing user(s): old1" in result.stderr

    started = time.monotonic()
    listing = admin.ok("user", "list").stdout.splitlines()
    print(f"listed {len(listing)} users in {time.monotonic() - started:.1f}s")
    names = [line.split("\t")[0] for line in listing]
    assert names == sorted([f"imp{i:04d}" for i in range(IMPORT_USERS)] + ["old1"])
    assert all(line.endswith("\t0 device(s)") for line in listing)
    masters = {admin.redis.keyslot(f"{{{name}}}") for name in names}
    assert len(masters) > 900, "the users are spread over the slots (and so over the masters)"

    again = admin("user", "import", str(source))
    assert again.stdout == "0 user(s) imported\n"
    assert f"{IMPORT_USERS + 1} existing user(s)" in again.stderr


def test_import_shows_a_progress_bar_on_a_terminal(admin: Admin) -> None:
    source = admin.root / "few.txt"
    source.write_text("".join(f"bar{i}:pw{i}\n" for i in range(30)))
    args = [sys.executable, "-m", "chatserver", "user", "import", str(source), "--cluster", admin.url,
            "--key-prefix", admin.prefix]
    term = Pty(args, admin.root, on=("stderr",))
    try:
        assert term.finish() == (0, b"30 user(s) imported\n")  # the bar is not in the piped output ...
    finally:
        term.proc.kill()  # a no-op once it exited
    assert b"importing users" in term.seen and b"30/30" in term.seen  # ... it is on the terminal
    assert len(admin.listed()) == 30


def test_cluster_errors_are_one_line(admin: Admin, tmp_path: Path) -> None:
    config = tmp_path / "unreachable.yaml"
    config.write_text("cluster:\n  redis: ['127.0.0.1:1']\n  retry_s: 0.3\n")
    error = one_line_error(cli("user", "list", "-c", str(config), cwd=tmp_path))
    assert error.startswith("chat-broker: error: redis connect:"), error
    assert "--cluster: 'x' is not HOST:PORT" in one_line_error(cli("device", "list", "bob", "--cluster", "x",
                                                                   cwd=tmp_path))
    assert "no user 'nobody'" in one_line_error(admin("device", "remove", "nobody"))
    assert "invalid user name" in one_line_error(admin("user", "add", "No-Body", "--password-stdin", stdin="x\n"))
