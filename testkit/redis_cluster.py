"""A Redis Cluster on loopback for tests: 3 masters and 3 replicas of Debian's ``redis-server``.

Each node runs from its own folder under ``root`` (``redis.conf``, ``nodes.conf``, the AOF,
``redis.log``) on a free port with its own cluster bus port, ``appendonly yes`` and
``cluster-node-timeout 2000`` (a dead master's replica is promoted ~3-4 s after the kill:
measured here, docs/TESTING.md). ``start()`` returns once every node reports
``cluster_state:ok`` with all 16384 slots and every replica's link to its master is up;
``stop()`` kills every process and removes ``root``.

Fault helpers: ``kill_master(slot_or_key)`` SIGKILLs the master serving a slot and returns
at once (the test decides what runs during the failover); ``wait_promoted(slot_or_key, node)``
waits until another master serves that slot and the cluster is ok again; ``restart(node)`` brings a killed node back
(it rejoins as a replica) and waits for the cluster to be whole. Every wait polls against a
deadline. Everything here blocks: from async code call it through ``asyncio.to_thread``.

Talks to the nodes through ``redis-cli`` (installed with ``redis-server``), so it needs no
client library.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
MISSING = ("redis-server not found: run scripts/test, which installs it "
           "(or as root: apt-get install redis-server)")


class RedisClusterError(RuntimeError):
    """The cluster could not be started, or did not reach the state waited for in time."""


@dataclass(eq=False)
class RedisNode:
    port: int
    bus_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class RedisCluster:
    def __init__(self, root: Path, masters: int = 3, replicas: int = 1, deadline_s: float = 30.0) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RedisClusterError(MISSING)
        self.root = root
        self.masters = masters
        self.replicas = replicas
        self.deadline_s = deadline_s
        ports = free_ports(2 * masters * (1 + replicas))
        half = len(ports) // 2
        self.nodes = [RedisNode(port, bus, root / str(port)) for port, bus in zip(ports[:half], ports[half:],
                                                                                 strict=True)]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.folder.mkdir(parents=True)
                (node.folder / "redis.conf").write_text(
                    f"bind 127.0.0.1\nport {node.port}\ncluster-enabled yes\ncluster-port {node.bus_port}\n"
                    f"cluster-config-file nodes.conf\ncluster-node-timeout {NODE_TIMEOUT_MS}\n"
                    f"appendonly yes\nsave \"\"\ndir {node.folder}\nlogfile {node.folder / 'redis.log'}\n")
                self._spawn(node)
            for node in self.nodes:
                self._wait(f"{node.address} answers PING", functools.partial(self._answers, node), node)
            create = subprocess.run(  # noqa: S603 (fixed program, our arguments)
                ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),  # noqa: S607
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=self.deadline_s, check=False)
            if create.returncode != 0:
                raise RedisClusterError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
            self.wait_ok()
        except BaseException:
            self._kill_all()  # the folders stay: the error names the logs
            raise

    def stop(self) -> None:
        """Kill every node (SIGKILL: the data goes too) and remove ``root``."""
        self._kill_all()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_all(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                if node.process.poll() is None:
                    node.process.kill()
                node.process.wait()
                node.process = None

    # --- faults --------------------------------------------------------------------------

    def kill_master(self, slot_or_key: int | str) -> RedisNode:
        """SIGKILL the master serving a slot (or a key's slot); returns it without waiting."""
        node = self.master_of(self.slot(slot_or_key))
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        return node

    def wait_promoted(self, slot_or_key: int | str, killed: RedisNode) -> RedisNode:
        """Wait until every live node sees a master other than ``killed`` serving the slot and the
        cluster is ok (all slots served); returns the new master."""
        slot = self.slot(slot_or_key)

        def promoted() -> bool:
            views = [self._slot_owners(node) for node in self.nodes if node.alive]
            return all(view.get(slot) not in (None, killed.port) for view in views) and self._ok()
        self._wait(f"a replica of {killed.address} promoted", promoted)
        return self.master_of(slot)

    def restart(self, node: RedisNode) -> None:
        """Start a killed node again from its folder and wait until the cluster is whole."""
        if node.alive:
            raise RedisClusterError(f"{node.address} is running")
        self._spawn(node)
        self.wait_ok()

    # --- state ---------------------------------------------------------------------------

    def slot(self, slot_or_key: int | str) -> int:
        if isinstance(slot_or_key, int):
            return slot_or_key
        return int(self._cli(self._any_alive(), "CLUSTER", "KEYSLOT", slot_or_key))

    def master_of(self, slot: int) -> RedisNode:
        port = self._slot_owners().get(slot)
        for node in self.nodes:
            if node.port == port:
                return node
        raise RedisClusterError(f"no master serves slot {slot}")

    def wait_ok(self) -> None:
        """Wait until every live node reports ``cluster_state:ok`` with all slots, knows every
        node, and every replica's link to its master is up."""
        self._wait("cluster_state:ok on every node", self._ok)

    def _ok(self) -> bool:
        for node in self.nodes:
            if not node.alive:
                continue
            info = self._info(node, "CLUSTER", "INFO")
            if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS)
                    or info.get("cluster_known_nodes") != str(len(self.nodes))):
                return False
            replication = self._info(node, "INFO", "replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        # Every node sees the same master for every slot: a restarted master first claims its old slots
        # from its nodes.conf and answers reads from its own (empty) data until it hears it was
        # replaced -- a test reading then read nothing (tests/test_redis_queues.py, 1 run in 5).
        views = [self._slot_owners(node) for node in self.nodes if node.alive]
        return all(view == views[0] for view in views)

    def _slot_owners(self, node: RedisNode | None = None) -> dict[int, int]:
        """Slot -> port of the master serving it, as ``node`` (any live one) sees it; failed masters left out."""
        owners: dict[int, int] = {}
        for line in self._cli(node or self._any_alive(), "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2].split(",") or "fail" in fields[2].split(","):
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                low, _, high = part.partition("-")
                owners.update(dict.fromkeys(range(int(low), int(high or low) + 1), port))
        return owners

    # --- plumbing ------------------------------------------------------------------------

    def _spawn(self, node: RedisNode) -> None:
        node.process = subprocess.Popen(  # noqa: S603 (fixed program, our config)
            ["redis-server", str(node.folder / "redis.conf")],  # noqa: S607
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=node.folder)

    def _any_alive(self) -> RedisNode:
        for node in self.nodes:
            if node.alive:
                return node
        raise RedisClusterError("no redis node is running")

    def _cli(self, node: RedisNode, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(node.port), *args],  # noqa: S603, S607
                              capture_output=True, text=True, timeout=5, check=False)
        return done.stdout.strip()

    def _answers(self, node: RedisNode) -> bool:
        return self._cli(node, "PING") == "PONG"

    def _info(self, node: RedisNode, *args: str) -> dict[str, str]:
        pairs = (line.split(":", 1) for line in self._cli(node, *args).splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def _wait(self, what: str, done: Callable[[], bool], node: RedisNode | None = None) -> None:
        """Poll ``done`` until it holds; fail at the deadline, or at once if ``node`` exits."""
        deadline = time.monotonic() + self.deadline_s
        while not done():
            if node is not None and not node.alive:
                raise RedisClusterError(f"{node.address} exited: see {node.folder / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RedisClusterError(f"not within {self.deadline_s} s: {what} (logs in {self.root})")
            time.sleep(0.05)
