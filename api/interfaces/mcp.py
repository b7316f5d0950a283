"""MCP tools over the task service for AI agents: Streamable HTTP at /mcp, and stdio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import INVALID_PARAMS, CallToolResult
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api import __version__
from api.core import validation
from api.core.domain import TaskFilter, TaskSpec
from api.core.errors import TaskorchError, internal_error
from api.core.service import TaskService
from api.interfaces.mcp_tasks import RunTaskOutcome, Tasks, launching, tool_result
from api.interfaces.models import (
    AppendedLog,
    BulkResultOut,
    LogPage,
    NextTask,
    StatisticsOut,
    TaskList,
    TaskOut,
    WorkDirectoryList,
    WorkDirectoryOut,
)
from api.security.auth import principal_of, require
from api.settings import MCP_PROFILES, Settings

log = logging.getLogger("taskorch.mcp")

T = TypeVar("T")

LOOPBACK = ("127.0.0.1", "localhost", "::1")

INSTRUCTIONS = (
    "taskorch is a durable task queue. A task is a prompt to run in a work directory."
    " Producers call create_task; workers call get_next_task for their work directory, do the"
    " work there, then complete_task or fail_task (and heartbeat meanwhile when the work takes"
    " longer than the lease; report_progress and append_task_log tell watchers how it goes)."
    " Inspect with get_task, get_task_logs, list_tasks and get_statistics. To hand work to a"
    " worker and get its result back, call run_task. A task created with depends_on stays"
    " BLOCKED until those tasks complete; one created with require_review waits IN_REVIEW after"
    " completion until a reviewer calls approve_task or reject_task."
)

# The tools each profile serves (`taskorch mcp --tools`, `/mcp/<profile>`): one table.
_WORKER = {"get_next_task", "heartbeat", "complete_task", "fail_task", "release_task", "get_task",
           "report_progress", "append_task_log"}  # fmt: skip
_PRODUCER = {"create_task", "run_task", "get_task", "list_tasks", "cancel_task", "retry_task",
             "get_statistics", "approve_task", "reject_task", "get_task_logs"}  # fmt: skip
_ADMIN = {"get_task", "list_tasks", "cancel_task", "retry_task", "get_statistics", "approve_task",
          "reject_task", "list_work_directories", "configure_work_directory", "cancel_tasks",
          "retry_tasks", "get_task_logs"}  # fmt: skip
PROFILES: dict[str, frozenset[str]] = {
    "worker": frozenset(_WORKER),
    "producer": frozenset(_PRODUCER),
    "admin": frozenset(_ADMIN),
    "all": frozenset(_WORKER | _PRODUCER | _ADMIN),
}
assert tuple(PROFILES) == MCP_PROFILES

Priority = Literal["LOW", "MEDIUM", "HIGH"]
Prompt = Annotated[str, Field(description="What to do, as you would tell an agent.")]
MaxRetries = Annotated[
    int | None, Field(description="Retries after a failure (default 3, max 100).")
]
Metadata = Annotated[
    dict[str, Any] | None, Field(description="Any JSON object to keep with the task.")
]
IdempotencyKey = Annotated[
    str | None,
    Field(description="Send the same key again and you get the same task, not a new one."),
]
DependsOn = Annotated[
    list[str] | None,
    Field(
        description="Ids of existing tasks (at most 100) that must complete first; until then the"
        " task is BLOCKED, and it is cancelled if one of them fails."
    ),
]
RequireReview = Annotated[
    bool | None,
    Field(description="True: its completion waits IN_REVIEW for approve_task."),
]
Status = Literal["BLOCKED", "WAITING", "WORKING", "IN_REVIEW", "COMPLETED", "FAILED", "CANCELLED"]
TaskId = Annotated[str, Field(description="The task id returned by create_task or get_next_task.")]
WorkerId = Annotated[
    str, Field(description="A stable name for you as a worker; use the same one for every call.")
]
WorkDirectory = Annotated[
    str, Field(description="Absolute path of the directory the task runs in, e.g. /srv/repo.")
]
CreatedBefore = Annotated[
    str | None, Field(description="Only tasks created before this ISO 8601 time.")
]
CreatedAfter = Annotated[
    str | None, Field(description="Only tasks created after this ISO 8601 time.")
]
LeaseSeconds = Annotated[
    int | None,
    Field(
        description="How long the task stays yours without a heartbeat (default 300, max 86400)."
    ),
]


async def _call(ctx: Context, operation: str, work: Callable[[], Awaitable[T]], *also: str) -> T:
    """Run service `operation` (which may need the scopes of the operations in `also` too); a
    client error becomes a tool error carrying the service's message."""
    try:
        request = ctx.request_context.request
        if request is not None:  # over stdio the caller is the local user, who holds the database
            for needed in (operation, *also):
                require(principal_of(request), needed)
        return await work()
    except TaskorchError as exc:
        raise ToolError(exc.message) from exc
    except ToolError:
        raise
    except Exception as exc:
        log.exception("unexpected error in an MCP tool")
        raise ToolError(internal_error().message) from exc


