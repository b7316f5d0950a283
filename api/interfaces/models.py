"""The snake_case shapes that REST and MCP return for tasks, pages and statistics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from api.core.domain import BulkResult, Task, TaskLogLine, WorkDirectory
from api.core.service import Statistics


class TaskOut(BaseModel):
    """A task as REST and MCP clients see it."""

    id: str = Field(description="The task id (a UUID): pass it to every other task operation.")
    work_directory: str
    prompt: str
    priority: str = Field(description="LOW, MEDIUM or HIGH")
    tags: list[str]
    status: str = Field(
        description="BLOCKED, WAITING, WORKING, IN_REVIEW, COMPLETED, FAILED or CANCELLED"
    )
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    result: Any = None
    error_message: str | None
    retry_count: int
    max_retries: int
    metadata: dict[str, Any]
    version: int = Field(description="Increases on every change; send it back to edit the task.")
    lease_expires_at: datetime | None
    run_after: datetime | None
    idempotency_key: str | None
    depends_on: list[str] = Field(description="Tasks that must complete before this one runs.")
    blocked_by: list[str] = Field(description="Those of depends_on not COMPLETED yet.")
    require_review: bool = Field(description="A completion waits IN_REVIEW for approval.")
    review_feedback: str | None = Field(description="The last rejection's feedback.")
    progress: float | None = Field(
        default=None, description="How far the holder got, from 0 to 1, as it last reported."
    )
    progress_message: str | None = None
    log_line_count: int = Field(
        default=0, description="The number of the task's last log line; 0 when it has none."
    )

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        return cls(
            id=task.id,
            work_directory=task.work_directory,
            prompt=task.prompt,
            priority=task.priority.value,
            tags=list(task.tags),
            status=task.status.value,
            worker_id=task.worker_id,
            created_at=task.created_at,
            started_at=task.started_at,
            completed_at=task.completed_at,
            updated_at=task.updated_at,
            result=task.result,
            error_message=task.error_message,
            retry_count=task.retry_count,
            max_retries=task.max_retries,
            metadata=task.metadata,
            version=task.version,
            lease_expires_at=task.lease_expires_at,
            run_after=task.run_after,
            idempotency_key=task.idempotency_key,
            depends_on=list(task.depends_on),
            blocked_by=list(task.blocked_by),
            require_review=task.require_review,
            review_feedback=task.review_feedback,
            progress=task.progress,
            progress_message=task.progress_message,
            log_line_count=task.log_line_count,
        )


class NoTask(BaseModel):
    """What a claim answers when nothing is claimable: an object whose `task` is null."""

    model_config = ConfigDict(extra="forbid")

    task: None = Field(default=None, description="Always null: no task was claimable.")


class NextTask(RootModel[TaskOut | NoTask]):
    """A claim's answer: the claimed task (with `id` at the top level), or `{"task": null}`."""

    # MCP requires an object at the root of a tool's output schema.
    model_config = ConfigDict(json_schema_extra={"type": "object"})

    @classmethod
    def of(cls, task: Task | None) -> NextTask:
        return cls(NoTask() if task is None else TaskOut.of(task))


class TaskList(BaseModel):
    """One page of tasks in submission order."""

    tasks: list[TaskOut]
    total: int = Field(description="How many tasks match the filters, over all pages.")
    limit: int
    offset: int
    has_more: bool = Field(
        description="True when a next page exists: ask again with offset + limit."
    )


class StatisticsOut(BaseModel):
    """How many tasks are in each status."""

    total: int
    waiting: int
    working: int
    completed: int
    failed: int
    cancelled: int
    blocked: int
    in_review: int

    @classmethod
    def of(cls, stats: Statistics) -> StatisticsOut:
        return cls(**stats.summary())


class WorkDirectoryOut(BaseModel):
    """A work directory: its controls and how many of its tasks are in each status."""

    work_directory: str
    max_working: int | None = Field(
        description="At most this many tasks WORKING at once; null: no cap."
    )
    paused: bool = Field(description="A paused directory hands out no task.")
    configured: bool = Field(description="False for a directory nobody configured.")
    updated_at: datetime | None
    waiting: int
    working: int
    completed: int
    failed: int
    cancelled: int
    total: int

    @classmethod
    def of(cls, directory: WorkDirectory) -> WorkDirectoryOut:
        return cls(
            work_directory=directory.work_directory,
            max_working=directory.max_working,
            paused=directory.paused,
            configured=directory.configured,
            updated_at=directory.updated_at,
            waiting=directory.waiting,
            working=directory.working,
            completed=directory.completed,
            failed=directory.failed,
            cancelled=directory.cancelled,
            total=directory.total,
        )


class WorkDirectoryList(BaseModel):
    """Every known work directory (configured, or holding tasks), by name."""

    work_directories: list[WorkDirectoryOut]


class BulkResultOut(BaseModel):
    """What a bulk change did: matched = changed + skipped. A skipped task changed meanwhile
    (claimed, finished, or no longer matching the filter) and was left as it was."""

    matched: int
    changed: int
    skipped: int
    changed_ids: list[str]
    skipped_ids: list[str]

    @classmethod
    def of(cls, result: BulkResult) -> BulkResultOut:
        return cls(
            matched=result.matched,
            changed=result.changed,
            skipped=result.skipped,
            changed_ids=list(result.changed_ids),
            skipped_ids=list(result.skipped_ids),
        )


class LogLineOut(BaseModel):
    line: int = Field(description="The line's number in its task's log, from 1.")
    text: str
    at: datetime


class LogPage(BaseModel):
    """One page of a task's log, in line order."""

    lines: list[LogLineOut]
    last_line: int = Field(
        description="The number of the last line on this page (or `after` when it is empty):"
        " pass it as `after` for the next page."
    )
    has_more: bool = Field(description="True when more lines follow this page.")

    @classmethod
    def of(cls, lines: list[TaskLogLine], after: int, more: bool) -> LogPage:
        return cls(
            lines=[LogLineOut(line=n.line, text=n.text, at=n.at) for n in lines],
            last_line=lines[-1].line if lines else after,
            has_more=more,
        )


class AppendedLog(BaseModel):
    """What an append answers."""

    last_line: int = Field(
        description="The number of the last line stored: a reader continues with after=last_line."
    )
