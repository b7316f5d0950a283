"""The `taskorch` command: serve, migrate, and the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from api import __version__
from api.cli.keys import add_keys_commands
from api.ops import logs
from api.settings import MCP_PROFILES, Settings, SettingsError, parse_duration
from api.store import open_store

Command = Callable[[argparse.Namespace, Settings], int]

log = logging.getLogger("taskorch.serve")


@functools.cache
def endpoints(settings: Settings) -> dict[str, str]:
    """Where each interface of a server started with `settings` answers."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{settings.port}"
    graphql = "GraphQL and GraphiQL" if settings.graphiql else "GraphQL"
    return {
        graphql: f"{base}/graphql",
        "MCP": f"{base}/mcp",
        "REST": f"{base}/api/v1 (OpenAPI: {base}/api/v1/openapi.json)",
        "health": f"{base}/health",
        "metrics": f"{base}/metrics",
    }


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        dest="database_url",
        help="database URL (default sqlite:///./taskorch.db; env TASKORCH_DATABASE_URL)",
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1 and not args.reuse_port:
        from api.ops.workers import supervise

        # once, before the workers open the database together
        log.info("database is at schema version %d", asyncio.run(_migrate(settings)))
        return supervise(settings, settings.workers)

    import uvicorn

    from api.app import create_app
    from api.ops.shutdown import serve
    from api.ops.workers import reuse_port_socket, stop_when_orphaned

    # A worker of `serve --workers` binds its own socket beside its siblings' (SO_REUSEPORT).
    sockets = None
    if args.reuse_port:
        sockets = [reuse_port_socket(settings.host, settings.port)]
        stop_when_orphaned()
    app = create_app(settings)
    urls = endpoints(settings)
    log.info("endpoints: %s", "; ".join(f"{name} {url}" for name, url in urls.items()))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="asyncio",  # measured: far lower tail latency under overload than uvloop here
        log_config=None,  # logging is configured above, one JSON line per record
        log_level=settings.log_level.lower(),
        access_log=False,  # api.ops.logs.AccessLog writes the access line, with the request id
        timeout_graceful_shutdown=settings.shutdown_timeout,
        ws_max_size=settings.max_body_bytes,  # one WebSocket message is bounded like a body
        # Events are a few hundred bytes: compressing each one for each socket took a quarter of
        # the CPU of a fan-out, and every socket's deflate state about 45 KB of memory.
        ws_per_message_deflate=False,
    )
    serve(app, config, sockets)
    return 0


