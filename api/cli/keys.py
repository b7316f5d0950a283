"""`taskorch keys create|list|revoke`: manage API keys; works while the server runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from api.core.domain import ApiKey
from api.core.errors import TaskorchError, ValidationError
from api.security.keys import SCOPES, check_rate_limit, issue_key, parse_scopes, revoke_key
from api.settings import Settings
from api.store import open_store
from api.store.base import TaskStore

T = TypeVar("T")


def _with_store(settings: Settings, work: Callable[[TaskStore], Awaitable[T]]) -> T:
    async def run() -> T:
        store = open_store(settings)
        await store.open()  # opening brings an older or fresh database up to date
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        scopes = parse_scopes(args.scopes, "--scopes")
        rate_limit = check_rate_limit(args.rate_limit, "--rate-limit")
    except ValidationError as exc:
        print(f"taskorch: {exc.message}", file=sys.stderr)
        return 2
    try:
        key, raw = _with_store(
            settings,
            lambda store: issue_key(store.keys, args.name, scopes, datetime.now(UTC), rate_limit),
        )
    except TaskorchError as exc:
        print(f"taskorch: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ValidationError) else 1
    print(raw)  # the only time the raw key is ever shown; stdout holds it alone
    print(
        f"created key {key.name!r} with scopes {','.join(key.scopes)},"
        f" rate limit {_limit(key.rate_limit)}",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    keys = _with_store(settings, lambda store: store.keys.list_keys())
    rows = [("NAME", "SCOPES", "RATE LIMIT", "CREATED", "LAST USED", "REVOKED")]
    rows += [_row(key) for key in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    try:
        key = _with_store(
            settings, lambda store: revoke_key(store.keys, args.name, datetime.now(UTC))
        )
    except TaskorchError as exc:
        print(f"taskorch: {exc.message}", file=sys.stderr)
        return 1
    print(f"revoked key {key.name!r}; servers refuse it from their next request on")
    return 0


def _row(key: ApiKey) -> tuple[str, str, str, str, str, str]:
    return (key.name, ",".join(key.scopes), _limit(key.rate_limit), _when(key.created_at),
            _when(key.last_used_at), _when(key.revoked_at))  # fmt: skip


def _limit(per_minute: int | None) -> str:
    if per_minute is None:
        return "default"
    return "none" if per_minute == 0 else f"{per_minute}/min"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_keys_commands(
    commands: Any, database_flag: Callable[[argparse.ArgumentParser], None]
) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--name", required=True, help="a unique name for the key, e.g. ci-worker")
    create.add_argument(
        "--scopes", required=True, help=f"comma-separated, from: {', '.join(SCOPES)}"
    )
    create.add_argument(
        "--rate-limit",
        type=int,
        metavar="N",
        help="this key's requests a minute (0: no limit); default: the server's TASKORCH_RATE_LIMIT",
    )
    database_flag(create)
    create.set_defaults(run=cmd_create)

    listing = actions.add_parser(
        "list", help="every key: name, scopes, rate limit, created, last used, revoked"
    )
    database_flag(listing)
    listing.set_defaults(run=cmd_list)

    revoke = actions.add_parser("revoke", help="revoke the active key of this name at once")
    revoke.add_argument("name", help="the key's name")
    database_flag(revoke)
    revoke.set_defaults(run=cmd_revoke)
