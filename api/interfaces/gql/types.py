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
