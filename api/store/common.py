"""The task store over the SQL catalogue, for both backends; each backend supplies how a read, a
single statement and a change program reach its database."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from api.core import domain, lifecycle
from api.core.domain import (
    Completion,
    DirectoryChanges,
    DirectorySettings,
    Task,
    TaskFilter,
    TaskLogLine,
    TaskPage,
    TaskStatus,
    WorkDirectory,
)
from api.store import changes as programs
from api.store import sql
from api.store.base import BulkDecide, Decide, HandleStore, KeyStore
from api.store.changes import BulkChunk, Program, Query
from api.store.rows import NotAll, Row, directory_of, event_of, log_line_of, task_of
from api.store.sql import Catalogue

T = TypeVar("T")


class SqlTaskStore(ABC):
    sql: Catalogue
    keys: KeyStore
    handles: HandleStore

    @abstractmethod
    async def _read(self, query: Query) -> list[Row]:
        """One read."""

    @abstractmethod
    async def _write(self, query: Query) -> list[Row]:
        """One statement that owes no history, in a transaction of its own."""

    @abstractmethod
    async def _run(self, program: Program[T]) -> T:
        """Run a change program in one transaction and write the history it owes."""

    def _task(self, rows: list[Row]) -> Task | None:
        return task_of(self.sql.dialect, rows[0]) if rows else None

    async def ping(self) -> None:
        await self._read(("SELECT 1 AS one", {}))

    async def schema_version(self) -> int:
        return int((await self._read((sql.SCHEMA_VERSION_NOW, {})))[0]["version"])

    # --- reads ---

    async def get(self, task_id: str) -> Task | None:
        return self._task(await self._read((sql.GET, {"id": task_id})))

    async def list_tasks(
        self,
        where: domain.TaskFilter,
        first: int,
        after_seq: int | None,
        offset: int = 0,
        count: bool = True,
    ) -> TaskPage:
        params: dict[str, Any] = {"limit": first + 1, "offset": offset}
        clauses = sql.task_filter(self.sql.dialect, where, params)
        total = None
        if count:  # a count reads every matching row: 30-110 ms for a million tasks
            counted = await self._read(
                (f"SELECT count(*) AS n FROM tasks{sql.where(clauses)}", params)
            )
            total = int(counted[0]["n"])
        if after_seq is not None:
            clauses.append("seq > :after")
            params["after"] = after_seq
        rows = await self._read(
            (
                f"SELECT {sql.TASK_COLUMNS} FROM tasks{sql.where(clauses)}"
                " ORDER BY seq LIMIT :limit OFFSET :offset",
                params,
            )
        )
        tasks = [task_of(self.sql.dialect, r) for r in rows[:first]]
        return TaskPage(tasks, len(rows) > first, total)

    async def count_by_status(self, work_directory: str | None) -> dict[TaskStatus, int]:
        params: dict[str, Any] = {"work_directory": work_directory}
        clauses = [] if work_directory is None else ["work_directory = :work_directory"]
        rows = await self._read(
            (f"SELECT status, count(*) AS n FROM tasks{sql.where(clauses)} GROUP BY status", params)
        )
        return {TaskStatus(row["status"]): int(row["n"]) for row in rows}

    async def directory(self, work_directory: str) -> DirectorySettings:
        rows = await self._read((sql.DIRECTORY, {"work_directory": work_directory}))
        return (
            directory_of(self.sql.dialect, rows[0]) if rows else DirectorySettings(work_directory)
        )

    async def directories(self, work_directory: str | None = None) -> list[WorkDirectory]:
        params: dict[str, Any] = {"work_directory": work_directory}
        clauses = [] if work_directory is None else ["work_directory = :work_directory"]
        configured = await self._read((sql.DIRECTORIES + sql.where(clauses), params))
        counted = await self._read(
            (sql.COUNTS_BY_DIRECTORY.format(where=sql.where(clauses)), params)
        )
        settings = {
            row["work_directory"]: directory_of(self.sql.dialect, row) for row in configured
        }
        counts: dict[str, dict[TaskStatus, int]] = {}
        for row in counted:
            counts.setdefault(row["work_directory"], {})[TaskStatus(row["status"])] = int(row["n"])
        return [
            WorkDirectory(settings.get(name) or DirectorySettings(name), counts.get(name, {}))
            for name in sorted(settings.keys() | counts.keys())
        ]

    async def history(self, task_id: str) -> list[domain.TaskEvent]:
        rows = await self._read((sql.HISTORY, {"task_id": task_id}))
        return [event_of(self.sql.dialect, r) for r in rows]

    async def events_after(
        self, after: int, where: domain.EventFilter, limit: int
    ) -> list[domain.TaskEvent]:
        params: dict[str, Any] = {"after": after, "limit": limit}
        clauses = sql.event_filter(where, params)
        rows = await self._read(
            (
                f"SELECT {sql.EVENT_COLUMNS} FROM task_history{sql.where(clauses)}"
                " ORDER BY id LIMIT :limit",
                params,
            )
        )
        return [event_of(self.sql.dialect, r) for r in rows]

    async def logs_after(self, task_id: str, after: int, limit: int) -> list[TaskLogLine]:
        rows = await self._read(
            (sql.LOGS_AFTER, {"task_id": task_id, "after": after, "limit": limit})
        )
        return [log_line_of(self.sql.dialect, r) for r in rows]

    async def last_event_id(self) -> int:
        return int((await self._read((sql.LAST_EVENT_ID, {})))[0]["id"])

    async def next_run_after(self, work_directory: str, now: datetime) -> datetime | None:
        d = self.sql.dialect
        params = {"work_directory": work_directory, "now": d.time(now)}
        rows = await self._read((sql.NEXT_RUN_AFTER, params))
        value: datetime | None = d.instant(rows[0]["run_after"])
        return value

    # --- changes ---

    async def submit(self, specs: Sequence[domain.TaskSpec], now: datetime) -> list[Task]:
        return await self._run(programs.submit(self.sql, specs, now))

    async def submit_with_handle(
        self, spec: domain.TaskSpec, now: datetime, handle: str, owner: str
    ) -> tuple[Task, domain.TaskHandle]:
        return await self._run(programs.submit_with_handle(self.sql, spec, now, handle, owner))

    async def claim(
        self, work_directory: str, worker_id: str, limit: int, lease_until: datetime, now: datetime
    ) -> list[Task]:
        return await self._run(
            programs.claim(self.sql, work_directory, worker_id, limit, lease_until, now)
        )

    async def heartbeat(
        self, task_id: str, worker_id: str, lease_until: datetime, now: datetime
    ) -> Task | None:
        query = programs.heartbeat(self.sql, task_id, worker_id, lease_until, now)
        return self._task(await self._write(query))

    async def complete(
        self, items: Sequence[Completion], worker_id: str, now: datetime
    ) -> list[Task] | None:
        try:
            return await self._run(programs.complete(self.sql, items, worker_id, now))
        except NotAll:
            return None

    async def change(self, task_id: str, decide: Decide) -> Task | None:
        return await self._run(programs.decided(self.sql, task_id, decide))

    async def retry(self, task_id: str, now: datetime) -> Task | None:
        return await self._run(programs.retry(self.sql, task_id, now))

    async def unfinished_dependencies(self, task_id: str) -> dict[str, TaskStatus]:
        params: dict[str, Any] = {"task_id": task_id}
        query = sql.UNFINISHED_DEPENDENCIES.format("d.task_id = :task_id")
        rows = await self._read((query, params))
        return {str(r["depends_on"]): TaskStatus(r["status"]) for r in rows}

    async def release(self, task_id: str, worker_id: str, now: datetime) -> Task | None:
        return await self.change(task_id, lambda task: lifecycle.release(task, worker_id, now))

    async def update(
        self, task_id: str, expected_version: int, changes: domain.TaskChanges, now: datetime
    ) -> Task | None:
        query = programs.update(self.sql, task_id, expected_version, changes, now)
        return self._task(await self._write(query))

    async def configure(
        self, work_directory: str, changes: DirectoryChanges, now: datetime
    ) -> DirectorySettings:
        return await self._run(programs.configure(self.sql, work_directory, changes, now))

    async def bulk(
        self, where: TaskFilter, after_seq: int, limit: int, decide: BulkDecide
    ) -> BulkChunk:
        return await self._run(programs.bulk(self.sql, where, after_seq, limit, decide))

    async def bulk_one(self, where: TaskFilter, task_id: str, decide: BulkDecide) -> Task | None:
        return await self._run(programs.bulk_one(self.sql, where, task_id, decide))

    async def report_progress(
        self,
        task_id: str,
        worker_id: str,
        progress: float | None,
        message: str | None,
        lease_until: datetime,
        now: datetime,
    ) -> Task | None:
        query = programs.report_progress(
            self.sql, task_id, worker_id, progress, message, lease_until, now
        )
        return self._task(await self._write(query))

    async def append_logs(
        self, task_id: str, worker_id: str, lines: Sequence[str], now: datetime
    ) -> int | None:
        return await self._run(programs.append_logs(self.sql, task_id, worker_id, lines, now))

    async def expire_leases(self, now: datetime, limit: int) -> list[Task]:
        return await self._run(programs.expire_leases(self.sql, now, limit))

    async def prune(self, finished_before: datetime, limit: int) -> int:
        return await self._run(programs.prune(self.sql, finished_before, limit))
