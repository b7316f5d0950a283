"""SQLite rows <-> domain objects, the SQL pieces the store shares, and the schema migration.
Times are integer microseconds since the Unix epoch (UTC); JSON columns are text."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from api.database_url import sqlite_path as sqlite_path  # the store opens the URL's file
from api.domain import ApiKey, Task, TaskEvent, TaskFilter, TaskPriority, TaskStatus
from api.store.base import SCHEMA_VERSION
from api.store.migrations import SQLITE_MIGRATIONS

TASK_COLUMNS = (
    "seq, id, work_directory, prompt, priority, tags, status, worker_id, created_at, started_at, "
    "completed_at, updated_at, result, error_message, retry_count, max_retries, metadata, version, "
    "lease_expires_at, run_after, idempotency_key"
)
KEY_COLUMNS = "name, scopes, created_at, last_used_at, revoked_at"
EVENT_COLUMNS = "id, task_id, work_directory, status, previous_status, worker_id, at, details"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def instant(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def task_of(row: Sequence[Any]) -> Task:
    return Task(
        seq=row[0],
        id=row[1],
        work_directory=row[2],
        prompt=row[3],
        priority=TaskPriority.from_rank(row[4]),
        tags=tuple(json.loads(row[5])),
        status=TaskStatus(row[6]),
        worker_id=row[7],
        created_at=instant(row[8]),
        started_at=from_us(row[9]),
        completed_at=from_us(row[10]),
        updated_at=instant(row[11]),
        result=None if row[12] is None else json.loads(row[12]),
        error_message=row[13],
        retry_count=row[14],
        max_retries=row[15],
        metadata=json.loads(row[16]),
        version=row[17],
        lease_expires_at=from_us(row[18]),
        run_after=from_us(row[19]),
        idempotency_key=row[20],
    )


def event_of(row: Sequence[Any]) -> TaskEvent:
    return TaskEvent(
        id=row[0],
        task_id=row[1],
        work_directory=row[2],
        status=TaskStatus(row[3]),
        previous_status=None if row[4] is None else TaskStatus(row[4]),
        worker_id=row[5],
        at=instant(row[6]),
        details=json.loads(row[7]),
    )


def record(
    conn: sqlite3.Connection,
    task: Task,
    previous: TaskStatus | None,
    at: int,
    details: dict[str, Any],
    worker_id: str | None = None,
) -> TaskEvent:
    """Write the history row of one status change, in the transaction that made the change."""
    row = conn.execute(
        "INSERT INTO task_history (task_id, work_directory, status, previous_status, worker_id, at,"
        f" details) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {EVENT_COLUMNS}",
        (
            task.id,
            task.work_directory,
            task.status.value,
            None if previous is None else previous.value,
            worker_id if worker_id is not None else task.worker_id,
            at,
            dumps(details),
        ),
    ).fetchone()
    return event_of(row)


def one(conn: sqlite3.Connection, sql: str, params: Sequence[Any] | dict[str, Any]) -> Task | None:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else task_of(row)


def key_of(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        name=row[0],
        scopes=tuple(s for s in row[1].split(",") if s),
        created_at=instant(row[2]),
        last_used_at=from_us(row[3]),
        revoked_at=from_us(row[4]),
    )


class NotAll(Exception):
    """Raised inside a batch change to roll back all of it."""


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in details.items()}


def task_filter(where: TaskFilter) -> tuple[list[str], list[Any]]:
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    if where.statuses:
        clauses.append(f"status IN ({', '.join('?' * len(where.statuses))})")
        params.extend(s.value for s in where.statuses)
    if where.work_directory is not None:
        clauses.append("work_directory = ?")
        params.append(where.work_directory)
    if where.priority is not None:
        clauses.append("priority = ?")
        params.append(where.priority.rank)
    if where.tag is not None:
        clauses.append("EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = ?)")
        params.append(where.tag)
    return clauses, params


def migrate(conn: sqlite3.Connection) -> tuple[int, list[TaskEvent]]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database has schema version {current}, newer than this taskorch"
            f" ({SCHEMA_VERSION}); upgrade taskorch"
        )
    for version, script in enumerate(SQLITE_MIGRATIONS, start=1):
        if version <= current:
            continue
        for statement in script:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
            (version, to_us(datetime.now(UTC))),
        )
    return SCHEMA_VERSION, []
