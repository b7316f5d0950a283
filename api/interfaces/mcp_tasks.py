"""The MCP Tasks extension (`io.modelcontextprotocol/tasks`, protocol 2026-07-28) over taskorch.

A tool named in `TASK_TOOLS` (run_task), called by a client that declares the extension in its
request's capabilities, answers with a task handle (`resultType: "task"`) as soon as the taskorch
task and its handle are stored; the client then follows it with `tasks/get`, answers input
requests with `tasks/update` and cancels it with `tasks/cancel`. Any other client gets the tool's
ordinary, blocking answer. Handles live in the database (any replica, any restart resolves them)
and resolve only for the caller that created them: the identity of its API key, or "anonymous"
without keys (protected mode on loopback, stdio).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.server import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    CancelTaskRequestParams,
    GetTaskRequestParams,
    RequestParams,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from api.core.domain import Task, TaskHandle, TaskStatus
from api.core.errors import Conflict, TaskorchError, ValidationError
from api.core.service import TaskService
from api.security.auth import principal_of, require

TASKS = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"run_task"})
ANONYMOUS = "anonymous"  # the owner of handles created without an API key
POLL_INTERVAL_MS = 2000  # agents' tasks take minutes; polling faster only costs requests

McpStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]

# The one mapping from taskorch status to MCP task status. A FAILED task is a tool that ran and
# failed: `completed`, its result carrying isError. MCP's `failed` is kept for a failure of the
# protocol machinery itself (a JSON-RPC error), which taskorch never stores.
MCP_STATUS: dict[TaskStatus, McpStatus] = {
    TaskStatus.BLOCKED: "working",
    TaskStatus.WAITING: "working",
    TaskStatus.WORKING: "working",
    TaskStatus.IN_REVIEW: "input_required",  # the requester approves or rejects: tasks/update
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "completed",
    TaskStatus.CANCELLED: "cancelled",
}


def mcp_status(status: TaskStatus) -> McpStatus:
    return MCP_STATUS[status]


@dataclass(frozen=True, slots=True)
class InputRequest:
    """A request to the client that a task in `input_required` waits on: the MRTR request shown
    in `tasks/get`'s `inputRequests`, the service operation whose scope answering needs, and what
    to do with the client's `tasks/update` answer."""

    request: dict[str, Any]
    operation: str
    answer: Callable[[TaskService, Task, Any], Awaitable[None]]


REVIEW_SCHEMA = {
    "type": "object",
    "properties": {
        "decision": {
            "type": "string",
            "enum": ["approve", "reject"],
            "description": "approve: the task is COMPLETED; reject: it is sent back or failed.",
        },
        "feedback": {
            "type": "string",
            "description": "Why: a note kept with an approval, or what is wrong for a rejection"
            " (the next attempt is given it).",
        },
        "retry": {
            "type": "boolean",
            "default": True,
            "description": "On reject, false fails the task instead of another attempt.",
        },
    },
    "required": ["decision"],
}


async def _answer_review(service: TaskService, task: Task, response: Any) -> None:
    """An elicitation answer to a review request: `accept` with a decision approves or rejects;
    `decline` and `cancel` leave the task IN_REVIEW."""
    if not isinstance(response, dict) or response.get("action") != "accept":
        return
    content = response.get("content") or {}
    if not isinstance(content, dict):
        raise ValidationError("content", "content must be an object with a decision")
    decision, feedback = content.get("decision"), content.get("feedback")
    if decision == "approve":
        await service.approve(task.id, feedback)
    elif decision == "reject":
        retry = content.get("retry", True)
        await service.reject(task.id, feedback or "rejected without feedback", retry is not False)
    else:
        raise ValidationError("decision", "decision must be approve or reject")


