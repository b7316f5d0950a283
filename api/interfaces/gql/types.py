"""GraphQL object and input types. Domain objects are served as they are: their attributes carry
every field under the same name, and Strawberry's default resolvers read attributes, so no copy."""

from __future__ import annotations

from datetime import datetime
from typing import cast

import strawberry
from strawberry.scalars import JSON

from api.core import domain, validation
from api.core.domain import TaskPriority, TaskStatus
from api.interfaces.gql.context import Info

# The domain enums serve as the GraphQL enums (registering returns the same class).
strawberry.enum(TaskStatus, name="TaskStatus")
strawberry.enum(TaskPriority, name="TaskPriority")


@strawberry.type(name="Task")
class TaskType:
    id: strawberry.ID
    work_directory: str
    prompt: str
    priority: TaskPriority
    tags: list[str]
    status: TaskStatus
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    result: JSON | None
    error_message: str | None
    retry_count: int
    max_retries: int
    metadata: JSON
    version: int
    lease_expires_at: datetime | None
    run_after: datetime | None
    idempotency_key: str | None
    depends_on: list[strawberry.ID] = strawberry.field(
        description="The tasks that must complete before this one can be claimed."
    )
    blocked_by: list[strawberry.ID] = strawberry.field(
        description="Those of dependsOn that are not COMPLETED yet."
    )
    require_review: bool = strawberry.field(
        description="A completion waits IN_REVIEW until approveTask (or rejectTask)."
    )
    review_feedback: str | None = strawberry.field(
        description="The feedback of the last rejectTask, for the next attempt."
    )
    progress: float | None = strawberry.field(
        description="How far the holder got, from 0 to 1, as it last reported (reportProgress);"
        " null until it reports. A new claim starts it again at null."
    )
    progress_message: str | None = strawberry.field(
        description="What the holder said it is doing, with its last progress report."
    )
    log_line_count: int = strawberry.field(
        description="The number of the task's last log line; 0 when it has none."
    )

    @strawberry.field(description="Every status change of this task, oldest first.")
    async def history(self, info: Info) -> list[TaskEventType]:
        events = await info.context.service.history(cast(domain.Task, self).id)
        return [as_event(e) for e in events]

    @strawberry.field(
        description="A page of the task's log: up to `first` (at most 1,000) lines numbered"
        " above `after`, in order; pass the page's lastLine as the next `after`."
    )
    async def logs(self, info: Info, after: int | None = 0, first: int = 100) -> TaskLogConnection:
        lines, more = await info.context.service.log_page(cast(domain.Task, self).id, after, first)
        return TaskLogConnection(
            lines=[as_log_line(line) for line in lines],
            last_line=lines[-1].line if lines else after,
            has_next_page=more,
        )


@strawberry.type(name="TaskLogLine")
class TaskLogLineType:
    line: int = strawberry.field(description="The line's number in its task's log, from 1.")
    text: str
    at: datetime = strawberry.field(description="When the line was stored.")


@strawberry.type
class TaskLogConnection:
    lines: list[TaskLogLineType]
    last_line: int | None = strawberry.field(
        description="The number of the last line on this page (or `after` when it is empty):"
        " pass it as `after` for the next page."
    )
    has_next_page: bool


@strawberry.type(name="TaskEvent")
class TaskEventType:
    id: strawberry.ID
    task_id: strawberry.ID
    status: TaskStatus
    previous_status: TaskStatus | None
    worker_id: str | None
    at: datetime
    details: JSON
    work_directory: str

    @strawberry.field(description="The task as it is now.")
    async def task(self, info: Info) -> TaskType:
        return as_task(await info.context.service.get(cast(domain.TaskEvent, self).task_id))


def as_task(task: domain.Task) -> TaskType:
    return cast(TaskType, task)


def as_event(event: domain.TaskEvent) -> TaskEventType:
    return cast(TaskEventType, event)


def as_log_line(line: domain.TaskLogLine) -> TaskLogLineType:
    return cast(TaskLogLineType, line)


