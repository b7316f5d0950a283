"""Rows <-> domain objects for both backends, by column name; the dialect decodes the values."""

from __future__ import annotations

import functools
from typing import Any, Protocol

from api.core.domain import (
    ApiKey,
    DirectorySettings,
    Task,
    TaskEvent,
    TaskLogLine,
    TaskPriority,
    TaskStatus,
)
from api.jsontext import loads
from api.store.sql import Dialect


class Row(Protocol):
    """A row as either driver gives it (sqlite3.Row, asyncpg.Record): columns by name."""

    def __getitem__(self, key: str, /) -> Any: ...


# A change and the history row it owes: (task, previous status, details, worker override).
Pending = tuple[Task, TaskStatus | None, dict[str, Any], str | None]


class NotAll(Exception):
    """Raised inside a batch change to roll back all of it."""


_STATUS = {status.value: status for status in TaskStatus}  # a dict lookup, not an Enum call


def task_of(d: Dialect, row: Row) -> Task:
    # Every column by name, without building keyword dicts: this runs for each row a change
    # returns, a thousand times for a batch.
    result = row["result"]
    progress = row["progress"]
    instant = d.instant
    return Task(
        id=str(row["id"]),
        work_directory=row["work_directory"],
        prompt=row["prompt"],
        priority=TaskPriority.from_rank(row["priority"]),
        tags=_tags(d, row["tags"]),
        status=_STATUS[row["status"]],
        worker_id=row["worker_id"],
        created_at=instant(row["created_at"]),
        started_at=instant(row["started_at"]),
        completed_at=instant(row["completed_at"]),
        updated_at=instant(row["updated_at"]),
        result=None if result is None else d.unjson(result),
        error_message=row["error_message"],
        retry_count=row["retry_count"],
        max_retries=row["max_retries"],
        metadata=_json_object(d, row["metadata"]),
        version=row["version"],
        lease_expires_at=instant(row["lease_expires_at"]),
        run_after=instant(row["run_after"]),
        idempotency_key=row["idempotency_key"],
        seq=row["seq"],
        depends_on=_ids(d, row["depends_on"]),
        blocked_by=_ids(d, row["blocked_by"]),
        require_review=bool(row["require_review"]),
        review_feedback=row["review_feedback"],
        has_dependents=bool(row["has_dependents"]),
        progress=None if progress is None else float(progress),
        progress_message=row["progress_message"],
        log_line_count=row["log_line_count"],
    )


def _tags(d: Dialect, value: Any) -> tuple[str, ...]:
    # Tasks share a few tag lists: each stored text is decoded once (PostgreSQL's are decoded).
    return _decoded_tags(value) if type(value) is str else tuple(d.unjson(value))


@functools.lru_cache(maxsize=4096)
def _decoded_tags(text: str) -> tuple[str, ...]:
    return tuple(loads(text))


def _ids(d: Dialect, value: Any) -> tuple[str, ...]:
    # Almost every task has none: skip decoding the empty list on every row read.
    return () if value == "[]" or value == [] else tuple(d.unjson(value))


def event_of(d: Dialect, row: Row) -> TaskEvent:
    previous = row["previous_status"]
    return TaskEvent(
        id=row["id"],
        task_id=str(row["task_id"]),
        work_directory=row["work_directory"],
        status=_STATUS[row["status"]],
        previous_status=None if previous is None else _STATUS[previous],
        worker_id=row["worker_id"],
        at=d.instant(row["at"]),
        details=_json_object(d, row["details"]),
    )


def pending_event(d: Dialect, pending: Pending) -> TaskEvent:
    """The event a history row written for `pending` carries, before it has a position (id 0)."""
    return event_of(d, {"id": 0, **history_row(d, pending)})


def _json_object(d: Dialect, value: Any) -> Any:
    # Most tasks carry no metadata and most history rows no details: skip decoding the empty
    # object on every row read.
    return {} if value == "{}" else d.unjson(value)


def directory_of(d: Dialect, row: Row) -> DirectorySettings:
    return DirectorySettings(
        work_directory=row["work_directory"],
        max_working=row["max_working"],
        paused=bool(row["paused"]),
        updated_at=d.instant(row["updated_at"]),
    )


def log_line_of(d: Dialect, row: Row) -> TaskLogLine:
    return TaskLogLine(line=row["line"], text=row["text"], at=d.instant(row["at"]))


def key_of(d: Dialect, row: Row) -> ApiKey:
    return ApiKey(
        name=row["name"],
        scopes=tuple(s for s in row["scopes"].split(",") if s),
        created_at=d.instant(row["created_at"]),
        last_used_at=d.instant(row["last_used_at"]),
        revoked_at=d.instant(row["revoked_at"]),
        rate_limit=row["rate_limit"],
    )


def applied(d: Dialect, task: Task, expected_version: int) -> dict[str, Any]:
    """Parameters of the APPLY statement: the decided task's lifecycle columns."""
    return {
        "seq": task.seq,
        "expected_version": expected_version,
        "status": task.status.value,
        "retry_count": task.retry_count,
        "worker_id": task.worker_id,
        "started_at": d.time(task.started_at),
        "completed_at": d.time(task.completed_at),
        "run_after": d.time(task.run_after),
        "error_message": task.error_message,
        "lease_expires_at": d.time(task.lease_expires_at),
        "updated_at": d.time(task.updated_at),
        "version": task.version,
        "result": None if task.result is None else d.json(task.result),
        "blocked_by": d.json(list(task.blocked_by)),
        "review_feedback": task.review_feedback,
    }


def history_row(d: Dialect, pending: Pending) -> dict[str, Any]:
    task, previous, details, worker = pending
    return {
        "task_id": task.id,
        "work_directory": task.work_directory,
        "status": task.status.value,
        "previous_status": None if previous is None else previous.value,
        "worker_id": task.worker_id if worker is None else worker,
        "at": d.time(task.updated_at),
        "details": d.json(details),
    }
