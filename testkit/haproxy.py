"""HAProxy in front of broker nodes: the one template of ``deploy/haproxy.cfg`` and of the tests' gateway.

``render(Gateway)`` writes the configuration; ``deploy/haproxy.cfg`` is ``render(DEPLOY)``
(``python -m testkit.haproxy > deploy/haproxy.cfg`` writes it again; tests/test_haproxy.py checks
they match and that ``haproxy -c`` accepts it), and ``HAProxy`` renders the same template on free
loopback ports for the tests. What the template decides, and why:
- MQTT (and MQTT over TLS, passed through: the brokers keep their certificates) in TCP mode,
  WebSocket in HTTP mode (HAProxy switches an ``Upgrade: websocket`` request to a tunnel itself);
- ``balance leastconn``: connections live for hours, so new ones go to the node holding fewest;
- every server is checked with ``GET /readyz`` on its metrics port (``check port``): a node whose
  store or listeners fail answers 503 and gets no new connections; ``on-marked-down
  shutdown-sessions`` then closes the ones it holds, so devices reconnect through a live node;
- ``proxy_protocol``: HAProxy opens each TCP connection to a node with a PROXY v2 header naming the
  client (``send-proxy-v2``), so the broker's per-address limits and login throttle see clients, not
  HAProxy (the nodes need ``listeners.tcp/tls.proxy_protocol`` and ``listeners.trusted_proxies``); the
  WebSocket backend names it in X-Forwarded-For (``option forwardfor``; ``listeners.ws.forwarded_for``).
  Health checks go to another port (``check port``), so they carry no header;
- ``timeout client/server`` well above the MQTT keepalive (the SDK's is 60 s, the broker closes
  after 1.5 x keepalive): HAProxy must never be the one to cut an idle but healthy connection.

``HAProxy(root, backends=[(mqtt_port, metrics_port[, ws_port]), ...])``: ``start()`` runs ``haproxy``
in the foreground and returns once it listens; ``port`` and ``ws_port`` are its frontends,
``backend_state()`` reads UP/DOWN of each server from the runtime socket (``show stat``),
``stop()`` ends it. Everything here blocks.
"""

from __future__ import annotations

import csv
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testkit.redis_cluster import free_ports

MISSING = "haproxy not found: run scripts/test, which installs it (or as root: apt-get install haproxy)"


class HAProxyError(RuntimeError):
    """HAProxy could not be started, or did not reach the state waited for in time."""


@dataclass(frozen=True, slots=True)
class Node:
    """One broker node as the gateway sees it."""

    name: str
    host: str
    mqtt_port: int
    metrics_port: int
    ws_port: int | None = None
    tls_port: int | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    nodes: Sequence[Node]
    mqtt_bind: str
    stats_socket: str
    """The runtime API: a unix socket path, or ``ipv4@HOST:PORT``."""
    ws_bind: str | None = None
    tls_bind: str | None = None
    check_inter_ms: int = 1000
    check_fall: int = 2
    check_rise: int = 2
    idle_timeout: str = "15m"
    maxconn: int = 200_000
    service: bool = True
    """Run as Debian's service does (user haproxy, chroot, syslog); off for tests, run as the test user."""
    stats_page: str | None = None
    """``HOST:PORT`` of the stats page (and Prometheus exporter on ``/metrics``), or None."""
    notes: Sequence[str] = field(default=())
    proxy_protocol: bool = False
    """Send a PROXY v2 header on each TCP connection to a node (the nodes must expect it)."""


def _servers(gateway: Gateway, port_of: str, send_proxy: bool = False) -> list[str]:
    lines = []
    proxy = " send-proxy-v2" if send_proxy else ""
    for node in gateway.nodes:
        port = getattr(node, port_of)
        if port is not None:
            lines.append(f"    server {node.name} {node.host}:{port} check port {node.metrics_port}{proxy}")
    return lines


def _health(gateway: Gateway) -> list[str]:
    return [
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {gateway.check_inter_ms}ms fall {gateway.check_fall} rise {gateway.check_rise} "
        "on-marked-down shutdown-sessions",
    ]


