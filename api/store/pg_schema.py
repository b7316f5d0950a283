"""PostgreSQL schema upgrades, under an advisory lock so replicas starting together are safe."""

from __future__ import annotations

import asyncpg

from api.store.base import SCHEMA_VERSION
from api.store.migrations import POSTGRES_MIGRATIONS

# Advisory lock classes (first key); the second key is a hash of the schema, so databases that
# hold several taskorch schemas (one per test run, say) do not serialise on each other.
MIGRATION_LOCK = 0x7A5C0001
HISTORY_LOCK = 0x7A5C0002


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema on this connection's search_path up to date; returns its lock key."""
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        path = await conn.fetchval("SHOW search_path")
        raise RuntimeError(
            f"no schema of the search_path ({path}) exists in this database:"
            " create it, or fix the search_path given in the database URL"
        )
    key = int(await conn.fetchval("SELECT hashtext($1)", schema))
    async with conn.transaction():
        # Transaction-scoped: released by the commit that makes the new schema visible.
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", MIGRATION_LOCK, key)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {current}, newer than this taskorch"
                f" ({SCHEMA_VERSION}); upgrade taskorch"
            )
        for version, script in enumerate(POSTGRES_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in script:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())", version
            )
    return key
