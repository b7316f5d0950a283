"""What only PostgreSQL does: schema upgrades under an advisory lock, so replicas starting together
are safe, and history rows written without a lock, then given delivery positions by one stamper."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from api.core.domain import TaskEvent
from api.store import migrations
from api.store.rows import Pending, event_of, history_row
from api.store.sql import POSTGRES, SCHEMA_VERSION_NOW, positional

# Advisory lock classes (first key); the second key is a hash of the schema, so databases that
# hold several taskorch schemas (one per test run, say) do not serialise on each other.
MIGRATION_LOCK = 0x7A5C0001
# 0x7A5C0002 ordered history inserts before rows had delivery positions; no longer taken.
STAMPER_LOCK = 0x7A5C0003


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


# Writers insert without any lock: the rows get no id (delivery position) here, only their
# transaction's xid (the column default) and an insertion number. They send no NOTIFY: the commit
# of a transaction that notified takes PostgreSQL's cluster-wide notification lock through its
# WAL flush, which would serialise every writer again.
RECORD = """
WITH rows AS (
    INSERT INTO task_history (task_id, work_directory, status, previous_status, worker_id, at,
        details)
    SELECT r.task_id, r.work_directory, r.status, r.previous_status, r.worker_id, r.at, r.details
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::timestamptz[], $7::jsonb[]) WITH ORDINALITY
        AS r(task_id, work_directory, status, previous_status, worker_id, at, details, n)
    ORDER BY r.n
    RETURNING entry, task_id, work_directory, status, previous_status, worker_id, at, details)
SELECT 0 AS id, rows.* FROM rows ORDER BY rows.entry
"""
_HISTORY_FIELDS = ("task_id", "work_directory", "status", "previous_status", "worker_id", "at",
                   "details")  # fmt: skip


async def insert_history(conn: asyncpg.Connection, pending: Sequence[Pending]) -> list[TaskEvent]:
    """Write the history rows of a change, in the order given. The events returned have no
    delivery position yet (id 0)."""
    rows = [history_row(POSTGRES, p) for p in pending]
    columns = [[row[name] for row in rows] for name in _HISTORY_FIELDS]
    records = await conn.fetch(RECORD, *columns)
    return [event_of(POSTGRES, r) for r in records]


@functools.lru_cache(maxsize=64)
def with_history(statement: str) -> str:
    """`statement` (one that changes tasks, RETURNING their columns) and the history rows it owes,
    as one statement run on its own: no BEGIN, history insert and COMMIT round trips. The rows
    are what rows.history_row makes of each changed task, with :history_previous,
    :history_details and :history_worker (NULL: the task's own worker); they are inserted in
    claim order, as the general path writes them, and their xid column default names the
    statement's own transaction, so ordering is as for any change."""
    return (
        f"WITH changed AS ({statement}),"
        " recorded AS (INSERT INTO task_history (task_id, work_directory, status,"
        " previous_status, worker_id, at, details)"
        " SELECT id, work_directory, status, CAST(:history_previous AS text),"
        " coalesce(CAST(:history_worker AS text), worker_id), updated_at,"
        " CAST(:history_details AS jsonb) FROM changed ORDER BY priority DESC, seq)"
        " SELECT * FROM changed"
    )


# Wakes the stamper after a commit; a transaction of its own with no xid, so it writes no WAL
# and holds the notification lock only for a moment.
WAKE_STAMPER = "SELECT pg_notify($1, '')"

# Positions the rows no running transaction can precede any more: a transaction with an xid
# below the snapshot's xmin has ended, and one that has not written yet will get a larger xid.
# So rows are stamped in (xid, insertion) order, and no row with a smaller xid can commit later.
# Positions continue from the highest one without a sequence, so a stamp that is rolled back
# (its connection lost, say) leaves no gap; the unique index refuses a second stamper's clash.
STAMP = """
WITH oldest AS (
    SELECT entry, xid FROM task_history
    WHERE id IS NULL AND xid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY xid, entry LIMIT $1 FOR UPDATE),
ready AS (SELECT entry, row_number() OVER (ORDER BY xid, entry) AS n FROM oldest),
top AS (SELECT coalesce(max(id), 0) AS id FROM task_history),
unstamped AS (SELECT count(*) AS n FROM (SELECT 1 FROM task_history WHERE id IS NULL
    LIMIT $1 + 1) AS u),
stamped AS (
    UPDATE task_history h SET id = top.id + ready.n FROM ready, top
    WHERE h.entry = ready.entry RETURNING h.id),
last AS (SELECT max(id) AS id FROM stamped),
announced AS (SELECT pg_notify($2, last.id::text) FROM last WHERE last.id IS NOT NULL)
SELECT (SELECT count(*) FROM stamped) AS stamped, (SELECT n FROM unstamped) AS unstamped,
    (SELECT count(*) FROM announced) AS announced
"""


async def close_dedicated(conn: asyncpg.Connection | None) -> None:
    """Close a listening connection of our own (the bus's, the stamper's): politely for two
    seconds, then by force, so a stop never waits on a server that stopped answering."""
    if conn is not None and not conn.is_closed():
        try:
            async with asyncio.timeout(2.0):
                await conn.close()
        except Exception:
            conn.terminate()