def input_requests(task: Task) -> dict[str, InputRequest]:
    """The outstanding input requests of `task`, by key (unique over the task's life: a task can
    come back to review after a rejection, at another version)."""
    if task.status is not TaskStatus.IN_REVIEW:
        return {}
    message = (
        f"task {task.id} is IN_REVIEW: its worker finished with the result"
        f" {json.dumps(task.result)}. Approve it, or reject it with feedback."
    )
    request = {
        "method": "elicitation/create",
        "params": {"mode": "form", "message": message, "requestedSchema": REVIEW_SCHEMA},
    }
    return {f"review-{task.version}": InputRequest(request, "approve", _answer_review)}


# --- the tool's answer ---


class RunTaskOutcome(BaseModel):
    """What run_task answers: the task's result once it finished, or where it stands."""

    task_id: str = Field(description="The taskorch task id: get_task follows it.")
    status: str = Field(description="WAITING, WORKING, COMPLETED, FAILED or CANCELLED.")
    finished: bool = Field(description="False when the wait ended before the task did.")
    result: Any = Field(default=None, description="The worker's result, once COMPLETED.")
    error: str | None = Field(default=None, description="Why it FAILED or was CANCELLED.")
    message: str = Field(description="What happened, in a sentence.")


def tool_result(task: Task, waited: float | None = None) -> CallToolResult:
    """The tool result for `task` as it is: its result when COMPLETED, an isError result when it
    FAILED or was CANCELLED, and when still running (after `waited` seconds) a plain result
    saying so, since the task goes on and can be followed."""
    status = task.status
    outcome = RunTaskOutcome(task_id=task.id, status=status.value, finished=status.is_final,
                             message="")  # fmt: skip
    if status is TaskStatus.COMPLETED:
        outcome.result = task.result
        outcome.message = f"task {task.id} completed"
    elif status is TaskStatus.FAILED:
        outcome.error = task.error_message
        outcome.message = f"task {task.id} failed: {task.error_message}"
    elif status is TaskStatus.CANCELLED:
        outcome.error = task.error_message
        outcome.message = f"task {task.id} was cancelled" + (
            f": {task.error_message}" if task.error_message else ""
        )
    else:
        outcome.message = (
            f"task {task.id} is still {status.value} after {waited or 0:g} s and keeps running;"
            f" follow it with get_task(task_id={task.id!r})"
        )
    structured = outcome.model_dump(mode="json")
    failed = status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
    text = outcome.message if failed else json.dumps(structured)
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=structured, is_error=failed)  # fmt: skip


# --- task state on the wire ---


def _instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def status_message(task: Task) -> str:
    match task.status:
        case TaskStatus.BLOCKED:
            return f"blocked: waiting for {len(task.blocked_by)} task(s) it depends on"
        case TaskStatus.IN_REVIEW:
            return "in review: approve or reject its result (tasks/update)"
        case TaskStatus.WAITING:
            return "queued: waiting for a worker"
        case TaskStatus.WORKING:
            return f"worker {task.worker_id} is working on it"
        case TaskStatus.COMPLETED:
            return "completed"
        case TaskStatus.FAILED:
            return f"failed: {task.error_message}"
        case _:
            return f"{task.status.value.lower()}" + (
                f": {task.error_message}" if task.error_message else ""
            )


def task_state(handle: TaskHandle, task: Task) -> dict[str, Any]:
    """The extension's `Task` for this handle, with the payload its status carries (the
    `DetailedTask` of `tasks/get`)."""
    status = mcp_status(task.status)
    state: dict[str, Any] = {
        "taskId": handle.handle,
        "status": status,
        "statusMessage": status_message(task),
        "createdAt": _instant(task.created_at),
        "lastUpdatedAt": _instant(task.updated_at),
        "ttlMs": None,  # kept until retention prunes the finished task, with its handle
        "pollIntervalMs": POLL_INTERVAL_MS,
    }
    if status == "completed":
        state["result"] = tool_result(task).model_dump(by_alias=True, mode="json",
                                                       exclude_none=True)  # fmt: skip
    elif status == "input_required":
        state["inputRequests"] = {key: r.request for key, r in input_requests(task).items()}
    return state


# --- who may use a handle ---