def build_mcp(service: Callable[[], TaskService], profile: str = "all") -> MCPServer:
    """The tools of `profile`, bound to `service()` (looked up per call: the app creates it at
    start-up), with the Tasks extension for run_task."""
    served = PROFILES[profile]
    server: MCPServer = MCPServer(
        "taskorch", version=__version__, instructions=INSTRUCTIONS, extensions=[Tasks(service)]
    )

    def tool(fn: Callable[..., Any]) -> Callable[..., Any]:
        if fn.__name__ in served:
            server.add_tool(fn)
        return fn

    @tool
    async def create_task(
        ctx: Context,
        work_directory: WorkDirectory,
        prompt: Prompt,
        priority: Priority | None = None,
        tags: list[str] | None = None,
        max_retries: MaxRetries = None,
        metadata: Metadata = None,
        idempotency_key: IdempotencyKey = None,
        depends_on: DependsOn = None,
        require_review: RequireReview = None,
    ) -> TaskOut:
        """Queue a new task: a prompt to run in a work directory. Use it to hand work to a worker.
        Returns the task, status WAITING (BLOCKED while depends_on tasks are unfinished); keep
        its id. Next: get_task or list_tasks to follow it."""

        def spec() -> TaskSpec:
            return validation.task_spec(
                work_directory=work_directory,
                prompt=prompt,
                priority=priority,
                tags=tags,
                max_retries=max_retries,
                metadata=metadata,
                idempotency_key=idempotency_key,
                depends_on=depends_on,
                require_review=require_review,
            )

        return TaskOut.of(await _call(ctx, "submit", lambda: service().submit(spec())))

    @tool
    async def get_next_task(
        ctx: Context,
        work_directory: WorkDirectory,
        worker_id: WorkerId,
        lease_seconds: LeaseSeconds = None,
        wait_seconds: Annotated[
            float | None,
            Field(description="Wait up to this long (max 60 s) for a task when none is queued."),
        ] = None,
    ) -> NextTask:
        """Claim the next task to work on in a work directory (highest priority, oldest first).
        The task becomes WORKING and yours until its lease ends; it is returned like every other
        tool returns a task, with `id` at the top level. When no task is claimable (after waiting
        up to wait_seconds) it returns {"task": null} instead. Next: do what its prompt says in its work_directory, then complete_task (or
        fail_task); call heartbeat before the lease ends if the work takes longer."""
        tasks = await _call(
            ctx,
            "claim",
            lambda: service().claim(
                work_directory, worker_id, lease_seconds=lease_seconds, wait_seconds=wait_seconds
            ),
        )
        return NextTask.of(tasks[0] if tasks else None)

    @tool
    async def complete_task(
        ctx: Context,
        task_id: TaskId,
        worker_id: WorkerId,
        result: Annotated[
            Any, Field(description='What you did, as JSON: e.g. {"summary": "..."}.')
        ] = None,
    ) -> TaskOut:
        """Mark a task you claimed with get_next_task as done, with its result. Next: call
        get_next_task again for more work."""
        return TaskOut.of(
            await _call(ctx, "complete", lambda: service().complete(task_id, worker_id, result))
        )

    @tool
    async def fail_task(
        ctx: Context,
        task_id: TaskId,
        worker_id: WorkerId,
        error: Annotated[str, Field(description="What went wrong, for whoever looks next.")],
        retry: Annotated[
            bool, Field(description="False when retrying cannot help (the task is at fault).")
        ] = True,
    ) -> TaskOut:
        """Report that a task you claimed could not be done. It goes back to the queue (after a
        backoff) while retries remain, unless retry is false; otherwise it ends FAILED. Next:
        get_next_task for other work."""
        return TaskOut.of(
            await _call(ctx, "fail", lambda: service().fail(task_id, worker_id, error, retry))
        )

    @tool
    async def heartbeat(
        ctx: Context, task_id: TaskId, worker_id: WorkerId, lease_seconds: LeaseSeconds = None
    ) -> TaskOut:
        """Tell the queue you are still working on a task you claimed, extending its lease by
        lease_seconds from now. Call it well before lease_expires_at while the work goes on; a
        task whose lease runs out goes back to the queue for someone else."""
        return TaskOut.of(
            await _call(
                ctx, "heartbeat", lambda: service().heartbeat(task_id, worker_id, lease_seconds)
            )
        )

    @tool
    async def release_task(ctx: Context, task_id: TaskId, worker_id: WorkerId) -> TaskOut:
        """Give a task you claimed back to the queue, untouched and without counting an
        attempt, e.g. when you are shutting down. Someone else can then claim it."""
        return TaskOut.of(
            await _call(ctx, "release", lambda: service().release(task_id, worker_id))
        )

    @tool
    async def run_task(
        ctx: Context,
        work_directory: WorkDirectory,
        prompt: Prompt,
        priority: Priority | None = None,
        tags: list[str] | None = None,
        max_retries: MaxRetries = None,
        metadata: Metadata = None,
        idempotency_key: IdempotencyKey = None,
        depends_on: DependsOn = None,
        require_review: RequireReview = None,
        timeout_seconds: Annotated[
            float | None,
            Field(description="Wait up to this long for the result (default and max 300 s)."),
        ] = None,
    ) -> Annotated[CallToolResult, RunTaskOutcome]:
        """Delegate a task to a worker and get its result: queues the prompt for the work
        directory and answers when a worker finishes it, with the worker's result (an error
        result if it failed or was cancelled). A client with the MCP Tasks extension gets a task
        handle at once and follows it with tasks/get. Otherwise the call waits up to
        timeout_seconds; if the task is still running then, the answer says so (finished:
        false) and the task goes on: follow it with get_task(task_id)."""

        def spec() -> TaskSpec:
            return validation.task_spec(
                work_directory=work_directory,
                prompt=prompt,
                priority=priority,
                tags=tags,
                max_retries=max_retries,
                metadata=metadata,
                idempotency_key=idempotency_key,
                depends_on=depends_on,
                require_review=require_review,
            )

        async def submit() -> CallToolResult:
            timeout = validation.check_run_timeout(timeout_seconds)
            launch = launching()
            if launch is not None:  # a Tasks client: answer with a handle, not the result
                launch.task, launch.handle = await service().submit_with_handle(
                    spec(), launch.owner
                )
                return tool_result(launch.task)
            task = await service().submit(spec())
            return tool_result(await service().wait_finished(task.id, timeout), timeout)

        return await _call(ctx, "submit", submit, "read")  # it reads the task back

    @tool
    async def report_progress(
        ctx: Context,
        task_id: TaskId,
        worker_id: WorkerId,
        progress: Annotated[
            float | None,
            Field(description="How much of the work is done, from 0 to 1 (0.5 is half)."),
        ] = None,
        message: Annotated[
            str | None, Field(description="What you are doing now, at most 1,000 characters.")
        ] = None,
        lease_seconds: LeaseSeconds = None,
    ) -> TaskOut:
        """Tell watchers how far you got with a task you claimed; a value you leave out keeps
        what you reported before. It also extends the lease like heartbeat, so calling it as you
        go is enough. Next: keep working, then complete_task or fail_task."""
        return TaskOut.of(
            await _call(
                ctx,
                "report_progress",
                lambda: service().report_progress(
                    task_id, worker_id, progress, message, lease_seconds
                ),
            )
        )

    @tool
    async def append_task_log(
        ctx: Context,
        task_id: TaskId,
        worker_id: WorkerId,
        lines: Annotated[
            list[str],
            Field(description="1 to 1,000 lines of output, each at most 8 KiB of UTF-8."),
        ],
    ) -> AppendedLog:
        """Add lines of output to the log of a task you claimed, for whoever follows it (they
        read it with get_task_logs). Send lines in batches rather than one call per line.
        Answers the number of the last line stored."""
        last = await _call(
            ctx, "append_log", lambda: service().append_logs(task_id, worker_id, lines)
        )
        return AppendedLog(last_line=last)

    @tool
    async def get_task_logs(
        ctx: Context,
        task_id: TaskId,
        after: Annotated[
            int, Field(description="Only lines numbered above this; 0 reads from the first.")
        ] = 0,
        limit: Annotated[int, Field(description="Lines per page, 1 to 1000.")] = 100,
    ) -> LogPage:
        """Read a task's log, oldest line first. To follow a running task, call again with
        after set to the last_line of the previous answer; has_more says whether more lines
        are stored already. The task's status (get_task) says whether more can come."""
        lines, more = await _call(ctx, "read", lambda: service().log_page(task_id, after, limit))
        return LogPage.of(lines, after, more)

    @tool
    async def get_task(ctx: Context, task_id: TaskId) -> TaskOut:
        """Look at one task: its status, result, error and who works on it. Use it to follow a task
        you created; it is finished when status is COMPLETED, FAILED or CANCELLED."""
        return TaskOut.of(await _call(ctx, "read", lambda: service().get(task_id)))

    @tool
    async def list_tasks(
        ctx: Context,
        status: Status | None = None,
        work_directory: WorkDirectory | None = None,
        tag: str | None = None,
        limit: Annotated[int, Field(description="Tasks per page, 1 to 1000.")] = 50,
        offset: Annotated[
            int, Field(description="Tasks to skip: offset + limit for the next page.")
        ] = 0,
    ) -> TaskList:
        """List tasks in submission order, optionally only one status, work directory or tag. Use it
        to find a task or see what is queued; has_more says whether to ask for the next page."""

        async def page() -> TaskList:
            where = validation.task_filter(
                statuses=() if status is None else (status,),
                work_directory=work_directory,
                tag=tag,
            )
            found = await service().list_page(where, limit, offset)
            tasks = [TaskOut.of(t) for t in found.tasks]
            return TaskList(
                tasks=tasks,
                total=found.total or 0,
                limit=limit,
                offset=offset,
                has_more=found.has_next,
            )

        return await _call(ctx, "read", page)

    @tool
    async def cancel_task(
        ctx: Context,
        task_id: TaskId,
        reason: Annotated[str | None, Field(description="Why, kept in the task's history.")] = None,
    ) -> TaskOut:
        """Cancel a task that is BLOCKED, WAITING, WORKING or IN_REVIEW, so nobody (else) works on
        it; tasks that depend on it are cancelled too. retry_task queues it again later."""
        return TaskOut.of(await _call(ctx, "cancel", lambda: service().cancel(task_id, reason)))

    @tool
    async def retry_task(ctx: Context, task_id: TaskId) -> TaskOut:
        """Queue a FAILED or CANCELLED task again, with a fresh retry budget. Next: get_task to
        follow it."""
        return TaskOut.of(await _call(ctx, "retry", lambda: service().retry(task_id)))

    @tool
    async def approve_task(
        ctx: Context,
        task_id: TaskId,
        note: Annotated[str | None, Field(description="Why, kept in the task's history.")] = None,
    ) -> TaskOut:
        """Accept the result of a task that is IN_REVIEW (its worker completed it and it requires
        a review): it becomes COMPLETED, and tasks that depend on it may run. Look at its result
        with get_task first; reject_task instead when it is not good enough."""
        return TaskOut.of(await _call(ctx, "approve", lambda: service().approve(task_id, note)))

    @tool
    async def reject_task(
        ctx: Context,
        task_id: TaskId,
        feedback: Annotated[
            str, Field(description="What is wrong: the next attempt is given this text.")
        ],
        retry: Annotated[
            bool, Field(description="False fails the task for good instead of another attempt.")
        ] = True,
    ) -> TaskOut:
        """Refuse the result of a task that is IN_REVIEW. It goes back to WAITING with your
        feedback in review_feedback (counted as a retry; FAILED once its retries are spent), or
        to FAILED when retry is false (tasks that depend on it are then cancelled)."""
        return TaskOut.of(
            await _call(ctx, "reject", lambda: service().reject(task_id, feedback, retry))
        )

    @tool
    async def get_statistics(
        ctx: Context, work_directory: WorkDirectory | None = None
    ) -> StatisticsOut:
        """Count tasks in each status, for all work directories or one. Use it to see how much
        work is queued or running before deciding to create or claim more."""
        return StatisticsOut.of(
            await _call(ctx, "read", lambda: service().statistics(work_directory))
        )

    @tool
    async def list_work_directories(
        ctx: Context, work_directory: WorkDirectory | None = None
    ) -> WorkDirectoryList:
        """List every known work directory (configured, or holding tasks) with its controls
        (max_working, paused) and how many tasks it has in each status, or only the one named.
        Use it before configure_work_directory, or to see why a directory hands out no task."""

        async def found() -> WorkDirectoryList:
            directories = await service().directories(work_directory)
            return WorkDirectoryList(work_directories=[WorkDirectoryOut.of(d) for d in directories])

        return await _call(ctx, "read", found)

    @tool
    async def configure_work_directory(
        ctx: Context,
        work_directory: WorkDirectory,
        max_working: Annotated[
            int | None,
            Field(
                description="At most this many tasks WORKING at once (1: one agent at a time);"
                " 0 removes the cap; leave it out to keep the current cap."
            ),
        ] = None,
        paused: Annotated[
            bool | None,
            Field(description="True stops the directory handing out tasks, false resumes it."),
        ] = None,
    ) -> WorkDirectoryOut:
        """Cap or pause a work directory (needs the admin scope). Claims then hand out nothing
        while it is paused, and never more WORKING tasks than max_working; waiting claims wake
        when it resumes or a place frees. Fields left out keep their value. Next:
        list_work_directories to check."""

        async def configured() -> WorkDirectoryOut:
            changes = validation.directory_changes(
                max_working=max_working, set_max_working=max_working is not None, paused=paused
            )
            return WorkDirectoryOut.of(await service().configure_directory(work_directory, changes))

        return await _call(ctx, "configure_work_directory", configured)

    def bulk_filter(
        statuses: list[str] | None,
        work_directory: str | None,
        tag: str | None,
        priority: str | None,
        created_before: str | None,
        created_after: str | None,
    ) -> TaskFilter:
        return validation.task_filter(
            statuses=statuses or (),
            work_directory=work_directory,
            tag=tag,
            priority=priority,
            created_before=created_before,
            created_after=created_after,
            prefix="filter.",
        )

    @tool
    async def cancel_tasks(
        ctx: Context,
        statuses: Annotated[
            list[Literal["BLOCKED", "WAITING", "WORKING", "IN_REVIEW"]] | None,
            Field(description="Only these statuses (default: all four)."),
        ] = None,
        work_directory: WorkDirectory | None = None,
        tag: str | None = None,
        priority: Priority | None = None,
        created_before: CreatedBefore = None,
        created_after: CreatedAfter = None,
        reason: Annotated[
            str | None, Field(description="Why, kept in each task's history.")
        ] = None,
    ) -> BulkResultOut:
        """Cancel every BLOCKED, WAITING, WORKING or IN_REVIEW task matching all the filters given,
        and the tasks that depend on them (needs the admin scope). At least one filter is
        required; to cancel everything, pass statuses ["BLOCKED", "WAITING", "WORKING",
        "IN_REVIEW"]. Returns how many matched and changed, and the ids changed and skipped
        (tasks that changed meanwhile). Next: retry_tasks undoes it."""

        async def cancelled() -> BulkResultOut:
            where = bulk_filter(
                list(statuses or ()), work_directory, tag, priority, created_before, created_after
            )
            return BulkResultOut.of(await service().cancel_many(where, reason))

        return await _call(ctx, "cancel_tasks", cancelled)

    @tool
    async def retry_tasks(
        ctx: Context,
        statuses: Annotated[
            list[Literal["FAILED", "CANCELLED"]] | None,
            Field(description="Only these statuses (default both)."),
        ] = None,
        work_directory: WorkDirectory | None = None,
        tag: str | None = None,
        priority: Priority | None = None,
        created_before: CreatedBefore = None,
        created_after: CreatedAfter = None,
    ) -> BulkResultOut:
        """Queue again every FAILED or CANCELLED task matching all the filters given, with fresh
        retries (needs the admin scope). At least one filter is required; to retry everything,
        pass statuses ["FAILED", "CANCELLED"]. Next: list_tasks to follow them."""

        async def retried() -> BulkResultOut:
            where = bulk_filter(
                list(statuses or ()), work_directory, tag, priority, created_before, created_after
            )
            return BulkResultOut.of(await service().retry_many(where))

        return await _call(ctx, "retry_tasks", retried)

    return server