def render(gateway: Gateway) -> str:
    """The HAProxy configuration for ``gateway`` (deploy/README.md explains it)."""
    tcplog = ["    option tcplog"] if gateway.service else []
    lines = [f"# {note}" if note else "#" for note in gateway.notes]
    lines += ["global", f"    maxconn {gateway.maxconn}", f"    stats socket {gateway.stats_socket} level admin"]
    if gateway.service:
        lines += ["    log /dev/log local0", "    chroot /var/lib/haproxy", "    user haproxy", "    group haproxy",
                  "    daemon"]
    lines += [
        "",
        "defaults",
        "    log global" if gateway.service else "    no log",
        "    option dontlognull",
        "    timeout connect 5s",
        f"    timeout client {gateway.idle_timeout}    # above 1.5 x the longest MQTT keepalive of your clients",
        f"    timeout server {gateway.idle_timeout}",
        "    timeout tunnel 1h      # WebSocket after the upgrade",
        "    timeout client-fin 30s",
        "    timeout check 2s",
        "",
        "frontend mqtt",
        "    mode tcp",
        *tcplog,
        "    option clitcpka",
        f"    bind {gateway.mqtt_bind}",
        "    default_backend mqtt_nodes",
        "",
        "backend mqtt_nodes",
        "    mode tcp",
        "    option srvtcpka",
        *_health(gateway),
        *_servers(gateway, "mqtt_port", gateway.proxy_protocol),
    ]
    if gateway.tls_bind is not None:
        lines += ["", "frontend mqtt_tls    # passed through: each broker has the certificate (listeners.tls)",
                  "    mode tcp", *tcplog, "    option clitcpka", f"    bind {gateway.tls_bind}",
                  "    default_backend mqtt_tls_nodes",
                  "", "backend mqtt_tls_nodes", "    mode tcp", "    option srvtcpka", *_health(gateway),
                  *_servers(gateway, "tls_port", gateway.proxy_protocol)]
    if gateway.ws_bind is not None:
        lines += ["", "frontend mqtt_ws", "    mode http", *(["    option httplog"] if gateway.service else []),
                  f"    bind {gateway.ws_bind}",
                  "    http-request deny deny_status 404 unless { path /mqtt }", "    default_backend mqtt_ws_nodes",
                  "", "backend mqtt_ws_nodes", "    mode http", "    option forwardfor", *_health(gateway),
                  *_servers(gateway, "ws_port")]
    if gateway.stats_page is not None:
        lines += ["", "frontend stats    # keep private: it shows every node", "    mode http",
                  f"    bind {gateway.stats_page}", "    stats enable", "    stats uri /",
                  "    http-request use-service prometheus-exporter if { path /metrics }"]
    return "\n".join(lines) + "\n"


DEPLOY = Gateway(
    nodes=[Node(f"node{i}", f"10.0.0.{10 + i}", 1883, 9100, ws_port=8080, tls_port=8883) for i in (1, 2, 3)],
    mqtt_bind="*:1883", tls_bind="*:8883", ws_bind="*:8080", stats_socket="/run/haproxy/admin.sock mode 660",
    stats_page="127.0.0.1:8404",
    notes=["HAProxy in front of chat-broker nodes (deploy/README.md). Generated by", "",
           "    python -m testkit.haproxy > deploy/haproxy.cfg", "",
           "from testkit/haproxy.py, the template the tests run HAProxy from: change it there. Put your",
           "nodes' addresses in the server lines; each broker needs metrics.bind on port 9100 (its",
           "/readyz is the health check), listeners.ws.bind on 8080, listeners.tls.bind on 8883, and,",
           "since HAProxy names each client to the nodes (send-proxy-v2, option forwardfor),",
           "listeners.tcp/tls.proxy_protocol, listeners.ws.forwarded_for and listeners.trusted_proxies", ""],
    proxy_protocol=True,
)


Backend = tuple[int, int] | tuple[int, int, int]
"""``(mqtt_port, metrics_port)`` or ``(mqtt_port, metrics_port, ws_port)`` of a node on 127.0.0.1."""


class HAProxy:
    def __init__(self, root: Path, backends: Sequence[Backend], check_inter_ms: int = 500,
                 deadline_s: float = 15.0, proxy_protocol: bool = False) -> None:
        executable = shutil.which("haproxy")
        if executable is None:
            raise HAProxyError(MISSING)
        self.executable = executable
        self.root = root
        self.port, self.ws_port, self.stats_port = free_ports(3)
        nodes = [Node(f"node{i}", "127.0.0.1", backend[0], backend[1], backend[2] if len(backend) > 2 else None)
                 for i, backend in enumerate(backends)]
        self.gateway = Gateway(nodes, f"127.0.0.1:{self.port}", f"ipv4@127.0.0.1:{self.stats_port}",
                               ws_bind=f"127.0.0.1:{self.ws_port}", check_inter_ms=check_inter_ms, check_rise=1,
                               idle_timeout="5m", maxconn=1000, service=False, proxy_protocol=proxy_protocol)
        self.deadline_s = deadline_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "haproxy.cfg"
        config.write_text(render(self.gateway))
        with (self.root / "haproxy.log").open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (fixed program, our config)
                [self.executable, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log)
        self._wait(lambda: _listens(self.stats_port), "listening")  # frontends are bound before the stats socket
        return self

    def backend_state(self, backend: str = "mqtt_nodes") -> dict[str, str]:
        """Server name -> ``UP``, ``DOWN``, ``MAINT``... (the first word of HAProxy's status)."""
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as sock:
            sock.sendall(b"show stat\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        rows = csv.DictReader(reply.decode().lstrip("# ").splitlines())
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_state(self, server: str, state: str, backend: str = "mqtt_nodes") -> float:
        """Wait until ``server`` is ``state``; returns the seconds it took."""
        started = time.monotonic()
        self._wait(lambda: self.backend_state(backend).get(server) == state, f"{server} {state}")
        return time.monotonic() - started

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.deadline_s
        while not done():
            if self.process is not None and self.process.poll() is not None:
                log = (self.root / "haproxy.log").read_text(errors="replace")
                raise HAProxyError(f"haproxy exited with {self.process.returncode}: {log.strip()}")
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy: not {what} within {self.deadline_s:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.stdout.write(render(DEPLOY))
