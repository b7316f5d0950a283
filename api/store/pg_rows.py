"""PostgreSQL rows <-> domain objects: column lists, codecs, history inserts and task filters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from api.domain import ApiKey, Task, TaskEvent, TaskFilter, TaskPriority, TaskStatus

TASK_FIELDS = (
    "seq", "id", "work_directory", "prompt", "priority", "tags", "status", "worker_id",
    "created_at", "started_at", "completed_at", "updated_at", "result", "error_message",
    "retry_count", "max_retries", "metadata", "version", "lease_expires_at", "run_after",
    "idempotency_key",
)  # fmt: skip
TASK_COLUMNS = ", ".join(TASK_FIELDS)
T_COLUMNS = ", ".join(f"t.{name}" for name in TASK_FIELDS)
KEY_COLUMNS = "name, scopes, created_at, last_used_at, revoked_at"
EVENT_COLUMNS = "id, task_id, work_directory, status, previous_status, worker_id, at, details"
# A change and the history rows it owes: (task, previous status, details, worker override).
Pending = tuple[Task, TaskStatus | None, dict[str, Any], str | None]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=dumps, decoder=json.loads, schema="pg_catalog")


def task_row(row: Any) -> Task:
    return Task(
        seq=row[0],
        id=str(row[1]),
        work_directory=row[2],
        prompt=row[3],
        priority=TaskPriority.from_rank(row[4]),
        tags=tuple(row[5]),
        status=TaskStatus(row[6]),
        worker_id=row[7],
        created_at=row[8],
        started_at=row[9],
        completed_at=row[10],
        updated_at=row[11],
        result=row[12],
        error_message=row[13],
        retry_count=row[14],
        max_retries=row[15],
        metadata=row[16],
        version=row[17],
        lease_expires_at=row[18],
        run_after=row[19],
        idempotency_key=row[20],
    )


def event_row(row: Any) -> TaskEvent:
    return TaskEvent(
        id=row[0],
        task_id=str(row[1]),
        work_directory=row[2],
        status=TaskStatus(row[3]),
        previous_status=None if row[4] is None else TaskStatus(row[4]),
        worker_id=row[5],
        at=row[6],
        details=row[7],
    )


def key_row(row: Any) -> ApiKey:
    return ApiKey(
        name=row[0],
        scopes=tuple(s for s in row[1].split(",") if s),
        created_at=row[2],
        last_used_at=row[3],
        revoked_at=row[4],
    )


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in details.items()}


async def one(conn: asyncpg.Connection, sql: str, *args: Any) -> Task | None:
    row = await conn.fetchrow(sql, *args)
    return None if row is None else task_row(row)


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


async def insert_history(
    conn: asyncpg.Connection, pending: Sequence[Pending], lock: tuple[int, int], channel: str
) -> list[TaskEvent]:
    """Write the history rows of a change under the history lock and announce the last id;
    ids are handed out in the order given, and commit in id order across every process."""
    rows = await conn.fetch(
        RECORD,
        [task.id for task, *_ in pending],
        [task.work_directory for task, *_ in pending],
        [task.status.value for task, *_ in pending],
        [None if previous is None else previous.value for _, previous, _, _ in pending],
        [task.worker_id if worker is None else worker for task, _, _, worker in pending],
        [task.updated_at for task, *_ in pending],
        [details for _, _, details, _ in pending],
        lock[0],
        lock[1],
        channel,
    )
    return [event_row(r) for r in rows]


def task_filter(where: TaskFilter) -> tuple[list[str], list[Any]]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if where.statuses:
        params.append([s.value for s in where.statuses])
        clauses.append(f"status = ANY(${len(params)}::text[])")
    if where.work_directory is not None:
        params.append(where.work_directory)
        clauses.append(f"work_directory = ${len(params)}")
    if where.priority is not None:
        params.append(where.priority.rank)
        clauses.append(f"priority = ${len(params)}")
    if where.tag is not None:
        params.append(where.tag)
        clauses.append(f"tags ? ${len(params)}")
    return clauses, params