def http_routes(servers: Mapping[str, MCPServer], default: str, settings: Settings) -> list[Route]:
    """The MCP endpoints: `/mcp/<profile>` for each profile's server, and `/mcp`, which serves
    the profile named by its `tools` query parameter (`/mcp?tools=worker`), else `default`.
    Stateless, with JSON answers: any replica answers any request."""
    apps: dict[str, ASGIApp] = {}
    for profile, server in servers.items():
        app = server.streamable_http_app(
            streamable_http_path=f"/mcp/{profile}",
            stateless_http=True,
            json_response=True,
            transport_security=transport_security(settings),
        )
        (route,) = [r for r in app.routes if isinstance(r, Route)]
        apps[profile] = route.app
    by_query = _ByQuery(apps, default)
    return [Route("/mcp", by_query), *(Route(f"/mcp/{p}", app) for p, app in apps.items())]


class _ByQuery:
    """`/mcp`: hands each request to the server of the profile its `tools` parameter names.
    (A query rather than only a path: some clients keep a URL only when it ends in /mcp.)"""

    def __init__(self, apps: Mapping[str, ASGIApp], default: str) -> None:
        self.apps = apps
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        profile = Request(scope).query_params.get("tools", self.default)
        app = self.apps.get(profile)
        if app is None:
            message = f"tools must be one of {', '.join(self.apps)}, not {profile!r}"
            error = {"code": INVALID_PARAMS, "message": message, "data": {"field": "tools"}}
            body = {"jsonrpc": "2.0", "id": None, "error": error}
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return
        await app(scope, receive, send)


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """Refuse other Host headers when serving loopback only (DNS rebinding); open otherwise, where
    API keys guard the endpoint like every other route."""
    if settings.host in LOOPBACK:
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


@contextlib.asynccontextmanager
async def http_sessions(server: MCPServer) -> AsyncIterator[None]:
    """Run the HTTP transport's session manager for the duration of the app.

    It holds an anyio task group, which must be left by the task that entered it; a lifespan can
    be entered and left by different tasks (test harnesses do), so the group lives in a task of
    its own."""
    ready, done = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with server.session_manager.run():
            ready.set()
            await done.wait()

    holder = asyncio.create_task(hold())
    started = asyncio.create_task(ready.wait())
    await asyncio.wait({holder, started}, return_when=asyncio.FIRST_COMPLETED)
    if holder.done():
        started.cancel()
        holder.result()  # raises what stopped it
    try:
        yield
    finally:
        done.set()
        await holder
