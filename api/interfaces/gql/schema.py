"""The GraphQL schema: thin resolvers that call one service method each and map the result."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Iterable
from typing import Any, TypeVar

import strawberry
from graphql import FieldNode, FragmentSpreadNode, GraphQLError
from starlette.requests import Request
from strawberry.extensions import ParserCache, ValidationCache
from strawberry.scalars import JSON

from api.core import validation
from api.core.domain import Completion, EventFilter, TaskPriority, TaskStatus
from api.core.errors import ValidationError
from api.core.service import encode_cursor
from api.interfaces.disconnect import unless_disconnected
from api.interfaces.gql.context import Info
from api.interfaces.gql.errors import classify
from api.interfaces.gql.security import ScopeCheck
from api.interfaces.gql.types import (
    BulkResultType,
    CompleteItem,
    EventConnection,
    EventFilterInput,
    PageInfo,
    StatisticsType,
    SubmitTaskInput,
    TaskConnection,
    TaskEdge,
    TaskEventType,
    TaskFilterInput,
    TaskLogLineType,
    TaskType,
    UpdateTaskInput,
    WorkDirectoryType,
    as_bulk,
    as_directory,
    as_event,
    as_log_line,
    as_task,
)
from api.ops.metrics import OperationName

T = TypeVar("T")


@strawberry.type
class Query:
    @strawberry.field(description="One task by id, or null when there is none.")
    async def task(self, info: Info, id: strawberry.ID) -> TaskType | None:
        task = await info.context.service.find(id)
        return None if task is None else as_task(task)

    @strawberry.field(description="Tasks in submission order, filtered; page with first/after.")
    async def tasks(
        self,
        info: Info,
        status: list[TaskStatus] | None = None,
        work_directory: str | None = None,
        priority: TaskPriority | None = None,
        tag: str | None = None,
        first: int = 50,
        after: str | None = None,
        filter: TaskFilterInput | None = None,
    ) -> TaskConnection:
        if filter is None:
            where = validation.task_filter(
                statuses=status or (), work_directory=work_directory, priority=priority, tag=tag
            )
        elif status or work_directory is not None or priority is not None or tag is not None:
            raise ValidationError(
                "filter", "give the filter either as `filter` or as separate arguments, not both"
            )
        else:
            where = filter.to_filter()
        page = await info.context.service.list_tasks(
            where, first, after, count=_selects(info, "totalCount")
        )
        edges = [TaskEdge(node=as_task(t), cursor=encode_cursor(t.seq)) for t in page.tasks]
        return TaskConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None
            ),
            total_count=0 if page.total is None else page.total,  # None: not selected
        )

    @strawberry.field(
        description="Stored status changes in event-id order, paged: up to `first` (at most "
        "1,000) with an id above `after`; pass the page's lastId as the next `after`."
    )
    async def events(
        self,
        info: Info,
        after: strawberry.ID | None = None,
        first: int = 100,
        filter: EventFilterInput | None = None,
    ) -> EventConnection:
        where = EventFilterInput() if filter is None else filter
        events, more = await info.context.service.event_page(
            _event_filter(where.task_id, where.work_directory, where.statuses),
            first,
            _event_id(after) or 0,
        )
        return EventConnection(
            events=[as_event(e) for e in events],
            last_id=strawberry.ID(str(events[-1].id)) if events else after,
            has_next_page=more,
        )

    @strawberry.field(
        description="Every known work directory (configured, or holding tasks) with its controls "
        "and counts, by name; `workDirectory` asks for one."
    )
    async def work_directories(
        self, info: Info, work_directory: str | None = None
    ) -> list[WorkDirectoryType]:
        found = await info.context.service.directories(work_directory)
        return [as_directory(d) for d in found]

    @strawberry.field(description="How many tasks are in each status.")
    async def statistics(self, info: Info, work_directory: str | None = None) -> StatisticsType:
        stats = await info.context.service.statistics(work_directory)
        return StatisticsType(**stats.summary())


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue one task. An existing idempotencyKey returns its task.")
    async def submit_task(self, info: Info, input: SubmitTaskInput) -> TaskType:
        return as_task(await info.context.service.submit(input.to_spec()))

    @strawberry.mutation(description="Queue up to 1,000 tasks in one transaction: all or none.")
    async def submit_tasks(self, info: Info, inputs: list[SubmitTaskInput]) -> list[TaskType]:
        validation.check_batch(inputs, "inputs")
        specs = [item.to_spec(f"inputs[{i}].") for i, item in enumerate(inputs)]
        return [as_task(t) for t in await info.context.service.submit_many(specs)]

    @strawberry.mutation(
        description="Claim the next task of a work directory, or null when none is claimable. "
        "waitSeconds (at most 60) waits for one to arrive."
    )
    async def claim_task(
        self,
        info: Info,
        work_directory: str,
        worker_id: str,
        lease_seconds: int | None = None,
        wait_seconds: float | None = None,
    ) -> TaskType | None:
        tasks = await _unless_disconnected(
            info,
            info.context.service.claim(
                work_directory, worker_id, lease_seconds=lease_seconds, wait_seconds=wait_seconds
            ),
            bool(wait_seconds),
        )
        return as_task(tasks[0]) if tasks else None

    @strawberry.mutation(description="Claim up to `limit` (at most 1,000) tasks at once.")
    async def claim_tasks(
        self,
        info: Info,
        work_directory: str,
        worker_id: str,
        limit: int,
        lease_seconds: int | None = None,
        wait_seconds: float | None = None,
    ) -> list[TaskType]:
        tasks = await _unless_disconnected(
            info,
            info.context.service.claim(
                work_directory,
                worker_id,
                limit=limit,
                lease_seconds=lease_seconds,
                wait_seconds=wait_seconds,
            ),
            bool(wait_seconds),
        )
        return [as_task(t) for t in tasks or []]

    @strawberry.mutation(description="Extend the lease of a task you hold.")
    async def heartbeat(
        self, info: Info, id: strawberry.ID, worker_id: str, lease_seconds: int | None = None
    ) -> TaskType:
        return as_task(await info.context.service.heartbeat(id, worker_id, lease_seconds))

    @strawberry.mutation(
        description="Report how far a task you hold got (progress from 0 to 1) and what it is "
        "doing (message, at most 1,000 characters); a null leaves the stored value. Extends the "
        "lease like heartbeat."
    )
    async def report_progress(
        self,
        info: Info,
        id: strawberry.ID,
        worker_id: str,
        progress: float | None = None,
        message: str | None = None,
        lease_seconds: int | None = None,
    ) -> TaskType:
        return as_task(
            await info.context.service.report_progress(
                id, worker_id, progress, message, lease_seconds
            )
        )

    @strawberry.mutation(
        description="Append 1 to 1,000 lines (each at most 8 KiB of UTF-8) to the log of a task "
        "you hold. Returns the number of the last line stored: lines are numbered per task from 1."
    )
    async def append_task_log(
        self, info: Info, id: strawberry.ID, worker_id: str, lines: list[str]
    ) -> int:
        return await info.context.service.append_logs(id, worker_id, lines)

    @strawberry.mutation(description="Mark a task you hold as done, with its result.")
    async def complete_task(
        self, info: Info, id: strawberry.ID, worker_id: str, result: JSON | None = None
    ) -> TaskType:
        return as_task(await info.context.service.complete(id, worker_id, result))

    @strawberry.mutation(description="Complete several tasks you hold: all or none.")
    async def complete_tasks(
        self, info: Info, worker_id: str, items: list[CompleteItem]
    ) -> list[TaskType]:
        completions = [Completion(str(item.id), item.result) for item in items]
        return [
            as_task(t) for t in await info.context.service.complete_many(worker_id, completions)
        ]

    @strawberry.mutation(
        description="Report that a task you hold failed. It is retried with backoff while retries "
        "remain, unless retry is false."
    )
    async def fail_task(
        self, info: Info, id: strawberry.ID, worker_id: str, error: str, retry: bool = True
    ) -> TaskType:
        return as_task(await info.context.service.fail(id, worker_id, error, retry))

    @strawberry.mutation(description="Give a task you hold back to the queue, counting no attempt.")
    async def release_task(self, info: Info, id: strawberry.ID, worker_id: str) -> TaskType:
        return as_task(await info.context.service.release(id, worker_id))

    @strawberry.mutation(
        description="Accept the result of a task IN_REVIEW: it becomes COMPLETED and its "
        "dependents may run. Needs the review scope."
    )
    async def approve_task(
        self, info: Info, id: strawberry.ID, note: str | None = None
    ) -> TaskType:
        return as_task(await info.context.service.approve(id, note))

    @strawberry.mutation(
        description="Refuse the result of a task IN_REVIEW: it goes back to WAITING with "
        "reviewFeedback (one retry counted; FAILED once retries are spent), or to FAILED when "
        "retry is false. Needs the review scope."
    )
    async def reject_task(
        self, info: Info, id: strawberry.ID, feedback: str, retry: bool | None = True
    ) -> TaskType:
        return as_task(await info.context.service.reject(id, feedback, retry is not False))

    @strawberry.mutation(description="Cancel a BLOCKED, WAITING, WORKING or IN_REVIEW task.")
    async def cancel_task(
        self, info: Info, id: strawberry.ID, reason: str | None = None
    ) -> TaskType:
        return as_task(await info.context.service.cancel(id, reason))

    @strawberry.mutation(description="Queue a FAILED or CANCELLED task again, with fresh retries.")
    async def retry_task(self, info: Info, id: strawberry.ID) -> TaskType:
        return as_task(await info.context.service.retry(id))

    @strawberry.mutation(
        description="Cancel every BLOCKED, WAITING, WORKING or IN_REVIEW task the filter matches "
        "(admin), and their dependents. An empty filter is refused: to cancel every task, give "
        "statuses [BLOCKED, WAITING, WORKING, IN_REVIEW]."
    )
    async def cancel_tasks(
        self, info: Info, filter: TaskFilterInput, reason: str | None = None
    ) -> BulkResultType:
        return as_bulk(await info.context.service.cancel_many(filter.to_filter(), reason))

    @strawberry.mutation(
        description="Queue again every FAILED or CANCELLED task the filter matches (admin). An "
        "empty filter is refused: to retry every task, give statuses [FAILED, CANCELLED]."
    )
    async def retry_tasks(self, info: Info, filter: TaskFilterInput) -> BulkResultType:
        return as_bulk(await info.context.service.retry_many(filter.to_filter()))

    @strawberry.mutation(
        description="Set a work directory's controls (admin): maxWorking caps its WORKING tasks "
        "(null or 0: no cap; 1: one agent at a time), paused stops it handing out tasks. An "
        "argument left out keeps its value. Waiting claims wake on every replica."
    )
    async def configure_work_directory(
        self,
        info: Info,
        work_directory: str,
        max_working: int | None = strawberry.UNSET,
        paused: bool | None = strawberry.UNSET,
    ) -> WorkDirectoryType:
        changes = validation.directory_changes(
            max_working=None if max_working is strawberry.UNSET else max_working,
            set_max_working=max_working is not strawberry.UNSET,
            paused=None if paused is strawberry.UNSET else paused,
        )
        found = await info.context.service.configure_directory(work_directory, changes)
        return as_directory(found)

    @strawberry.mutation(
        description="Edit a WAITING or BLOCKED task whose version is still expectedVersion."
    )
    async def update_task(
        self, info: Info, id: strawberry.ID, expected_version: int, input: UpdateTaskInput
    ) -> TaskType:
        changes = input.to_changes()
        return as_task(await info.context.service.update(id, expected_version, changes))


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="Status changes as they happen, in event-id order. `after` replays stored "
        "events with a greater id first, so a client that reconnects with the last id it saw "
        "misses nothing."
    )
    async def task_events(
        self,
        info: Info,
        task_id: strawberry.ID | None = None,
        work_directory: str | None = None,
        statuses: list[TaskStatus] | None = None,
        after: strawberry.ID | None = None,
    ) -> AsyncGenerator[TaskEventType, None]:
        where = _event_filter(task_id, work_directory, statuses)
        stream = info.context.service.events(where, _event_id(after))
        try:
            async for event in stream:
                info.context.delivered = event.id
                yield as_event(event)
        finally:
            await stream.aclose()

    @strawberry.subscription(
        description="A task's log lines: the stored ones numbered above `after` (default 0: "
        "all), then new ones as they are appended, each once, in order. Completes when the task "
        "is COMPLETED, FAILED or CANCELLED and every line it got has been sent."
    )
    async def task_logs(
        self, info: Info, task_id: strawberry.ID, after: int | None = None
    ) -> AsyncGenerator[TaskLogLineType, None]:
        stream = info.context.service.logs(task_id, after)
        try:
            async for line in stream:
                yield as_log_line(line)
        finally:
            await stream.aclose()


def _event_filter(
    task_id: str | None, work_directory: str | None, statuses: list[TaskStatus] | None
) -> EventFilter:
    return EventFilter(
        task_id=None if task_id is None else validation.check_task_id(task_id, "task_id"),
        work_directory=None
        if work_directory is None
        else validation.check_work_directory(work_directory),
        statuses=tuple(statuses or ()),
    )


def _selects(info: Info, name: str) -> bool:
    """Whether the field being resolved selects the field `name` of its type, directly or through
    fragments. Directives are not evaluated: a field that @skip may leave out counts as selected."""
    raw = info._raw_info

    def found(selections: Iterable[Any]) -> bool:
        for node in selections:
            if isinstance(node, FieldNode):
                if node.name.value == name:
                    return True
                continue
            if isinstance(node, FragmentSpreadNode):  # the document validated: it is defined
                node = raw.fragments[node.name.value]
            if node.selection_set is not None and found(node.selection_set.selections):
                return True
        return False

    return any(
        field.selection_set is not None and found(field.selection_set.selections)
        for field in raw.field_nodes
    )


def _event_id(value: str | None) -> int | None:
    return None if value is None else validation.check_event_id(value, "after")


async def _unless_disconnected(info: Info, work: Awaitable[T], waits: bool) -> T | None:
    """Waiting claims over HTTP end when their client goes away; other calls just run."""
    request = info.context.request
    if not waits or not isinstance(request, Request):
        return await work
    return await unless_disconnected(request, work)


class Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        # Every error path (parse, validation, execution, subscriptions) passes through here.
        for error in errors:
            classify(error)


def build_schema(guards: Iterable[Any] = ()) -> strawberry.Schema:
    """The schema; every operation's root fields are checked against the caller's scopes."""
    return Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[ParserCache, ValidationCache, OperationName, ScopeCheck, *guards],
    )
