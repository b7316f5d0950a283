"""The task store over the SQL catalogue, for both backends; each backend supplies how a read, a
single statement and a change program reach its database."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from api.core import domain, lifecycle
from api.core.domain import Completion, Task, TaskLogLine, TaskPage, TaskStatus
from api.store import changes as programs
from api.store import sql
from api.store.base import Decide, KeyStore
from api.store.changes import Program, Query
from api.store.rows import NotAll, Row, event_of, log_line_of, task_of
from api.store.sql import Catalogue

T = TypeVar("T")


class SqlTaskStore(ABC):
    sql: Catalogue
    keys: KeyStore

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
        self, where: domain.TaskFilter, first: int, after_seq: int | None, offset: int = 0
    ) -> TaskPage:
        params: dict[str, Any] = {"limit": first + 1, "offset": offset}
        clauses = sql.task_filter(self.sql.dialect, where, params)
        counted = await self._read((f"SELECT count(*) AS n FROM tasks{sql.where(clauses)}", params))
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
        return TaskPage(tasks, len(rows) > first, int(counted[0]["n"]))

    async def count_by_status(self, work_directory: str | None) -> dict[TaskStatus, int]:
        params: dict[str, Any] = {"work_directory": work_directory}
        clauses = [] if work_directory is None else ["work_directory = :work_directory"]
        rows = await self._read(
            (f"SELECT status, count(*) AS n FROM tasks{sql.where(clauses)} GROUP BY status", params)
        )
        return {TaskStatus(row["status"]): int(row["n"]) for row in rows}

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

    async def release(self, task_id: str, worker_id: str, now: datetime) -> Task | None:
        return await self.change(task_id, lambda task: lifecycle.release(task, worker_id, now))

    async def update(
        self, task_id: str, expected_version: int, changes: domain.TaskChanges, now: datetime
    ) -> Task | None:
        query = programs.update(self.sql, task_id, expected_version, changes, now)
        return self._task(await self._write(query))

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