async def _migrate(settings: Settings) -> int:
    store = open_store(settings)
    await store.open()  # opening brings the schema up to date
    try:
        return await store.schema_version()
    finally:
        await store.close()


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    version = asyncio.run(_migrate(settings))
    print(f"database is at schema version {version}")
    return 0


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from api.ops.backup import BackupError, backup

    try:
        summary = backup(settings.database_url, Path(args.path))
    except BackupError as exc:
        print(f"taskorch: {exc}", file=sys.stderr)
        return 1
    print(
        f"backed up {summary.tasks} task(s), {summary.events} history row(s), schema version"
        f" {summary.schema_version}, to {summary.path} ({summary.size_bytes} bytes)"
    )
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from api.ops.backup import BackupError, restore

    try:
        summary = restore(Path(args.path), settings.database_url)
    except BackupError as exc:
        print(f"taskorch: {exc}; nothing was changed", file=sys.stderr)
        return 1
    print(
        f"restored {summary.tasks} task(s), {summary.events} history row(s), schema version"
        f" {summary.schema_version}, into {summary.path}"
    )
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from api.runtime import runtime

    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        print(f"taskorch: invalid --older-than: {exc}", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("taskorch: invalid --batch: use a whole number of tasks, 1 or more", file=sys.stderr)
        return 2

    async def prune() -> int:
        async with runtime(settings, serving=False) as running:
            return await running.service.prune(older_than, batch=args.batch)

    deleted = asyncio.run(prune())
    print(f"deleted {deleted} finished task(s) older than {args.older_than}, with their history")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from api.cli.demo import run_demo

    started = time.monotonic()
    try:
        report = asyncio.run(
            run_demo(
                settings.database_url,
                args.tasks,
                days=args.days,
                seed=args.seed,
                progress=lambda line: print(line, flush=True),
            )
        )
    except ValueError as exc:
        print(f"taskorch: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s.lower()}" for s, n in report.counts.items() if n)
    print(
        f"simulated {report.tasks:,} tasks from {report.start:%Y-%m-%d %H:%M} to"
        f" {report.end:%Y-%m-%d %H:%M} UTC in {time.monotonic() - started:.1f} s: {counts}"
    )
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    try:  # the analytics extra is optional: the server runs without pandas and pyarrow
        from analytics.export import export
        from analytics.sources import SourceError
    except ImportError as exc:
        print(f"taskorch export needs the analytics extra ({exc}): pip install 'taskorch[analytics]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        done = export(settings.database_url, args.output, args.format, args.since, args.until)
    except SourceError as exc:
        print(f"taskorch export: {exc}", file=sys.stderr)
        return 2
    tasks_file, events_file = done.files
    print(
        f"wrote {done.tasks:,} task(s) to {tasks_file} and {done.events:,} event(s) to {events_file}"
    )
    return 0


def cmd_mcp(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)  # stderr: stdout carries the protocol
    asyncio.run(serve_mcp_stdio(settings))
    return 0


async def serve_mcp_stdio(settings: Settings) -> None:
    """Serve the MCP tools over stdin/stdout on a runtime of our own, as `taskorch serve` would."""
    from api.interfaces.mcp import build_mcp
    from api.runtime import runtime

    async with runtime(settings) as running:
        await build_mcp(lambda: running.service, settings.mcp_tools).run_stdio_async()


def cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    from api.worker import command_from_args, run_worker

    config = command_from_args(args)
    if isinstance(config, str):
        print(f"taskorch work: {config}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, "text")
    return run_worker(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskorch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"taskorch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--durability", choices=["full", "normal"], help="SQLite durability")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (default 1; env TASKORCH_WORKERS)",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--mcp-tools",
        choices=MCP_PROFILES,
        help="the tool profile /mcp serves (default all; env TASKORCH_MCP_TOOLS);"
        " /mcp/<profile> serves each",
    )
    _database_flag(serve)
    serve.set_defaults(run=cmd_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    _database_flag(migrate)
    migrate.set_defaults(run=cmd_migrate)
    add_keys_commands(commands, _database_flag)

    backup = commands.add_parser(
        "backup", help="copy a live SQLite database to PATH (PostgreSQL: use pg_dump)"
    )
    _database_flag(backup)
    backup.add_argument("path", help="file to write the backup to")
    backup.set_defaults(run=cmd_backup)

    restore = commands.add_parser(
        "restore", help="replace the SQLite database with a checked backup (server stopped)"
    )
    restore.add_argument("path", help="backup file written by taskorch backup")
    _database_flag(restore)
    restore.set_defaults(run=cmd_restore)

    prune = commands.add_parser("prune", help="delete finished tasks older than a duration")
    prune.add_argument(
        "--older-than", required=True, help="a duration: 30d, 12h, 90m (finished before now - it)"
    )
    prune.add_argument(
        "--batch", type=int, default=500, help="tasks deleted per transaction (default 500)"
    )
    _database_flag(prune)
    prune.set_defaults(run=cmd_prune)

    demo = commands.add_parser(
        "demo", help="fill an empty database with a simulated workload, for the analytics"
    )
    _database_flag(demo)
    demo.add_argument("--tasks", type=int, default=10_000, help="tasks to simulate (default 10000)")
    demo.add_argument(
        "--days", type=float, default=7.0, help="days of history, ending now (default 7)"
    )
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    demo.set_defaults(run=cmd_demo)

    export = commands.add_parser(
        "export", help="write tasks and their history as Parquet or CSV files, for analysis"
    )
    _database_flag(export)
    export.add_argument("--output", required=True, help="directory for tasks.* and events.*")
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    export.add_argument("--since", help="only tasks not finished before this time (ISO 8601)")
    export.add_argument("--until", help="only tasks created, and events, before this time")
    export.set_defaults(run=cmd_export)

    mcp = commands.add_parser("mcp", help="serve the MCP tools over stdio, for a local agent")
    _database_flag(mcp)
    mcp.add_argument(
        "--tools",
        dest="mcp_tools",
        choices=MCP_PROFILES,
        help="which tools to serve (default all; env TASKORCH_MCP_TOOLS)",
    )
    mcp.set_defaults(run=cmd_mcp)

    from api.worker import add_arguments as add_work_arguments

    work = commands.add_parser(
        "work",
        help="claim tasks and run a command for each: taskorch work ... -- COMMAND [ARGS...]",
    )
    add_work_arguments(work)
    work.set_defaults(run=cmd_work)
    return parser


SETTING_FLAGS = ("database_url", "host", "port", "durability", "log_level", "workers", "mcp_tools")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key, None) for key in SETTING_FLAGS}
    try:
        settings = Settings.load(**overrides)
    except SettingsError as exc:
        print(f"taskorch: {exc}", file=sys.stderr)
        return 2
    run: Command = args.run
    return run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
