"""The `taskorch` command: serve, migrate, and the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from api import __version__
from api.settings import Settings, SettingsError
from api.store import open_store

Command = Callable[[argparse.Namespace, Settings], int]


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        dest="database_url",
        help="database URL (default sqlite:///./taskorch.db; env TASKORCH_DATABASE_URL)",
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="asyncio",  # measured: far lower tail latency under overload than uvloop here
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    async def migrate() -> int:
        store = open_store(settings)
        await store.open()  # opening brings the schema up to date
        try:
            return await store.schema_version()
        finally:
            await store.close()

    version = asyncio.run(migrate())
    print(f"database is at schema version {version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskorch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"taskorch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--durability", choices=["full", "normal"], help="SQLite durability")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    _database_flag(serve)
    serve.set_defaults(run=cmd_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    _database_flag(migrate)
    migrate.set_defaults(run=cmd_migrate)
    return parser


SETTING_FLAGS = ("database_url", "host", "port", "durability", "log_level")


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