@strawberry.input
class SubmitTaskInput:
    work_directory: str
    prompt: str
    priority: TaskPriority | None = TaskPriority.MEDIUM
    tags: list[str] | None = None
    max_retries: int | None = domain.DEFAULT_MAX_RETRIES
    metadata: JSON | None = None
    idempotency_key: str | None = None
    run_after: datetime | None = None
    depends_on: list[strawberry.ID] | None = strawberry.field(
        default=None,
        description="Existing tasks (at most 100) that must complete first; until then this one "
        "is BLOCKED. If one ends FAILED or CANCELLED, this one is cancelled. Repeats count once.",
    )
    require_review: bool | None = strawberry.field(
        default=False,
        description="Completing it moves it to IN_REVIEW; approveTask completes it.",
    )

    def to_spec(self, prefix: str = "") -> domain.TaskSpec:
        return validation.task_spec(
            work_directory=self.work_directory,
            prompt=self.prompt,
            priority=self.priority,
            tags=self.tags,
            max_retries=self.max_retries,
            metadata=self.metadata,
            idempotency_key=self.idempotency_key,
            run_after=self.run_after,
            depends_on=self.depends_on,
            require_review=self.require_review,
            prefix=prefix,
        )


@strawberry.input
class UpdateTaskInput:
    prompt: str | None = None
    priority: TaskPriority | None = None
    tags: list[str] | None = None
    metadata: JSON | None = None
    max_retries: int | None = None

    def to_changes(self) -> domain.TaskChanges:
        return validation.task_changes(
            prompt=self.prompt,
            priority=self.priority,
            tags=self.tags,
            metadata=self.metadata,
            max_retries=self.max_retries,
        )


@strawberry.input
class CompleteItem:
    id: strawberry.ID
    result: JSON | None = None


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class TaskEdge:
    node: TaskType
    cursor: str


@strawberry.type
class TaskConnection:
    edges: list[TaskEdge]
    page_info: PageInfo
    total_count: int


@strawberry.type(name="Statistics")
class StatisticsType:
    total: int
    waiting: int
    working: int
    completed: int
    failed: int
    cancelled: int
    blocked: int
    in_review: int


@strawberry.input
class EventFilterInput:
    task_id: strawberry.ID | None = None
    work_directory: str | None = None
    statuses: list[TaskStatus] | None = None


@strawberry.type
class EventConnection:
    events: list[TaskEventType]
    last_id: strawberry.ID | None = strawberry.field(
        description="The id of the last event on this page: pass it as `after` for the next page."
    )
    has_next_page: bool


@strawberry.input(description="Which tasks: every field given must match.")
class TaskFilterInput:
    statuses: list[TaskStatus] | None = None
    work_directory: str | None = None
    priority: TaskPriority | None = None
    tag: str | None = None
    created_before: datetime | None = strawberry.field(
        default=None, description="Only tasks created strictly before this instant."
    )
    created_after: datetime | None = strawberry.field(
        default=None, description="Only tasks created strictly after this instant."
    )

    def to_filter(self, prefix: str = "filter.") -> domain.TaskFilter:
        return validation.task_filter(
            statuses=self.statuses or (),
            work_directory=self.work_directory,
            priority=self.priority,
            tag=self.tag,
            created_before=self.created_before,
            created_after=self.created_after,
            prefix=prefix,
        )


@strawberry.type(
    name="WorkDirectory",
    description="A work directory: its controls and how many of its tasks are in each status.",
)
class WorkDirectoryType:
    work_directory: str
    max_working: int | None = strawberry.field(
        description="At most this many tasks WORKING at once; null: no cap."
    )
    paused: bool = strawberry.field(description="A paused directory hands out no task.")
    configured: bool = strawberry.field(
        description="False for a directory nobody configured (no cap, not paused)."
    )
    updated_at: datetime | None
    waiting: int
    working: int
    completed: int
    failed: int
    cancelled: int
    total: int


@strawberry.type(
    name="BulkResult",
    description="What a bulk change did. matched = changed + skipped; a skipped task changed "
    "meanwhile (claimed, finished, or no longer matching) and was left as it was.",
)
class BulkResultType:
    matched: int
    changed: int
    skipped: int
    changed_ids: list[strawberry.ID]
    skipped_ids: list[strawberry.ID]


def as_directory(directory: domain.WorkDirectory) -> WorkDirectoryType:
    return cast(WorkDirectoryType, directory)


def as_bulk(result: domain.BulkResult) -> BulkResultType:
    return cast(BulkResultType, result)
