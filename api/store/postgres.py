"""PostgreSQL store on an asyncpg pool: compare-and-set updates, SKIP LOCKED claims, and history ids
that commit in id order so a cross-process event reader never skips one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from api.domain import (
    Backoff,
    EventFilter,
    Task,
    TaskChanges,
    TaskEvent,
    TaskFilter,
    TaskSpec,
    TaskStatus,
)
from api.store.base import CommitListener, Completion, TaskPage
from api.store.pg_keys import PostgresKeys
from api.store.pg_rows import (
    EVENT_COLUMNS,
    T_COLUMNS,
    TASK_COLUMNS,
    Pending,
    event_row,
    init_connection,
    insert_history,
    jsonable,
    one,
    task_filter,
    task_row,
)
from api.store.pg_schema import HISTORY_LOCK, migrate

T = TypeVar("T")

log = logging.getLogger("taskorch.store")

CHANNEL = "taskorch_events"

POOL_MIN = 1
POOL_MAX = 10

Pendings = list[Pending]

# ANY(ARRAY(...)), not IN (...): the planner then reads the picked rows through the primary key
# instead of hash-joining a scan of the whole table. Parameters: worker, now, lease end,
# work directory, limit.
CLAIM = (
    "UPDATE tasks SET status = 'WORKING', worker_id = $1, started_at = $2, updated_at = $2,"
    " lease_expires_at = $3, version = version + 1"
    " WHERE seq = ANY(ARRAY(SELECT seq FROM tasks WHERE status = 'WAITING'"
    " AND work_directory = $4 AND (run_after IS NULL OR run_after <= $2)"
    " ORDER BY priority DESC, seq LIMIT $5 FOR UPDATE SKIP LOCKED))"
    f" RETURNING {TASK_COLUMNS}"
)
Work = Callable[[asyncpg.Connection], Awaitable[tuple[T, list[Pending]]]]


class _NotAll(Exception):
    """Raised inside a batch change to roll back all of it."""


class PostgresStore(PostgresKeys):
    def __init__(self, url: str, *, min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._listeners: list[CommitListener] = []
        # Commits of this process pass one at a time through the history lock, so listeners are
        # called in event-id order; the advisory lock already serialises them across processes.
        self._commit_lock = asyncio.Lock()
        self._lock_key = 0

    # --- lifecycle ---

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            init=init_connection,
            # A generic plan cached while the table was small keeps scanning the whole table after
            # it grew; custom plans see the table's current size. Planning these costs ~0.1 ms.
            server_settings={"plan_cache_mode": "force_custom_plan"},
        )
        try:
            async with self._pool.acquire() as conn:
                self._lock_key = await migrate(conn)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    async def _change(self, work: Work[T]) -> T:
        """Run `work` in one transaction; write the history rows it owes under the history lock,
        announce them with NOTIFY in the same transaction, and tell listeners after the commit."""
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                value, pending = await work(conn)
                if not pending:
                    await tx.commit()
                    return value
                async with self._commit_lock:
                    events = await insert_history(
                        conn, pending, (HISTORY_LOCK, self._lock_key), CHANNEL
                    )
                    await tx.commit()
                    self._committed(events)
                return value
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(Exception):  # the pool resets the connection anyway
                        await tx.rollback()
                raise

    def _committed(self, events: Sequence[TaskEvent]) -> None:
        # The change is committed: a failing listener must not turn it into an error for the caller.
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("commit listener failed")

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def schema_version(self) -> int:
        return int(
            await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        )

    # --- reads ---

    async def get(self, task_id: str) -> Task | None:
        row = await self.pool.fetchrow(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
        return None if row is None else task_row(row)

    async def list_tasks(
        self, where: TaskFilter, first: int, after_seq: int | None, offset: int = 0
    ) -> TaskPage:
        clauses, params = task_filter(where)
        total = await self.pool.fetchval(
            f"SELECT count(*) FROM tasks WHERE {' AND '.join(clauses)}", *params
        )
        if after_seq is not None:
            params.append(after_seq)
            clauses.append(f"seq > ${len(params)}")
        params += [first + 1, offset]
        rows = await self.pool.fetch(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(clauses)}"
            f" ORDER BY seq LIMIT ${len(params) - 1} OFFSET ${len(params)}",
            *params,
        )
        return TaskPage([task_row(r) for r in rows[:first]], len(rows) > first, int(total))

    async def count_by_status(self, work_directory: str | None) -> dict[TaskStatus, int]:
        rows = await self.pool.fetch(
            "SELECT status, count(*) FROM tasks WHERE ($1::text IS NULL OR work_directory = $1)"
            " GROUP BY status",
            work_directory,
        )
        return {TaskStatus(status): int(count) for status, count in rows}

    async def history(self, task_id: str) -> list[TaskEvent]:
        rows = await self.pool.fetch(
            f"SELECT {EVENT_COLUMNS} FROM task_history WHERE task_id = $1 ORDER BY id", task_id
        )
        return [event_row(r) for r in rows]

    async def events_after(self, after: int, where: EventFilter, limit: int) -> list[TaskEvent]:
        rows = await self.pool.fetch(
            f"SELECT {EVENT_COLUMNS} FROM task_history WHERE id > $1"
            " AND ($2::uuid IS NULL OR task_id = $2) AND ($3::text IS NULL OR work_directory = $3)"
            " AND (cardinality($4::text[]) = 0 OR status = ANY($4)) ORDER BY id LIMIT $5",
            after,
            where.task_id,
            where.work_directory,
            [s.value for s in where.statuses],
            limit,
        )
        return [event_row(r) for r in rows]

    async def last_event_id(self) -> int:
        return int(await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM task_history"))

    async def next_run_after(self, work_directory: str, now: datetime) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(
            "SELECT min(run_after) FROM tasks WHERE status = 'WAITING' AND work_directory = $1"
            " AND run_after > $2",
            work_directory,
            now,
        )
        return value

    # --- changes ---

    async def submit(self, specs: Sequence[TaskSpec], now: datetime) -> list[Task]:
        async def work(conn: asyncpg.Connection) -> tuple[list[Task], Pendings]:
            tasks: list[Task] = []
            pending: Pendings = []
            for spec in specs:
                task = await one(
                    conn,
                    "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status,"
                    " created_at, updated_at, max_retries, metadata, run_after, idempotency_key)"
                    " VALUES ($1, $2, $3, $4, $5, 'WAITING', $6, $6, $7, $8, $9, $10)"
                    f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {TASK_COLUMNS}",
                    str(uuid.uuid4()),
                    spec.work_directory,
                    spec.prompt,
                    spec.priority.rank,
                    list(spec.tags),
                    now,
                    spec.max_retries,
                    spec.metadata,
                    spec.run_after,
                    spec.idempotency_key,
                )
                if task is None:  # the idempotency key exists: hand back what is stored
                    task = await one(
                        conn,
                        f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = $1",
                        spec.idempotency_key,
                    )
                    assert task is not None
                else:
                    details = {} if task.run_after is None else {"runAfter": task.run_after}
                    pending.append((task, None, jsonable(details), None))
                tasks.append(task)
            return tasks, pending

        return await self._change(work)

    async def claim(
        self, work_directory: str, worker_id: str, limit: int, lease_until: datetime, now: datetime
    ) -> list[Task]:
        async def work(conn: asyncpg.Connection) -> tuple[list[Task], Pendings]:
            rows = await conn.fetch(
                CLAIM,
                worker_id,
                now,
                lease_until,
                work_directory,
                limit,
            )
            tasks = sorted((task_row(r) for r in rows), key=lambda t: (-t.priority.rank, t.seq))
            details = {"leaseExpiresAt": lease_until.isoformat()}
            return tasks, [(t, TaskStatus.WAITING, details, None) for t in tasks]

        return await self._change(work)

    async def heartbeat(
        self, task_id: str, worker_id: str, lease_until: datetime, now: datetime
    ) -> Task | None:
        return await one(
            self.pool,
            "UPDATE tasks SET lease_expires_at = $1, updated_at = $2, version = version + 1"
            " WHERE id = $3 AND status = 'WORKING' AND worker_id = $4"
            f" RETURNING {TASK_COLUMNS}",
            lease_until,
            now,
            task_id,
            worker_id,
        )

    async def complete(
        self, items: Sequence[Completion], worker_id: str, now: datetime
    ) -> list[Task] | None:
        async def work(conn: asyncpg.Connection) -> tuple[list[Task], Pendings]:
            tasks: list[Task] = []
            for item in items:
                task = await one(
                    conn,
                    "UPDATE tasks SET status = 'COMPLETED', result = $1, completed_at = $2,"
                    " updated_at = $2, lease_expires_at = NULL, version = version + 1"
                    " WHERE id = $3 AND status = 'WORKING' AND worker_id = $4"
                    f" RETURNING {TASK_COLUMNS}",
                    item.result,
                    now,
                    item.task_id,
                    worker_id,
                )
                if task is None:
                    raise _NotAll()
                tasks.append(task)
            return tasks, [(t, TaskStatus.WORKING, {}, None) for t in tasks]

        try:
            return await self._change(work)
        except _NotAll:
            return None

    async def fail(
        self,
        task_id: str,
        worker_id: str,
        error: str,
        retry: bool,
        backoff: Backoff,
        jitter: float,
        now: datetime,
    ) -> Task | None:
        requeue = "($1::boolean AND retry_count < max_retries)"
        # Same arithmetic as the SQLite store: whole microseconds, truncated.
        delay = (
            "interval '1 microsecond' * trunc(least($3::bigint,"
            " $4::bigint * (1::bigint << least(retry_count, 30))) * $5::float8)"
        )
        sql = (
            f"UPDATE tasks SET status = CASE WHEN {requeue} THEN 'WAITING' ELSE 'FAILED' END,"
            f" retry_count = retry_count + CASE WHEN {requeue} THEN 1 ELSE 0 END,"
            f" worker_id = CASE WHEN {requeue} THEN NULL ELSE worker_id END,"
            f" started_at = CASE WHEN {requeue} THEN NULL ELSE started_at END,"
            f" completed_at = CASE WHEN {requeue} THEN NULL ELSE $2::timestamptz END,"
            f" run_after = CASE WHEN {requeue} THEN $2 + {delay} ELSE run_after END,"
            " error_message = $6, lease_expires_at = NULL, updated_at = $2,"
            " version = version + 1"
            " WHERE id = $7 AND status = 'WORKING' AND worker_id = $8"
            f" RETURNING {TASK_COLUMNS}"
        )

        async def work(conn: asyncpg.Connection) -> tuple[Task | None, Pendings]:
            task = await one(
                conn,
                sql,
                retry,
                now,
                int(backoff.cap_seconds * 1_000_000),
                int(backoff.base_seconds * 1_000_000),
                0.5 + 0.5 * jitter,
                error,
                task_id,
                worker_id,
            )
            if task is None:
                return None, []
            details: dict[str, Any] = {"error": error, "retry": retry}
            if task.status is TaskStatus.WAITING:
                details["runAfter"] = task.run_after
                details["attempt"] = task.retry_count
            return task, [(task, TaskStatus.WORKING, jsonable(details), worker_id)]

        return await self._change(work)

    async def release(self, task_id: str, worker_id: str, now: datetime) -> Task | None:
        async def work(conn: asyncpg.Connection) -> tuple[Task | None, Pendings]:
            task = await one(
                conn,
                "UPDATE tasks SET status = 'WAITING', worker_id = NULL, started_at = NULL,"
                " lease_expires_at = NULL, updated_at = $1, version = version + 1"
                " WHERE id = $2 AND status = 'WORKING' AND worker_id = $3"
                f" RETURNING {TASK_COLUMNS}",
                now,
                task_id,
                worker_id,
            )
            if task is None:
                return None, []
            return task, [(task, TaskStatus.WORKING, {"reason": "released"}, worker_id)]

        return await self._change(work)

    async def cancel(self, task_id: str, reason: str | None, now: datetime) -> Task | None:
        async def work(conn: asyncpg.Connection) -> tuple[Task | None, Pendings]:
            # One compare-and-set per possible starting status, so the history knows which it was.
            for previous in (TaskStatus.WAITING, TaskStatus.WORKING):
                task = await one(
                    conn,
                    "UPDATE tasks SET status = 'CANCELLED', completed_at = $1, updated_at = $1,"
                    " lease_expires_at = NULL, version = version + 1"
                    f" WHERE id = $2 AND status = $3 RETURNING {TASK_COLUMNS}",
                    now,
                    task_id,
                    previous.value,
                )
                if task is not None:
                    details = {} if reason is None else {"reason": reason}
                    return task, [(task, previous, details, None)]
            return None, []

        return await self._change(work)

    async def retry(self, task_id: str, now: datetime) -> Task | None:
        async def work(conn: asyncpg.Connection) -> tuple[Task | None, Pendings]:
            for previous in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                task = await one(
                    conn,
                    "UPDATE tasks SET status = 'WAITING', retry_count = 0, worker_id = NULL,"
                    " started_at = NULL, completed_at = NULL, error_message = NULL,"
                    " lease_expires_at = NULL, run_after = NULL, updated_at = $1,"
                    " version = version + 1 WHERE id = $2 AND status = $3"
                    f" RETURNING {TASK_COLUMNS}",
                    now,
                    task_id,
                    previous.value,
                )
                if task is not None:
                    return task, [(task, previous, {"reason": "retried"}, None)]
            return None, []

        return await self._change(work)

    async def update(
        self, task_id: str, expected_version: int, changes: TaskChanges, now: datetime
    ) -> Task | None:
        return await one(
            self.pool,
            "UPDATE tasks SET prompt = coalesce($1, prompt), priority = coalesce($2, priority),"
            " tags = coalesce($3, tags), metadata = coalesce($4, metadata),"
            " max_retries = coalesce($5, max_retries), updated_at = $6, version = version + 1"
            " WHERE id = $7 AND status = 'WAITING' AND version = $8"
            f" RETURNING {TASK_COLUMNS}",
            changes.prompt,
            None if changes.priority is None else changes.priority.rank,
            None if changes.tags is None else list(changes.tags),
            changes.metadata,
            changes.max_retries,
            now,
            task_id,
            expected_version,
        )

    async def expire_leases(self, now: datetime, limit: int) -> list[Task]:
        # Every replica sweeps: SKIP LOCKED leaves rows another sweeper holds, and the row is
        # re-checked after locking, so each expiry is applied exactly once.
        requeue = "t.retry_count < t.max_retries"
        sql = (
            "WITH expired AS (SELECT seq, worker_id, lease_expires_at FROM tasks"
            " WHERE status = 'WORKING' AND lease_expires_at < $1"
            " ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            f" UPDATE tasks t SET status = CASE WHEN {requeue} THEN 'WAITING' ELSE 'FAILED' END,"
            f" retry_count = t.retry_count + CASE WHEN {requeue} THEN 1 ELSE 0 END,"
            f" worker_id = CASE WHEN {requeue} THEN NULL ELSE t.worker_id END,"
            f" started_at = CASE WHEN {requeue} THEN NULL ELSE t.started_at END,"
            f" completed_at = CASE WHEN {requeue} THEN NULL ELSE $1::timestamptz END,"
            " error_message = 'lease expired: worker ' || e.worker_id"
            " || ' sent no heartbeat before its lease ended',"
            " lease_expires_at = NULL, updated_at = $1, version = t.version + 1"
            " FROM expired e WHERE t.seq = e.seq AND t.status = 'WORKING'"
            f" RETURNING {T_COLUMNS}, e.worker_id, e.lease_expires_at"
        )

        async def work(conn: asyncpg.Connection) -> tuple[list[Task], Pendings]:
            rows = await conn.fetch(sql, now, limit)
            rows = sorted(rows, key=lambda r: (r[-1], r[0]))
            tasks: list[Task] = []
            pending: Pendings = []
            for row in rows:
                task = task_row(row)
                details = {
                    "reason": "lease_expired",
                    "leaseExpiresAt": row[-1],
                    "attempt": task.retry_count,
                }
                tasks.append(task)
                pending.append((task, TaskStatus.WORKING, jsonable(details), row[-2]))
            return tasks, pending

        return await self._change(work)

    async def prune(self, finished_before: datetime, limit: int) -> int:
        count = await self.pool.fetchval(
            "WITH doomed AS (SELECT id FROM tasks"
            " WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND completed_at < $1"
            " LIMIT $2 FOR UPDATE SKIP LOCKED),"
            " history AS (DELETE FROM task_history WHERE task_id IN (SELECT id FROM doomed)),"
            " gone AS (DELETE FROM tasks WHERE id IN (SELECT id FROM doomed) RETURNING 1)"
            " SELECT count(*) FROM gone",
            finished_before,
            limit,
        )
        return int(count)
