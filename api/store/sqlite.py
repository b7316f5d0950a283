"""SQLite store: WAL, one group-committing writer thread (writer.py), aiosqlite readers."""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from api.domain import (
    ApiKey,
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
from api.store.sqlite_rows import (
    EVENT_COLUMNS,
    KEY_COLUMNS,
    TASK_COLUMNS,
    NotAll,
    dumps,
    event_of,
    from_us,
    jsonable,
    key_of,
    migrate,
    one,
    record,
    sqlite_path,
    task_filter,
    task_of,
    to_us,
)
from api.store.writer import Writer

READERS = 2


class SqliteStore:
    def __init__(self, url: str, *, durability: str = "full", readers: int = READERS) -> None:
        self.path = sqlite_path(url)
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        self._listeners: list[CommitListener] = []
        self._writer = Writer(self._connect_writer, self._committed)
        self._reader_count = readers
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = itertools.cycle(range(readers))
        # Key checks run on every request: on this connection, in the event loop's own thread,
        # since for an indexed read of a tiny table the hop to a reader thread costs far more.
        self._keys: sqlite3.Connection | None = None

    # --- lifecycle ---

    def _connect_writer(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")  # other server processes on the same file
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def open(self) -> None:
        self._writer.start()
        await self._writer.run(migrate)
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout = 10000")
            await reader.execute("PRAGMA query_only = 1")
            self._readers.append(reader)
        self._keys = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._keys.execute("PRAGMA busy_timeout = 0")  # never block the loop; fall back instead
        self._keys.execute("PRAGMA query_only = 1")

    async def close(self) -> None:
        if self._keys is not None:
            self._keys.close()
            self._keys = None
        for reader in self._readers:
            await reader.close()
        self._readers.clear()
        await self._writer.stop()

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def _committed(self, events: Sequence[TaskEvent]) -> None:
        for listener in self._listeners:
            listener(events)

    def _reader(self) -> aiosqlite.Connection:
        if not self._readers:
            raise RuntimeError("the store is not open")
        return self._readers[next(self._next_reader)]

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._reader().execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def ping(self) -> None:
        await self._fetchall("SELECT 1")

    async def schema_version(self) -> int:
        rows = await self._fetchall("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    # --- reads ---

    async def get(self, task_id: str) -> Task | None:
        rows = await self._fetchall(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return task_of(rows[0]) if rows else None

    async def list_tasks(
        self, where: TaskFilter, first: int, after_seq: int | None, offset: int = 0
    ) -> TaskPage:
        clauses, params = task_filter(where)
        total = (
            await self._fetchall(
                f"SELECT count(*) FROM tasks WHERE {' AND '.join(clauses)}", params
            )
        )[0][0]
        if after_seq is not None:
            clauses.append("seq > ?")
            params.append(after_seq)
        rows = await self._fetchall(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(clauses)}"
            " ORDER BY seq LIMIT ? OFFSET ?",
            [*params, first + 1, offset],
        )
        return TaskPage([task_of(r) for r in rows[:first]], len(rows) > first, total)

    async def count_by_status(self, work_directory: str | None) -> dict[TaskStatus, int]:
        if work_directory is None:
            rows = await self._fetchall("SELECT status, count(*) FROM tasks GROUP BY status")
        else:
            rows = await self._fetchall(
                "SELECT status, count(*) FROM tasks WHERE work_directory = ? GROUP BY status",
                (work_directory,),
            )
        return {TaskStatus(status): count for status, count in rows}

    async def history(self, task_id: str) -> list[TaskEvent]:
        rows = await self._fetchall(
            f"SELECT {EVENT_COLUMNS} FROM task_history WHERE task_id = ? ORDER BY id", (task_id,)
        )
        return [event_of(r) for r in rows]

    async def events_after(self, after: int, where: EventFilter, limit: int) -> list[TaskEvent]:
        clauses: list[str] = ["id > ?"]
        params: list[Any] = [after]
        if where.task_id is not None:
            clauses.append("task_id = ?")
            params.append(where.task_id)
        if where.work_directory is not None:
            clauses.append("work_directory = ?")
            params.append(where.work_directory)
        if where.statuses:
            clauses.append(f"status IN ({', '.join('?' * len(where.statuses))})")
            params.extend(s.value for s in where.statuses)
        rows = await self._fetchall(
            f"SELECT {EVENT_COLUMNS} FROM task_history WHERE {' AND '.join(clauses)}"
            " ORDER BY id LIMIT ?",
            [*params, limit],
        )
        return [event_of(r) for r in rows]

    async def last_event_id(self) -> int:
        rows = await self._fetchall("SELECT coalesce(max(id), 0) FROM task_history")
        return int(rows[0][0])

    async def next_run_after(self, work_directory: str, now: datetime) -> datetime | None:
        rows = await self._fetchall(
            "SELECT min(run_after) FROM tasks WHERE status = 'WAITING' AND work_directory = ?"
            " AND run_after > ?",
            (work_directory, to_us(now)),
        )
        return from_us(rows[0][0])

    # --- changes: each runs on the writer thread inside the group-commit transaction ---

    async def submit(self, specs: Sequence[TaskSpec], now: datetime) -> list[Task]:
        at = to_us(now)

        def work(conn: sqlite3.Connection) -> tuple[list[Task], list[TaskEvent]]:
            tasks: list[Task] = []
            events: list[TaskEvent] = []
            for spec in specs:
                task = one(
                    conn,
                    "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status,"
                    " created_at, updated_at, max_retries, metadata, run_after, idempotency_key)"
                    " VALUES (?, ?, ?, ?, ?, 'WAITING', ?, ?, ?, ?, ?, ?)"
                    f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {TASK_COLUMNS}",
                    (
                        str(uuid.uuid4()),
                        spec.work_directory,
                        spec.prompt,
                        spec.priority.rank,
                        dumps(list(spec.tags)),
                        at,
                        at,
                        spec.max_retries,
                        dumps(spec.metadata),
                        None if spec.run_after is None else to_us(spec.run_after),
                        spec.idempotency_key,
                    ),
                )
                if task is None:  # the idempotency key exists: hand back what is stored
                    task = one(
                        conn,
                        f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ?",
                        (spec.idempotency_key,),
                    )
                    assert task is not None
                else:
                    details = {} if task.run_after is None else {"runAfter": task.run_after}
                    events.append(record(conn, task, None, at, jsonable(details)))
                tasks.append(task)
            return tasks, events

        return await self._writer.run(work)

    async def claim(
        self, work_directory: str, worker_id: str, limit: int, lease_until: datetime, now: datetime
    ) -> list[Task]:
        at, lease = to_us(now), to_us(lease_until)

        def work(conn: sqlite3.Connection) -> tuple[list[Task], list[TaskEvent]]:
            rows = conn.execute(
                "UPDATE tasks SET status = 'WORKING', worker_id = ?, started_at = ?, updated_at = ?,"
                " lease_expires_at = ?, version = version + 1 WHERE seq IN (SELECT seq FROM tasks"
                " WHERE status = 'WAITING' AND work_directory = ?"
                " AND (run_after IS NULL OR run_after <= ?)"
                f" ORDER BY priority DESC, seq LIMIT ?) RETURNING {TASK_COLUMNS}",
                (worker_id, at, at, lease, work_directory, at, limit),
            ).fetchall()
            tasks = sorted((task_of(r) for r in rows), key=lambda t: (-t.priority.rank, t.seq))
            details = {"leaseExpiresAt": lease_until.isoformat()}
            events = [record(conn, t, TaskStatus.WAITING, at, details) for t in tasks]
            return tasks, events

        return await self._writer.run(work)

    async def heartbeat(
        self, task_id: str, worker_id: str, lease_until: datetime, now: datetime
    ) -> Task | None:
        sql = (
            "UPDATE tasks SET lease_expires_at = ?, updated_at = ?, version = version + 1"
            " WHERE id = ? AND status = 'WORKING' AND worker_id = ?"
            f" RETURNING {TASK_COLUMNS}"
        )
        params = (to_us(lease_until), to_us(now), task_id, worker_id)
        return await self._writer.run(lambda conn: (one(conn, sql, params), ()))

    async def complete(
        self, items: Sequence[Completion], worker_id: str, now: datetime
    ) -> list[Task] | None:
        at = to_us(now)

        def work(conn: sqlite3.Connection) -> tuple[list[Task] | None, list[TaskEvent]]:
            tasks: list[Task] = []
            for item in items:
                task = one(
                    conn,
                    "UPDATE tasks SET status = 'COMPLETED', result = ?, completed_at = ?,"
                    " updated_at = ?, lease_expires_at = NULL, version = version + 1"
                    " WHERE id = ? AND status = 'WORKING' AND worker_id = ?"
                    f" RETURNING {TASK_COLUMNS}",
                    (dumps(item.result), at, at, item.task_id, worker_id),
                )
                if task is None:
                    raise NotAll()
                tasks.append(task)
            events = [record(conn, t, TaskStatus.WORKING, at, {}) for t in tasks]
            return tasks, events

        try:
            return await self._writer.run(work)
        except NotAll:
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
        at = to_us(now)
        requeue = "(:retry AND retry_count < max_retries)"
        sql = (
            f"UPDATE tasks SET status = CASE WHEN {requeue} THEN 'WAITING' ELSE 'FAILED' END,"
            f" retry_count = retry_count + CASE WHEN {requeue} THEN 1 ELSE 0 END,"
            f" worker_id = CASE WHEN {requeue} THEN NULL ELSE worker_id END,"
            f" started_at = CASE WHEN {requeue} THEN NULL ELSE started_at END,"
            f" completed_at = CASE WHEN {requeue} THEN NULL ELSE :now END,"
            f" run_after = CASE WHEN {requeue} THEN :now + CAST("
            "   min(:cap, :base * (1 << min(retry_count, 30))) * :factor AS INTEGER)"
            "   ELSE run_after END,"
            " error_message = :error, lease_expires_at = NULL, updated_at = :now,"
            " version = version + 1"
            " WHERE id = :id AND status = 'WORKING' AND worker_id = :worker"
            f" RETURNING {TASK_COLUMNS}"
        )
        params = {
            "retry": retry,
            "now": at,
            "cap": int(backoff.cap_seconds * 1_000_000),
            "base": int(backoff.base_seconds * 1_000_000),
            "factor": 0.5 + 0.5 * jitter,
            "error": error,
            "id": task_id,
            "worker": worker_id,
        }

        def work(conn: sqlite3.Connection) -> tuple[Task | None, list[TaskEvent]]:
            task = one(conn, sql, params)
            if task is None:
                return None, []
            details: dict[str, Any] = {"error": error, "retry": retry}
            if task.status is TaskStatus.WAITING:
                details["runAfter"] = task.run_after
                details["attempt"] = task.retry_count
            return task, [record(conn, task, TaskStatus.WORKING, at, jsonable(details), worker_id)]

        return await self._writer.run(work)

    async def release(self, task_id: str, worker_id: str, now: datetime) -> Task | None:
        at = to_us(now)
        sql = (
            "UPDATE tasks SET status = 'WAITING', worker_id = NULL, started_at = NULL,"
            " lease_expires_at = NULL, updated_at = ?, version = version + 1"
            " WHERE id = ? AND status = 'WORKING' AND worker_id = ?"
            f" RETURNING {TASK_COLUMNS}"
        )

        def work(conn: sqlite3.Connection) -> tuple[Task | None, list[TaskEvent]]:
            task = one(conn, sql, (at, task_id, worker_id))
            if task is None:
                return None, []
            details = {"reason": "released"}
            return task, [record(conn, task, TaskStatus.WORKING, at, details, worker_id)]

        return await self._writer.run(work)

    async def cancel(self, task_id: str, reason: str | None, now: datetime) -> Task | None:
        at = to_us(now)

        def work(conn: sqlite3.Connection) -> tuple[Task | None, list[TaskEvent]]:
            # One compare-and-set per possible starting status, so the history knows which it was.
            for previous in (TaskStatus.WAITING, TaskStatus.WORKING):
                task = one(
                    conn,
                    "UPDATE tasks SET status = 'CANCELLED', completed_at = ?, updated_at = ?,"
                    " lease_expires_at = NULL, version = version + 1"
                    f" WHERE id = ? AND status = ? RETURNING {TASK_COLUMNS}",
                    (at, at, task_id, previous.value),
                )
                if task is not None:
                    details = {} if reason is None else {"reason": reason}
                    return task, [record(conn, task, previous, at, details)]
            return None, []

        return await self._writer.run(work)

    async def retry(self, task_id: str, now: datetime) -> Task | None:
        at = to_us(now)

        def work(conn: sqlite3.Connection) -> tuple[Task | None, list[TaskEvent]]:
            for previous in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                task = one(
                    conn,
                    "UPDATE tasks SET status = 'WAITING', retry_count = 0, worker_id = NULL,"
                    " started_at = NULL, completed_at = NULL, error_message = NULL,"
                    " lease_expires_at = NULL, run_after = NULL, updated_at = ?,"
                    f" version = version + 1 WHERE id = ? AND status = ? RETURNING {TASK_COLUMNS}",
                    (at, task_id, previous.value),
                )
                if task is not None:
                    return task, [record(conn, task, previous, at, {"reason": "retried"})]
            return None, []

        return await self._writer.run(work)

    async def update(
        self, task_id: str, expected_version: int, changes: TaskChanges, now: datetime
    ) -> Task | None:
        sql = (
            "UPDATE tasks SET prompt = coalesce(?, prompt), priority = coalesce(?, priority),"
            " tags = coalesce(?, tags), metadata = coalesce(?, metadata),"
            " max_retries = coalesce(?, max_retries), updated_at = ?, version = version + 1"
            " WHERE id = ? AND status = 'WAITING' AND version = ?"
            f" RETURNING {TASK_COLUMNS}"
        )
        params = (
            changes.prompt,
            None if changes.priority is None else changes.priority.rank,
            None if changes.tags is None else dumps(list(changes.tags)),
            None if changes.metadata is None else dumps(changes.metadata),
            changes.max_retries,
            to_us(now),
            task_id,
            expected_version,
        )
        return await self._writer.run(lambda conn: (one(conn, sql, params), ()))

    async def expire_leases(self, now: datetime, limit: int) -> list[Task]:
        at = to_us(now)

        def work(conn: sqlite3.Connection) -> tuple[list[Task], list[TaskEvent]]:
            expired = conn.execute(
                "SELECT seq, worker_id, version, lease_expires_at FROM tasks"
                " WHERE status = 'WORKING' AND lease_expires_at < ? ORDER BY lease_expires_at"
                " LIMIT ?",
                (at, limit),
            ).fetchall()
            tasks: list[Task] = []
            events: list[TaskEvent] = []
            for seq, worker, version, lease in expired:
                message = f"lease expired: worker {worker} sent no heartbeat before its lease ended"
                # compare-and-set on the version: another process may have swept or finished it
                task = one(
                    conn,
                    "UPDATE tasks SET"
                    " status = CASE WHEN retry_count < max_retries THEN 'WAITING' ELSE 'FAILED' END,"
                    " retry_count = retry_count + (retry_count < max_retries),"
                    " worker_id = CASE WHEN retry_count < max_retries THEN NULL ELSE worker_id END,"
                    " started_at = CASE WHEN retry_count < max_retries THEN NULL ELSE started_at END,"
                    " completed_at = CASE WHEN retry_count < max_retries THEN NULL ELSE ? END,"
                    " error_message = ?, lease_expires_at = NULL, updated_at = ?,"
                    " version = version + 1"
                    f" WHERE seq = ? AND status = 'WORKING' AND version = ? RETURNING {TASK_COLUMNS}",
                    (at, message, at, seq, version),
                )
                if task is None:
                    continue
                details = {
                    "reason": "lease_expired",
                    "leaseExpiresAt": from_us(lease),
                    "attempt": task.retry_count,
                }
                tasks.append(task)
                events.append(record(conn, task, TaskStatus.WORKING, at, jsonable(details), worker))
            return tasks, events

        return await self._writer.run(work)

    async def prune(self, finished_before: datetime, limit: int) -> int:
        cutoff = to_us(finished_before)

        def work(conn: sqlite3.Connection) -> tuple[int, list[TaskEvent]]:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM tasks WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')"
                    " AND completed_at < ? LIMIT ?",
                    (cutoff, limit),
                )
            ]
            if ids:
                marks = ", ".join("?" * len(ids))
                conn.execute(f"DELETE FROM task_history WHERE task_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", ids)
            return len(ids), []

        return await self._writer.run(work)

    # --- API keys ---

    async def create_key(
        self, name: str, key_hash: str, scopes: Sequence[str], now: datetime
    ) -> ApiKey | None:
        sql = (
            "INSERT INTO api_keys (name, key_hash, scopes, created_at) VALUES (?, ?, ?, ?)"
            f" ON CONFLICT DO NOTHING RETURNING {KEY_COLUMNS}"
        )
        params = (name, key_hash, ",".join(scopes), to_us(now))

        def work(conn: sqlite3.Connection) -> tuple[ApiKey | None, list[TaskEvent]]:
            row = conn.execute(sql, params).fetchone()
            return (None if row is None else key_of(row)), []

        return await self._writer.run(work)

    async def _key_read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._keys is not None:
            try:
                return self._keys.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # locked (a restore, a checkpoint): ask a reader
                pass
        return await self._fetchall(sql, params)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        rows = await self._key_read(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)
        )
        return key_of(rows[0]) if rows else None

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._fetchall(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id")
        return [key_of(r) for r in rows]

    async def revoke_key(self, name: str, now: datetime) -> ApiKey | None:
        sql = (
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
            f" RETURNING {KEY_COLUMNS}"
        )

        def work(conn: sqlite3.Connection) -> tuple[ApiKey | None, list[TaskEvent]]:
            row = conn.execute(sql, (to_us(now), name)).fetchone()
            return (None if row is None else key_of(row)), []

        return await self._writer.run(work)

    async def touch_key(self, key_hash: str, now: datetime) -> None:
        def work(conn: sqlite3.Connection) -> tuple[None, list[TaskEvent]]:
            conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE key_hash = ?", (to_us(now), key_hash)
            )
            return None, []

        await self._writer.run(work)

    async def count_active_keys(self) -> int:
        rows = await self._key_read("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(rows[0][0])
