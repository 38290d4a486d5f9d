"""lts-server: the daemon's command line and its life under systemd."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import signal
import sys

import lts_server
from lts_server import config as config_mod
from lts_server import backup, front, identity, licensefile, logs, migrate
from lts_server.cli import workers
from lts_server.sdnotify import Notifier, watchdog
from lts_server.server import Server, open_store
from lts_server.store import StoreError
from lts_server.store.postgres import PostgresStore

EXIT_CONFIG = 2
EXIT_START = 1
MAX_OPEN_FILES = 1 << 20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lts-server", description="The lts-server license tracking daemon.")
    p.add_argument("--config", default=str(config_mod.DEFAULT_PATH), help="TOML config file (default: %(default)s)")
    p.add_argument("--print-uuid", action="store_true", help="print this server's UUID (creating it if needed) and exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"lts-server {lts_server.__version__}")
    p.add_argument("command", nargs="?", choices=["migrate", "backup"],
                   help="migrate: move this SQLite deployment into an empty PostgreSQL database (with --to); "
                        "backup: copy the database and the identity files, owner-only, into the folder --to DIR")
    p.add_argument("--to", metavar="URL|DIR", help="with migrate: postgresql://user@host:port/dbname; "
                                                   "with backup: the folder to write")
    p.add_argument("--force", action="store_true",
                   help="with migrate: replace what the target database holds (refused otherwise)")
    # One of server.workers processes, started by the supervisor.
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    # The writer behind the front processes of server.workers > 1 on SQLite, started by the supervisor.
    p.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    return p


def config_warnings(cfg: config_mod.Config) -> list[str]:
    """What is valid but will not work as the operator probably expects."""
    warnings = []
    if not cfg.vendor.public_keys:
        warnings.append("key 'vendor.public_keys' is empty: no vendor key is trusted, so every license file will be "
                        "rejected; name your vendor's public key file")
    directory = cfg.import_dir
    if not directory.is_dir():
        parent = next((p for p in directory.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            warnings.append(f"key 'import.directory': {directory} does not exist and cannot be created by this user; "
                            "create it (writable by the service user)")
        else:
            warnings.append(f"key 'import.directory': {directory} does not exist yet; the daemon creates it at start")
    return warnings


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"lts-server: config error: {e}", file=sys.stderr)
        if args.config == str(config_mod.DEFAULT_PATH) and not config_mod.DEFAULT_PATH.exists():
            print(f"lts-server: give the config file with --config PATH (the default {config_mod.DEFAULT_PATH} does "
                  "not exist): e.g. --config config/demo.toml in a checkout, or install config/lts-server.toml "
                  f"as {config_mod.DEFAULT_PATH} (see the README, 'Install as a service')", file=sys.stderr)
        return EXIT_CONFIG
    for i, path in enumerate(cfg.public_key_paths):
        try:
            licensefile.load_public_key(path)
        except (OSError, ValueError) as e:
            print(f"lts-server: config error: {args.config}: key 'vendor.public_keys[{i}]': expected an Ed25519 "
                  f"public key in PEM form: {e}", file=sys.stderr)
            return EXIT_CONFIG
    if args.check_config:
        warnings = config_warnings(cfg)
        for warning in warnings:
            print(f"lts-server: warning: {args.config}: {warning}", file=sys.stderr)
        print(f"{args.config}: ok" + (f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})"
                                      if warnings else ""))
        return 0
    if args.command == "migrate":
        return migrate.main(cfg, args.to, args.force)
    if args.command == "backup":
        return backup.main(cfg, args.to)
    if args.print_uuid:
        try:
            print(asyncio.run(_server_uuid(cfg)))
        except OSError as e:
            print(f"lts-server: cannot use state folder {cfg.state_dir}: {e.strerror}", file=sys.stderr)
            return EXIT_START
        except StoreError as e:
            print(f"lts-server: {e}", file=sys.stderr)
            return EXIT_START
        return 0
    logs.setup(cfg.log.level, cfg.log.format)
    raise_open_files_limit()
    if cfg.server.workers > 1 and not args.worker and not args.writer:
        return asyncio.run(workers.supervise(args.config, cfg))
    if args.worker and cfg.storage.backend == "sqlite":
        return asyncio.run(front.run(cfg, args.worker))
    return asyncio.run(run(cfg, args.worker, fronted=args.writer))


def raise_open_files_limit() -> None:
    """Use the hard limit on open files, not the soft one (often 1024): each connection takes one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            logs.event("server.open_files_limit", logs.logging.WARNING, soft=soft, hard=hard, error=str(e))


async def _server_uuid(cfg: config_mod.Config) -> str:
    """This server's UUID; a PostgreSQL cluster's lives in its database."""
    store = open_store(cfg)
    if not isinstance(store, PostgresStore):
        return identity.load_or_create(cfg.state_dir).server_uuid
    await store.open()
    try:
        return (await identity.for_cluster(store, cfg.state_dir)).server_uuid
    finally:
        await store.close()


async def run(cfg: config_mod.Config, worker: int = 0, fronted: bool = False) -> int:
    notifier = Notifier()
    server = Server(cfg, worker=worker, fronted=fronted)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    # Handlers first: a SIGTERM that arrives while the server starts (it listens before it is
    # done) stops it cleanly once started, instead of killing it.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await server.start()
    except (StoreError, OSError, ValueError) as e:
        logs.event("server.start_failed", logs.logging.ERROR, error=str(e))
        print(f"lts-server: cannot start: {e}", file=sys.stderr)
        await server.stop()
        return EXIT_START
    except Exception as e:  # a bug: the log gets the traceback, the operator one line
        logs.log.exception("server.start_failed")
        print(f"lts-server: cannot start: internal error {type(e).__name__}: {e} (see the log)", file=sys.stderr)
        await server.stop()
        return EXIT_START
    admin = f" (admin API on {server.admin_url})" if server.admin_url not in server.urls else ""
    # The loaded licensing state lives as long as the process: keep the cyclic
    # GC from rescanning it, and collect young objects less often, which cuts
    # the long pauses that show up as tail latency on handshakes.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    print(f"lts-server {lts_server.__version__} listening on {', '.join(server.urls)}{admin}", flush=True)
    notifier.notify("READY=1", f"STATUS=listening on {', '.join(server.urls)}")

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        notifier.notify("RELOADING=1")
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(lambda t: (reloads.discard(t), notifier.notify("READY=1")))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    pinger = loop.create_task(watchdog(notifier, stop)) if notifier.watchdog_interval else None

    await stop.wait()
    logs.event("server.stopping")
    notifier.notify("STOPPING=1")
    if pinger:
        pinger.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    await server.stop()
    return 0


