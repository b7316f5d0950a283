"""What only PostgreSQL does: schema upgrades under an advisory lock, so replicas starting together
are safe, and history rows written under a global lock, so their ids commit in id order."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from api.core.domain import TaskEvent
from api.store import migrations
from api.store.rows import Pending, event_of, history_row
from api.store.sql import EVENT_COLUMNS, POSTGRES, SCHEMA_VERSION_NOW, positional

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
        await conn.execute(migrations.CREATE_VERSIONS.format(time="TIMESTAMPTZ"))
        current = await conn.fetchval(SCHEMA_VERSION_NOW)
        for version, script in migrations.pending(POSTGRES, current):
            for statement in script:
                await conn.execute(statement)
            text, args = positional(
                migrations.RECORD_VERSION, {"version": version, "now": datetime.now(UTC)}
            )
            await conn.execute(text, *args)
    return key


# One statement, so the global lock is held for one round trip and the commit. The lock is taken
# before the first row is produced, hence before any history id is drawn, and after every row
# lock the transaction took earlier; NOTIFY is delivered by PostgreSQL only if it commits.
RECORD = f"""
WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($8, $9)),
rows AS (
    INSERT INTO task_history (task_id, work_directory, status, previous_status, worker_id, at,
        details)
    SELECT r.task_id, r.work_directory, r.status, r.previous_status, r.worker_id, r.at, r.details
    FROM lock, unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::timestamptz[], $7::jsonb[]) WITH ORDINALITY
        AS r(task_id, work_directory, status, previous_status, worker_id, at, details, n)
    ORDER BY r.n
    RETURNING {EVENT_COLUMNS}),
announced AS (SELECT pg_notify($10, max(id)::text) FROM rows)
SELECT rows.* FROM rows, announced ORDER BY rows.id
"""
_HISTORY_FIELDS = ("task_id", "work_directory", "status", "previous_status", "worker_id", "at",
                   "details")  # fmt: skip


async def insert_history(
    conn: asyncpg.Connection, pending: Sequence[Pending], lock: tuple[int, int], channel: str
) -> list[TaskEvent]:
    """Write the history rows of a change under the history lock and announce the last id;
    ids are handed out in the order given, and commit in id order across every process."""
    rows = [history_row(POSTGRES, p) for p in pending]
    columns = [[row[name] for row in rows] for name in _HISTORY_FIELDS]
    records = await conn.fetch(RECORD, *columns, lock[0], lock[1], channel)
    return [event_of(POSTGRES, r) for r in records]