def owner_of(ctx: ServerRequestContext[Any, Any]) -> str:
    """The identity a handle is bound to: the caller's API key, or anonymous without one."""
    principal = principal_of(ctx.request) if ctx.request is not None else None
    if principal is None or principal.key_hash is None:
        return ANONYMOUS
    return f"key:{principal.key_hash}"


def declares_tasks(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the extension (only a 2026-07-28 request can,
    and only there can a task handle be answered)."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS in capabilities.extensions)


# --- launching a task from a tool call ---


@dataclass(slots=True)
class Launch:
    """Set while a task tool runs for a declaring client: the tool stores the task and its
    handle here instead of waiting for the task."""

    owner: str
    handle: TaskHandle | None = None
    task: Task | None = field(default=None)


_LAUNCH: contextvars.ContextVar[Launch | None] = contextvars.ContextVar("launch", default=None)


def launching() -> Launch | None:
    """The launch of the current tool call, when it should answer with a task handle."""
    return _LAUNCH.get()


class UpdateTaskRequestParams(RequestParams):
    task_id: str
    input_responses: dict[str, Any] = Field(default_factory=dict)


class Tasks(Extension):
    """The extension's runtime: the `tools/call` interceptor and the three methods."""

    identifier = TASKS

    def __init__(self, service: Callable[[], TaskService]) -> None:
        self._service = service

    def methods(self) -> list[MethodBinding]:
        versions = frozenset(MODERN_PROTOCOL_VERSIONS)
        return [
            MethodBinding("tasks/get", GetTaskRequestParams, self.get, versions),
            MethodBinding("tasks/update", UpdateTaskRequestParams, self.update, versions),
            MethodBinding("tasks/cancel", CancelTaskRequestParams, self.cancel, versions),
        ]

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or not declares_tasks(ctx):
            return await call_next(ctx)
        launch = Launch(owner_of(ctx))
        token = _LAUNCH.set(launch)
        try:
            result = await call_next(ctx)
        finally:
            _LAUNCH.reset(token)
        if launch.handle is None or launch.task is None:
            return result  # the tool refused the call (bad input, scope): its error, as is
        return {"resultType": "task", **task_state(launch.handle, launch.task)}

    async def _resolve(
        self, ctx: ServerRequestContext[Any, Any], handle: str
    ) -> tuple[TaskHandle, Task]:
        require_client_extension(ctx, TASKS)
        found = await self._service().resolve_handle(handle, owner_of(ctx))
        if found is None:  # unknown, or another caller's: the same answer
            raise MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task not found")
        task = await self._service().find(found.task_id)
        if task is None:  # pruned by retention after it finished
            raise MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task has expired")
        return found, task

    async def get(
        self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
    ) -> HandlerResult:
        handle, task = await self._resolve(ctx, params.task_id)
        return {"resultType": "complete", **task_state(handle, task)}

    async def update(
        self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskRequestParams
    ) -> HandlerResult:
        """Deliver answers to outstanding input requests; answers to keys that are not
        outstanding are ignored, as the extension asks."""
        _, task = await self._resolve(ctx, params.task_id)
        outstanding = input_requests(task)
        for key, response in params.input_responses.items():
            if key not in outstanding:
                continue
            wanted = outstanding[key]
            try:
                if ctx.request is not None:  # over stdio the caller holds the database
                    require(principal_of(ctx.request), wanted.operation)
                await wanted.answer(self._service(), task, response)
            except TaskorchError as error:
                raise MCPError(code=INVALID_PARAMS, message=error.message) from error
        return {"resultType": "complete"}

    async def cancel(
        self, ctx: ServerRequestContext[Any, Any], params: CancelTaskRequestParams
    ) -> HandlerResult:
        _, task = await self._resolve(ctx, params.task_id)
        # Already finished: cancellation is cooperative, the acknowledgement stands.
        with contextlib.suppress(Conflict):
            await self._service().cancel(task.id, "cancelled through tasks/cancel")
        return {"resultType": "complete"}
