"""MCP tools over the task service for AI agents: Streamable HTTP at /mcp, and stdio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field

from api import __version__
from api.core import validation
from api.core.domain import TaskSpec
from api.core.errors import TaskorchError, internal_error
from api.core.service import TaskService
from api.interfaces.models import (
    AppendedLog,
    LogPage,
    NextTask,
    StatisticsOut,
    TaskList,
    TaskOut,
)
from api.security.auth import principal_of, require
from api.settings import Settings

log = logging.getLogger("taskorch.mcp")

T = TypeVar("T")

LOOPBACK = ("127.0.0.1", "localhost", "::1")

INSTRUCTIONS = (
    "taskorch is a durable task queue. A task is a prompt to run in a work directory."
    " Producers call create_task; workers call get_next_task for their work directory, do the"
    " work there, then complete_task or fail_task (and heartbeat meanwhile when the work takes"
    " longer than the lease; report_progress and append_task_log tell watchers how it goes)."
    " Inspect with get_task, get_task_logs, list_tasks and get_statistics."
)

Priority = Literal["LOW", "MEDIUM", "HIGH"]
Status = Literal["WAITING", "WORKING", "COMPLETED", "FAILED", "CANCELLED"]
TaskId = Annotated[str, Field(description="The task id returned by create_task or get_next_task.")]
WorkerId = Annotated[
    str, Field(description="A stable name for you as a worker; use the same one for every call.")
]
WorkDirectory = Annotated[
    str, Field(description="Absolute path of the directory the task runs in, e.g. /srv/repo.")
]
LeaseSeconds = Annotated[
    int | None,
    Field(
        description="How long the task stays yours without a heartbeat (default 300, max 86400)."
    ),
]


async def _call(ctx: Context, operation: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run service `operation`; a client error becomes a tool error carrying the service's message."""
    try:
        request = ctx.request_context.request
        if request is not None:  # over stdio the caller is the local user, who holds the database
            require(principal_of(request), operation)
        return await work()
    except TaskorchError as exc:
        raise ToolError(exc.message) from exc
    except ToolError:
        raise
    except Exception as exc:
        log.exception("unexpected error in an MCP tool")
        raise ToolError(internal_error().message) from exc


def build_mcp(service: Callable[[], TaskService]) -> MCPServer:
    """The tools, bound to `service()` (looked up per call: the app creates it at start-up)."""
    server: MCPServer = MCPServer("taskorch", version=__version__, instructions=INSTRUCTIONS)

    @server.tool()
    async def create_task(
        ctx: Context,
        work_directory: WorkDirectory,
        prompt: Annotated[str, Field(description="What to do, as you would tell an agent.")],
        priority: Priority | None = None,
        tags: list[str] | None = None,
        max_retries: Annotated[
            int | None, Field(description="Retries after a failure (default 3, max 100).")
        ] = None,
        metadata: Annotated[
            dict[str, Any] | None, Field(description="Any JSON object to keep with the task.")
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Field(description="Send the same key again and you get the same task, not a new one."),
        ] = None,
    ) -> TaskOut:
        """Queue a new task: a prompt to run in a work directory. Use it to hand work to a worker.
        Returns the task, status WAITING; keep its id. Next: get_task or list_tasks to follow it."""

        def spec() -> TaskSpec:
            return validation.task_spec(
                work_directory=work_directory,
                prompt=prompt,
                priority=priority,
                tags=tags,
                max_retries=max_retries,
                metadata=metadata,
                idempotency_key=idempotency_key,
            )

        return TaskOut.of(await _call(ctx, "submit", lambda: service().submit(spec())))

    @server.tool()
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

    @server.tool()
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

    @server.tool()
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

    @server.tool()
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

    @server.tool()
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

    @server.tool()
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

    @server.tool()
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

    @server.tool()
    async def get_task(ctx: Context, task_id: TaskId) -> TaskOut:
        """Look at one task: its status, result, error and who works on it. Use it to follow a task
        you created; it is finished when status is COMPLETED, FAILED or CANCELLED."""
        return TaskOut.of(await _call(ctx, "read", lambda: service().get(task_id)))

    @server.tool()
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
                tasks=tasks, total=found.total, limit=limit, offset=offset, has_more=found.has_next
            )

        return await _call(ctx, "read", page)

    @server.tool()
    async def cancel_task(
        ctx: Context,
        task_id: TaskId,
        reason: Annotated[str | None, Field(description="Why, kept in the task's history.")] = None,
    ) -> TaskOut:
        """Cancel a task that is WAITING or WORKING, so nobody (else) works on it. retry_task
        queues it again later."""
        return TaskOut.of(await _call(ctx, "cancel", lambda: service().cancel(task_id, reason)))

    @server.tool()
    async def retry_task(ctx: Context, task_id: TaskId) -> TaskOut:
        """Queue a FAILED or CANCELLED task again, with a fresh retry budget. Next: get_task to
        follow it."""
        return TaskOut.of(await _call(ctx, "retry", lambda: service().retry(task_id)))

    @server.tool()
    async def get_statistics(
        ctx: Context, work_directory: WorkDirectory | None = None
    ) -> StatisticsOut:
        """Count tasks in each status, for all work directories or one. Use it to see how much
        work is queued or running before deciding to create or claim more."""
        return StatisticsOut.of(
            await _call(ctx, "read", lambda: service().statistics(work_directory))
        )

    return server


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
