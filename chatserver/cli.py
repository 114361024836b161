"""``chat-broker``: run the broker, manage users. Errors are one line, exit non-zero."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import logging.handlers
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:
    from bridge.store import StoreError
    from broker.front import ListenerError
    from broker.logs import setup_logging
    from chatserver import open_files, user_admin
    from chatserver.binds import parse_bind
    from chatserver.config import ConfigError, Settings, load_settings, parse_redis_nodes, resolve_node_id
    from chatserver.gc_policy import GcTuner
    from chatserver.status import DEFAULT_URL, StatusError
    from chatserver.workers import Workers, check_workers, reserve_port, worker_overrides
except ModuleNotFoundError as exc:
    # `pip install chat-broker` without the extra is the SDK alone: the server's code is there,
    # its dependencies are not. Say so in one line; a missing module of ours is a bug: re-raise.
    if exc.name is None or importlib.util.find_spec(exc.name.partition(".")[0]) is not None:
        raise
    raise SystemExit(f"chat-broker: the server needs its dependencies ({exc.name} is missing): "
                     "pip install 'chat-broker[server]'") from None

log = logging.getLogger("chat-broker")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="YAML config file (default: embedded defaults)")
    parser.add_argument("--data-dir", help="directory of the databases (overrides data_dir)")


def _accounts(parser: argparse.ArgumentParser) -> None:
    """The user and device commands: the data folder's users database, or a cluster's (as ``run`` picks)."""
    _common(parser)
    parser.add_argument("--cluster", metavar="redis://HOST:PORT[,HOST:PORT...]",
                        help="cluster mode: the users in this Redis Cluster (overrides cluster.redis)")
    parser.add_argument("--key-prefix", help="the deployment's key prefix (overrides cluster.key_prefix)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-broker", description="Self-hosted chat broker (MQTT).")
    version = importlib.metadata.version("chat-broker")
    parser.add_argument("--version", action="version", version=f"chat-broker {version}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the broker")
    _common(run)
    run.add_argument("--bind", metavar="HOST:PORT", help="plain MQTT listener (overrides listeners.tcp.bind)")
    run.add_argument("--metrics-bind", metavar="HOST:PORT",
                     help="HTTP listener for /metrics, /healthz, /readyz (overrides metrics.bind)")
    run.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON (overrides log.format)")
    run.add_argument("--cluster", metavar="redis://HOST:PORT[,HOST:PORT...]",
                     help="cluster mode: the stores in this Redis Cluster (overrides cluster.redis)")
    run.add_argument("--node-id", metavar="NAME", help="this node's name in the cluster (overrides cluster.node_id)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="run N broker processes sharing the listeners (cluster mode only; default 1)")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers for each worker

    status = commands.add_parser("status", help="show the running broker's figures (from its metrics endpoint)")
    status.add_argument("-c", "--config", type=Path, help="YAML config file: its metrics.bind gives the URL")
    status.add_argument("--url", help=f"metrics URL (default: from --config, else {DEFAULT_URL})")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    status.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")

    cluster = commands.add_parser("cluster", help="cluster mode: see the nodes and the Redis Cluster")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    cluster_status = cluster_commands.add_parser(
        "status", help="live broker nodes (connections, lease) and Redis masters and replicas (slots)")
    cluster_status.add_argument("-c", "--config", type=Path, help="YAML config file: its cluster: section")
    cluster_status.add_argument("--cluster", metavar="redis://HOST:PORT[,HOST:PORT...]",
                                help="the Redis Cluster (overrides cluster.redis)")
    cluster_status.add_argument("--key-prefix", help="the deployment's key prefix (overrides cluster.key_prefix)")
    cluster_status.add_argument("--json", action="store_true", help="one JSON object instead of tables")

    user = commands.add_parser("user", help="manage users")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    for action, text in (("add", "create a user"), ("passwd", "change a password (revokes device tokens)")):
        sub = user_commands.add_parser(action, help=text)
        _accounts(sub)
        sub.add_argument("name")
        sub.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    delete = user_commands.add_parser("del", help="delete a user and their devices")
    _accounts(delete)
    delete.add_argument("name")
    listing = user_commands.add_parser("list", help="list users")
    _accounts(listing)
    imp = user_commands.add_parser("import", help="create users from name:password lines ('-' = stdin)")
    _accounts(imp)
    imp.add_argument("file")
    revoke = user_commands.add_parser("revoke", help="revoke device tokens of a user")
    _accounts(revoke)
    revoke.add_argument("name")
    revoke.add_argument("--device", help="only this device (default: all)")
    _add_device_commands(commands)
    _add_migrate_command(commands)
    return parser


def _add_device_commands(commands: Any) -> None:
    device = commands.add_parser("device", help="see and remove a user's devices")
    device_commands = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    listing = device_commands.add_parser("list", help="list a user's devices")
    _accounts(listing)
    listing.add_argument("name")
    remove = device_commands.add_parser("remove", help="remove one device of a user, or all of them")
    _accounts(remove)
    remove.add_argument("name")
    remove.add_argument("device", nargs="?", help="the device id (default: every device of the user)")


# --- chat-broker migrate (chatserver/migrate.py) ---------------------------------------------------


def _add_migrate_command(commands: Any) -> None:
    migrate = commands.add_parser("migrate", help="move a stopped SQLite broker's data folder into a Redis Cluster")
    _common(migrate)
    migrate.add_argument("--cluster", required=True, metavar="redis://HOST:PORT[,...]",
                         help="the Redis Cluster (any of its nodes)")
    migrate.add_argument("--key-prefix", default="", help="prefix of every key (as the cluster brokers will use)")
    migrate.add_argument("--dry-run", action="store_true", help="read and count only; write nothing to the cluster")


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from chatserver import migrate  # noqa: PLC0415 (only this command needs redis)

    report = asyncio.run(migrate.migrate(settings.data_path, migrate.parse_cluster(args.cluster), args.key_prefix,
                                         dry_run=args.dry_run, say=lambda line: print(line, flush=True)))
    if report.problems:
        print(f"chat-broker: error: {len(report.problems)} problem(s), listed above: fix them and run migrate again "
              "(what was moved stays, nothing is moved twice)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# -----------------------------------------------------------------------------------------------------


FLAGS = {"metrics.bind": "--metrics-bind", "log.format": "--log-format", "log.json_lines": "--log-format",
         "data_dir": "--data-dir", "listeners.tcp.bind": "--bind", "cluster.redis": "--cluster",
         "cluster.node_id": "--node-id", "listeners.reuse_port": "--worker-index",
         "cluster.key_prefix": "--key-prefix"}
"""Setting -> the flag that overrides it (named in a config error about its value)."""


WORKER_INDEX = "--worker-index is given by chat-broker run --workers to its workers (cluster mode), not by hand"


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "metrics_bind", None) is not None:
        overrides["metrics.bind"] = args.metrics_bind
    if getattr(args, "log_format", None) is not None:
        overrides["log.format"] = args.log_format
        overrides["log.json_lines"] = False  # the flag wins over the deprecated key
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "bind", None) is not None:
        overrides["listeners.tcp.bind"] = args.bind
    if getattr(args, "key_prefix", None) is not None:
        overrides["cluster.key_prefix"] = args.key_prefix
    if getattr(args, "cluster", None) is not None:
        try:
            overrides["cluster.redis"] = parse_redis_nodes(args.cluster)
        except ValueError as exc:
            raise ConfigError(f"--cluster: {exc}") from None
    settings = load_settings(args.config, overrides, FLAGS)
    if args.command != "run" or settings.cluster is None:
        if getattr(args, "node_id", None) is not None:
            raise ConfigError("--node-id is for cluster mode: "
                              "give --cluster redis://HOST:PORT too (or a cluster: section)")
        if getattr(args, "worker_index", None) is not None:
            raise ConfigError(WORKER_INDEX)
        return settings
    # Cluster mode: the node is named once here, so each --workers worker derives its name from the same one.
    overrides["cluster.node_id"] = args.node_id or resolve_node_id(
        settings.cluster, settings.listeners.tcp.bind, socket.gethostname(), secrets.token_hex(3))
    if args.worker_index is not None:
        settings = load_settings(args.config, overrides, FLAGS)
        overrides.update(worker_overrides(settings, args.worker_index))
    return load_settings(args.config, overrides, FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "run":
            check_workers(settings, args.workers)
            return _run(settings) if args.workers == 1 else _run_workers(args, settings)
        if args.command == "status":
            return _status(args, settings)
        if args.command == "cluster":
            return _cluster(args, settings)
        if args.command == "device":
            return _device(args, settings)
        if args.command == "migrate":
            return _migrate(args, settings)
        return _user(args, settings)
    except (ConfigError, ListenerError, StoreError, user_admin.AdminError, StatusError) as exc:
        print(f"chat-broker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _opener(settings: Settings) -> user_admin.Opener:
    if settings.cluster is None:
        return user_admin.sqlite_opener(settings.data_path)
    from chatserver import cluster_admin  # noqa: PLC0415 (redis-py only in cluster mode)

    return cluster_admin.opener(settings.cluster, lambda line: print(line, file=sys.stderr))


def _user(args: argparse.Namespace, settings: Settings) -> int:
    accounts = _opener(settings)
    action = args.user_command
    if action == "add":
        name = user_admin.check_name(args.name)
        asyncio.run(user_admin.add(accounts, name, user_admin.read_password(args.password_stdin)))
        print(f"user {name} added")
    elif action == "passwd":
        asyncio.run(user_admin.passwd(accounts, args.name, user_admin.read_password(args.password_stdin)))
        print(f"password of {args.name} changed; its device tokens are revoked")
    elif action == "del":
        asyncio.run(user_admin.delete(accounts, args.name))
        print(f"user {args.name} deleted")
    elif action == "list":
        asyncio.run(user_admin.list_users(accounts, sys.stdout))
    elif action == "revoke":
        count = asyncio.run(user_admin.revoke(accounts, args.name, args.device))
        print(f"{count} device token(s) of {args.name} revoked")
    elif action == "import":
        return _import(args.file, accounts)
    return EXIT_OK


def _device(args: argparse.Namespace, settings: Settings) -> int:
    name = user_admin.check_name(args.name)
    accounts = _opener(settings)
    if args.device_command == "list":
        count = asyncio.run(user_admin.list_devices(accounts, name, sys.stdout))
        print(f"{count} device(s) of {name}", file=sys.stderr)
    else:
        removed = asyncio.run(user_admin.remove_devices(accounts, name, args.device))
        print(f"{len(removed)} device(s) of {name} removed: {', '.join(removed) or '-'}")
    return EXIT_OK


def _import(file: str, accounts: user_admin.Opener) -> int:
    try:
        source = sys.stdin if file == "-" else open(file, encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise user_admin.AdminError(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        report = asyncio.run(user_admin.import_users(accounts, source, show_progress=sys.stderr.isatty()))
    except UnicodeDecodeError as exc:
        # Was a traceback: a file in another encoding is an operator error, said in one line.
        raise user_admin.AdminError(f"{file}: not UTF-8 text ({exc.reason})") from None
    finally:
        if source is not sys.stdin:
            source.close()
    for problem in report.bad_lines:
        print(f"skipped {problem}", file=sys.stderr)
    if report.existing:
        print(f"skipped {len(report.existing)} existing user(s): {', '.join(report.existing[:10])}"
              + (" ..." if len(report.existing) > 10 else ""), file=sys.stderr)
    print(f"{report.added} user(s) imported")
    return EXIT_FAILURE if report.bad_lines else EXIT_OK


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console  # noqa: PLC0415 (only this command needs it)

    from chatserver import status  # noqa: PLC0415

    url = args.url or status.url_from_settings(settings)
    if args.interval <= 0:
        raise ConfigError("--interval must be positive")
    status.show(url, args.watch, args.interval, Console(), args.count)
    return EXIT_OK


def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console  # noqa: PLC0415 (only this command needs it)

    from chatserver import cluster_status  # noqa: PLC0415

    if settings.cluster is None:
        raise ConfigError("cluster status: give --cluster redis://HOST:PORT, "
                          "or -c with a config that has a cluster: section")
    view = asyncio.run(cluster_status.gather(settings.cluster))
    if args.json:
        print(json.dumps(cluster_status.as_json(view)))
    else:
        Console().print(cluster_status.render(view, ",".join(settings.cluster.redis)))
    return EXIT_OK


def _run(settings: Settings) -> int:
    setup_logging(settings.log.level, settings.log.effective_format)
    try:
        import uvloop  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return asyncio.run(_serve(settings))
    return uvloop.run(_serve(settings))


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    """The parent of ``--workers N`` (chatserver/workers.py); ``settings`` passed ``check_workers``."""
    setup_logging(settings.log.level, settings.log.effective_format)
    assert settings.cluster is not None and settings.cluster.node_id is not None
    tcp_bind, held = settings.listeners.tcp.bind, None
    if tcp_bind is not None:
        host, port = parse_bind(tcp_bind)
        if port == 0:
            try:
                held, port = reserve_port(host)
            except OSError as exc:
                raise ListenerError(f"listeners.tcp.bind: cannot listen on {tcp_bind}: {exc.strerror or exc}") from None
            tcp_bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = [sys.executable, "-m", "chatserver", "run"]
    for flag, value in (("-c", args.config), ("--data-dir", args.data_dir), ("--bind", tcp_bind),
                        ("--metrics-bind", args.metrics_bind), ("--log-format", args.log_format),
                        ("--cluster", args.cluster), ("--node-id", settings.cluster.node_id)):
        if value is not None:
            base += [flag, str(value)]
    workers = Workers(args.workers, lambda index: [*base, "--worker-index", str(index)],
                      extra_ready=f" node={settings.cluster.node_id}")
    try:
        return asyncio.run(workers.run())
    finally:
        if held is not None:
            held.close()


@contextlib.asynccontextmanager
async def _startup_logs_held() -> AsyncIterator[None]:
    """Hold log records until start-up succeeds, so a bad config ends in ONE stderr line.

    Without this, "listening: tcp ..." and migration lines were printed before
    the error of a later listener (tests/test_cli.py). On an error the CLI
    reports (config, listener, store) the held records are dropped: the error
    line says what failed. On any other error they are written out, as usual.
    """
    root = logging.getLogger()
    handlers = root.handlers[:]
    held = logging.handlers.BufferingHandler(capacity=1_000_000)
    root.handlers[:] = [held]
    replay = True
    try:
        yield
    except (ConfigError, ListenerError, StoreError):
        replay = False
        raise
    finally:
        root.handlers[:] = handlers
        if replay:
            for record in held.buffer:
                for handler in handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)
        held.close()


async def _serve(settings: Settings) -> int:
    from chatserver.app import BrokerApp  # noqa: PLC0415 (imported here: amqtt is slow to import, user commands don't need it)

    app = BrokerApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with _startup_logs_held():
        lst = settings.listeners
        open_files.raise_limit([conf.max_connections for conf in (lst.tcp, lst.tls, lst.ws, lst.wss)
                                if conf.bind is not None])
        await app.start()
    tuner = GcTuner(settings.gc.check_s) if settings.gc.freeze else None
    if tuner is not None:
        tuner.start(app.supervisor)  # after start-up: users, staged items and listeners are long-lived
    where = " ".join(f"{name}={host}:{port}" for name, (host, port) in app.addresses().items())
    node = f" node={settings.cluster.node_id}" if settings.cluster is not None else ""
    print(f"chat-broker ready: {where}{node} data_dir={settings.data_path.resolve()}", flush=True)
    try:
        await stop.wait()
        log.info("shutting down: no new connections, closing sessions")
    finally:
        if tuner is not None:
            await tuner.stop()
        with contextlib.suppress(Exception):
            await app.stop()
    log.info("stopped")
    return EXIT_OK
