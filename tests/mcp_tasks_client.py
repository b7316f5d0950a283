"""A minimal requester side of the MCP Tasks extension, on the SDK's client extension API: it
declares `io.modelcontextprotocol/tasks`, accepts `resultType: "task"` on tools/call, and sends
tasks/get, tasks/update and tasks/cancel (with the Mcp-Name header the extension requires)."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp_types import CallToolResult, Request, RequestParams, Result
from pydantic import ConfigDict

TASKS = "io.modelcontextprotocol/tasks"
TERMINAL = ("completed", "failed", "cancelled")


class CreatedTask(Result):
    """The `CreateTaskResult` a tools/call may answer with."""

    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None


class TaskState(Result):
    """A `tasks/get` answer (DetailedTask), or an empty acknowledgement."""

    model_config = ConfigDict(extra="allow")
    result_type: str | None = None
    task_id: str | None = None
    status: str | None = None
    status_message: str | None = None
    created_at: str | None = None
    last_updated_at: str | None = None
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    input_requests: dict[str, Any] | None = None


class TaskParams(RequestParams):
    task_id: str


class UpdateParams(RequestParams):
    task_id: str
    input_responses: dict[str, Any]


class GetTask(Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskParams
    name_param = "taskId"


class UpdateTask(Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: UpdateParams
    name_param = "taskId"


class CancelTask(Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskParams
    name_param = "taskId"


async def get_task(session: ClientSession, task_id: str) -> TaskState:
    return await session.send_request(GetTask(params=TaskParams(task_id=task_id)), TaskState)


async def update_task(session: ClientSession, task_id: str, responses: dict[str, Any]) -> TaskState:
    request = UpdateTask(params=UpdateParams(task_id=task_id, input_responses=responses))
    return await session.send_request(request, TaskState)


async def cancel_task(session: ClientSession, task_id: str) -> TaskState:
    return await session.send_request(CancelTask(params=TaskParams(task_id=task_id)), TaskState)


async def poll(session: ClientSession, task_id: str, timeout: float = 30.0) -> TaskState:
    """tasks/get until the task is terminal."""
    with anyio.fail_after(timeout):
        while True:
            state = await get_task(session, task_id)
            if state.status in TERMINAL:
                return state
            await anyio.sleep(0.1)  # faster than pollIntervalMs: a test has no time to spare


async def _resolve(created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
    state = await poll(ctx.session, created.task_id)
    if state.status != "completed" or state.result is None:
        raise RuntimeError(f"task {created.task_id} ended {state.status}")
    return CallToolResult.model_validate(state.result)


class Tasks(ClientExtension):
    identifier = TASKS

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=_resolve)]


async def start(client: Client, tool: str, arguments: dict[str, Any]) -> CreatedTask:
    """Call `tool` and return the task handle the server answered with."""
    created = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(created, CreatedTask), created
    return created
