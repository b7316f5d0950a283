"""PostgreSQL for tests: a fresh schema per test, reached through a URL that selects it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg


def with_search_path(base_url: str, schema: str) -> str:
    """`base_url` with `options=-csearch_path=<schema>`: libpq's form, which asyncpg passes on as
    a startup option, so every connection (pools, listeners, server processes) lands in it."""
    parts = urlsplit(base_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _admin(base_url: str, statement: str) -> None:
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _run(coro: object) -> None:
    # Fixtures may be entered from inside a running event loop (async tests), so use a thread.
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def fresh_schema_url(base_url: str) -> Iterator[str]:
    """Create a uniquely named schema, yield a URL whose connections use it, then drop it."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    _run(_admin(base_url, f"CREATE SCHEMA {schema}"))
    try:
        yield with_search_path(base_url, schema)
    finally:
        _run(_admin(base_url, f"DROP SCHEMA {schema} CASCADE"))
