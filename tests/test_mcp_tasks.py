"""run_task and the MCP Tasks extension: handles, tasks/get|update|cancel, the blocking fallback,
key binding, durability across restarts, and the tool profiles; in-process, over HTTP against a
real server, and over stdio."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY

from api.core.domain import TaskFilter, TaskStatus
from api.core.service import TaskService
from api.interfaces.mcp import PROFILES, build_mcp
from api.interfaces.mcp_tasks import MCP_STATUS
from tests import mcp_tasks_client as tasks
from tests.conftest import FakeClock, GraphQLClient, ServerProcess

RUN = {"work_directory": "/srv/repo", "prompt": "fix the test"}


@pytest.fixture
def tools(service: TaskService) -> MCPServer:
    return build_mcp(lambda: service)


async def complete_next(service: TaskService, result: Any, directory: str = "/srv/repo") -> str:
    """A worker: claims the next task (waiting for it) and completes it."""
    (task,) = await service.claim(directory, "worker-1", wait_seconds=10)
    await service.complete(task.id, "worker-1", result)
    return task.id


def structured(result: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = result["structuredContent"]
    return content


# --- the status mapping ---


def test_every_taskorch_status_maps_to_an_mcp_task_status() -> None:
    assert set(MCP_STATUS) == set(TaskStatus)
    assert MCP_STATUS[TaskStatus.FAILED] == "completed"  # a failed tool is completed + isError


# --- in-process, both databases ---


async def test_a_declaring_client_gets_a_handle_and_polls_it_to_the_result(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", {**RUN, "priority": "HIGH", "tags": ["a"]})
        assert created.status == "working"
        assert created.status_message == "queued: waiting for a worker"
        assert created.poll_interval_ms is not None
        assert created.ttl_ms is None
        assert len(created.task_id) >= 32  # secrets.token_urlsafe(24)
        # durable before the answer: tasks/get resolves at once
        state = await tasks.get_task(client.session, created.task_id)
        assert (state.result_type, state.status) == ("complete", "working")

        task_id = await complete_next(service, {"summary": "fixed"})
        assert (await service.get(task_id)).priority.name == "HIGH"
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "completed"
        assert state.result is not None
        assert state.result["isError"] is False
        outcome = structured(state.result)
        assert outcome["task_id"] == task_id
        assert (outcome["status"], outcome["result"]) == ("COMPLETED", {"summary": "fixed"})
        assert json.loads(state.result["content"][0]["text"]) == outcome


async def test_the_extension_is_advertised_and_the_client_resolves_handles_itself(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        assert client.server_capabilities.extensions == {tasks.TASKS: {}}
        worker = asyncio.create_task(complete_next(service, 42))
        result = await client.call_tool("run_task", RUN)  # the claim polls tasks/get for us
        assert result.structured_content is not None
        assert result.structured_content["result"] == 42
        assert result.structured_content["task_id"] == await worker


async def test_a_failed_task_is_a_completed_mcp_task_with_an_error_result(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", {**RUN, "max_retries": 0})
        (task,) = await service.claim("/srv/repo", "w")
        await service.fail(task.id, "w", "compiler crashed")
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "completed"
        assert state.status_message == "failed: compiler crashed"
        assert state.result is not None
        assert state.result["isError"] is True
        assert "compiler crashed" in state.result["content"][0]["text"]
        assert structured(state.result)["error"] == "compiler crashed"


async def test_tasks_cancel_cancels_the_taskorch_task(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", RUN)
        ack = await tasks.cancel_task(client.session, created.task_id)
        assert ack.result_type == "complete"
        assert ack.task_id is None
        (task,) = (await service.list_page(_all())).tasks
        assert task.status is TaskStatus.CANCELLED
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "cancelled"
        assert state.result is None
        # cancelling a finished task is still acknowledged, and changes nothing
        await tasks.cancel_task(client.session, created.task_id)
        assert (await service.get(task.id)).status is TaskStatus.CANCELLED


async def test_tasks_update_is_acknowledged_and_ignores_keys_not_outstanding(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", RUN)
        ack = await tasks.update_task(client.session, created.task_id, {"nope": {"action": "x"}})
        assert ack.result_type == "complete"
        assert (await tasks.get_task(client.session, created.task_id)).status == "working"
        with pytest.raises(MCPError) as unknown:
            await tasks.update_task(client.session, "not-a-handle", {})
        assert unknown.value.error.code == INVALID_PARAMS


async def test_a_task_in_review_asks_its_requester_to_approve_or_reject(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", {**RUN, "require_review": True})
        task_id = await complete_next(service, {"diff": "+1"})
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "input_required"
        assert state.input_requests is not None
        ((key, request),) = state.input_requests.items()
        assert request["method"] == "elicitation/create"
        assert '{"diff": "+1"}' in request["params"]["message"]
        assert request["params"]["requestedSchema"]["required"] == ["decision"]
        # declining leaves it in review; rejecting sends it back with the feedback
        await tasks.update_task(client.session, created.task_id, {key: {"action": "decline"}})
        assert (await service.get(task_id)).status is TaskStatus.IN_REVIEW
        answer = {"action": "accept", "content": {"decision": "reject", "feedback": "add a test"}}
        await tasks.update_task(client.session, created.task_id, {key: answer})
        rejected = await service.get(task_id)
        assert (rejected.status, rejected.review_feedback) == (TaskStatus.WAITING, "add a test")
        state = await tasks.get_task(client.session, created.task_id)
        assert (state.status, state.input_requests) == ("working", None)
        # the same key again is no longer outstanding: ignored
        await tasks.update_task(client.session, created.task_id, {key: answer})
        assert (await service.get(task_id)).status is TaskStatus.WAITING

        await complete_next(service, {"diff": "+2"})
        state = await tasks.get_task(client.session, created.task_id)
        assert state.input_requests is not None
        (second,) = state.input_requests
        assert second != key  # a new review, a new key
        maybe = {"action": "accept", "content": {"decision": "maybe"}}
        with pytest.raises(MCPError) as bad:
            await tasks.update_task(client.session, created.task_id, {second: maybe})
        assert bad.value.error.code == INVALID_PARAMS
        assert "decision must be approve or reject" in bad.value.error.message
        approve = {"action": "accept", "content": {"decision": "approve", "feedback": "good"}}
        await tasks.update_task(client.session, created.task_id, {second: approve})
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "completed"
        assert state.result is not None
        assert structured(state.result)["result"] == {"diff": "+2"}


async def test_unknown_handles_and_clients_without_the_extension_get_protocol_errors(
    tools: MCPServer,
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", RUN)
        for method in (tasks.get_task, tasks.cancel_task):
            with pytest.raises(MCPError) as unknown:
                await method(client.session, created.task_id + "x")
            assert unknown.value.error.code == INVALID_PARAMS
            assert unknown.value.error.message == "Failed to retrieve task: Task not found"
    async with Client(tools) as plain:
        with pytest.raises(MCPError) as undeclared:
            await tasks.get_task(plain.session, created.task_id)
        assert undeclared.value.error.code == MISSING_REQUIRED_CLIENT_CAPABILITY


async def test_a_client_without_the_extension_blocks_until_the_task_finishes(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools) as client:
        worker = asyncio.create_task(complete_next(service, {"ok": True}))
        result = await client.call_tool("run_task", {**RUN, "timeout_seconds": 20})
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["finished"] is True
        assert result.structured_content["result"] == {"ok": True}
        assert result.structured_content["task_id"] == await worker


async def test_a_blocking_call_that_times_out_says_the_task_still_runs(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools) as client:
        result = await client.call_tool("run_task", {**RUN, "timeout_seconds": 0.3})
        assert not result.is_error  # not an error that loses the task
        outcome = result.structured_content
        assert outcome is not None
        assert (outcome["finished"], outcome["status"]) == (False, "WAITING")
        assert "still WAITING" in outcome["message"]
        assert outcome["task_id"] in outcome["message"]
        assert (await service.get(outcome["task_id"])).status is TaskStatus.WAITING


async def test_a_blocking_call_reports_a_failure_as_a_tool_error(
    tools: MCPServer, service: TaskService
) -> None:
    async def fail() -> None:
        (task,) = await service.claim("/srv/repo", "w", wait_seconds=10)
        await service.fail(task.id, "w", "no such file", retry=False)

    async with Client(tools) as client:
        worker = asyncio.create_task(fail())
        result = await client.call_tool("run_task", {**RUN, "timeout_seconds": 20})
        await worker
        assert result.is_error
        assert "failed: no such file" in result.content[0].text  # type: ignore[union-attr]


async def test_bad_run_task_input_is_a_tool_error_naming_the_argument(
    tools: MCPServer, service: TaskService
) -> None:
    for extensions in ([tasks.Tasks()], []):
        async with Client(tools, extensions=extensions) as client:
            for arguments, message in [
                ({**RUN, "work_directory": "repo"}, "work_directory must be an absolute"),
                ({**RUN, "timeout_seconds": 301}, "timeout_seconds must be from 0 to 300"),
                ({**RUN, "max_retries": -1}, "max_retries"),
            ]:
                result = await client.session.call_tool("run_task", arguments, allow_claimed=True)
                assert getattr(result, "is_error", False), result
                assert message in result.content[0].text  # type: ignore[union-attr]
    assert (await service.statistics()).total == 0  # nothing invalid stored


async def test_handles_are_bound_to_their_owner(tools: MCPServer, service: TaskService) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await tasks.start(client, "run_task", RUN)
    mine = await service.resolve_handle(created.task_id, "anonymous")
    assert mine is not None
    assert await service.resolve_handle(created.task_id, "key:someone-else") is None
    assert await service.resolve_handle("x" * 1000, "anonymous") is None


async def test_a_handle_goes_with_its_task_when_retention_prunes_it(
    service: TaskService, clock: FakeClock
) -> None:
    from api.core.validation import task_spec

    _, handle = await service.submit_with_handle(
        task_spec(work_directory="/srv/repo", prompt="p"), "anonymous"
    )
    _, kept = await service.submit_with_handle(
        task_spec(work_directory="/other", prompt="q"), "anonymous"
    )
    await complete_next(service, None)
    clock.advance(3600)
    assert await service.prune(timedelta(minutes=1)) == 1
    assert await service.store.handles.find_handle(handle.handle) is None
    assert await service.store.handles.find_handle(kept.handle) == kept


async def test_a_task_is_never_stored_without_its_handle(
    service: TaskService, clock: FakeClock
) -> None:
    from api.core.validation import task_spec

    spec = task_spec(work_directory="/srv/repo", prompt="p")
    task, handle = await service.store.submit_with_handle(spec, clock(), "same-handle", "anonymous")
    assert await service.resolve_handle(handle.handle, "anonymous") == handle
    # The second handle insert fails (the handle exists): its task goes with it.
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await service.store.submit_with_handle(
            task_spec(work_directory="/srv/repo", prompt="q"), clock(), "same-handle", "anonymous"
        )
    page = await service.list_tasks(TaskFilter(work_directory="/srv/repo"))
    assert [t.id for t in page.tasks] == [task.id]
    assert await service.store.handles.find_handle("same-handle") == handle


async def test_many_concurrent_run_tasks_get_distinct_resolvable_handles(
    tools: MCPServer, service: TaskService
) -> None:
    async with Client(tools, extensions=[tasks.Tasks()]) as client:
        created = await asyncio.gather(
            *(tasks.start(client, "run_task", {**RUN, "prompt": f"p{i}"}) for i in range(30))
        )
        handles = {c.task_id for c in created}
        assert len(handles) == 30
        resolved = await asyncio.gather(*(service.resolve_handle(h, "anonymous") for h in handles))
        assert len({r.task_id for r in resolved if r is not None}) == 30
        claimed = await service.claim("/srv/repo", "w", limit=30)
        await asyncio.gather(*(service.complete(t.id, "w", t.prompt) for t in claimed))
        states = await asyncio.gather(*(tasks.get_task(client.session, h) for h in handles))
        assert sorted(structured(s.result or {})["result"] for s in states) == sorted(
            f"p{i}" for i in range(30)
        )


def _all() -> Any:
    from api.core.validation import task_filter

    return task_filter(statuses=(), work_directory=None, tag=None)


# --- profiles ---


def _tokens(listed: list[dict[str, Any]]) -> int:
    """A simple, stable estimate of what a tools/list costs a model: 4 bytes of JSON a token."""
    return len(json.dumps(listed, separators=(",", ":"))) // 4


async def test_each_profile_lists_its_tools_and_costs_fewer_tokens_than_all(
    service: TaskService, capsys: pytest.CaptureFixture[str]
) -> None:
    sizes: dict[str, int] = {}
    for profile, names in PROFILES.items():
        async with Client(build_mcp(lambda: service, profile)) as client:
            listed = (await client.list_tools()).tools
        assert {tool.name for tool in listed} == names
        sizes[profile] = _tokens([t.model_dump(by_alias=True, exclude_none=True) for t in listed])
    with capsys.disabled():
        print("\ntools/list size per profile (tokens, len(json)/4):", sizes)
    for profile in ("worker", "producer", "admin"):
        assert sizes[profile] < sizes["all"]
        assert PROFILES[profile] < PROFILES["all"]
    assert {"run_task", "create_task"} <= PROFILES["producer"]
    assert {"get_next_task", "complete_task", "release_task"} <= PROFILES["worker"]
    assert "run_task" not in PROFILES["worker"]


# --- over HTTP against a real server ---


def create_key(database_url: str, name: str, scopes: str) -> str:
    command = [sys.executable, "-m", "api.cli", "keys", "create", "--name", name]
    command += ["--scopes", scopes, "--database", database_url]
    return subprocess.run(command, capture_output=True, check=True, text=True).stdout.strip()


@asynccontextmanager
async def http_client(
    url: str, key: str | None = None, *, extension: bool = True
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(
            streamable_http_client(url, http_client=http),
            extensions=[tasks.Tasks()] if extension else None,
        ) as client,
    ):
        yield client


COMPLETE = """mutation($id: ID!, $result: JSON) {
  completeTask(id: $id, workerId: "gql-worker", result: $result) { status } }"""
CLAIM = """mutation { claimTask(workDirectory: "/srv/repo", workerId: "gql-worker",
  waitSeconds: 10) { id } }"""


async def gql_worker(remote: GraphQLClient, result: Any) -> str:
    """A worker over GraphQL: claims the next task and completes it."""
    task_id: str = (await remote.ok(CLAIM))["claimTask"]["id"]
    await remote.ok(COMPLETE, id=task_id, result=result)
    return task_id


async def test_over_http_a_worker_completes_the_task_while_the_client_polls(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    async with http_client(f"{server.url}/mcp") as client:
        created = await tasks.start(client, "run_task", RUN)
        polling = asyncio.create_task(tasks.poll(client.session, created.task_id))
        await asyncio.sleep(0.3)
        assert not polling.done()
        task_id = await gql_worker(remote, {"done": 1})
        state = await polling
        assert state.status == "completed"
        assert state.result is not None
        assert structured(state.result)["task_id"] == task_id
        assert structured(state.result)["result"] == {"done": 1}

        second = await tasks.start(client, "run_task", RUN)
        await tasks.cancel_task(client.session, second.task_id)
        assert (await tasks.get_task(client.session, second.task_id)).status == "cancelled"
        listed = await remote.ok("{ tasks(status: [CANCELLED]) { edges { node { id } } } }")
        assert len(listed["tasks"]["edges"]) == 1


async def test_over_http_a_plain_client_gets_the_result_of_a_blocking_call(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    async with http_client(f"{server.url}/mcp", extension=False) as client:
        worker = asyncio.create_task(gql_worker(remote, "all green"))
        result = await client.call_tool("run_task", {**RUN, "timeout_seconds": 30})
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["result"] == "all green"
        assert result.structured_content["task_id"] == await worker


async def test_over_http_answering_a_review_needs_the_review_scope(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    requester = create_key(database_url, "requester", "submit,read")
    reviewer = create_key(database_url, "reviewer", "submit,read,review")
    worker = create_key(database_url, "worker", "work")
    server = start_server(database_url)
    approve = {"action": "accept", "content": {"decision": "approve", "feedback": "fine"}}
    async with httpx2.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {worker}"}, timeout=30
    ) as http:
        remote = GraphQLClient(http)
        for key, allowed in ((requester, False), (reviewer, True)):
            async with http_client(f"{server.url}/mcp", key) as client:
                created = await tasks.start(client, "run_task", {**RUN, "require_review": True})
                await gql_worker(remote, {"patch": 1})
                state = await tasks.get_task(client.session, created.task_id)
                assert state.status == "input_required"
                assert state.input_requests is not None
                (review_key,) = state.input_requests
                if allowed:
                    await tasks.update_task(client.session, created.task_id, {review_key: approve})
                    assert (await tasks.get_task(client.session, created.task_id)).status == (
                        "completed"
                    )
                    continue
                with pytest.raises(MCPError) as refused:
                    await tasks.update_task(client.session, created.task_id, {review_key: approve})
                assert refused.value.error.code == INVALID_PARAMS
                assert "lacks the 'review' scope" in refused.value.error.message
                still = await tasks.get_task(client.session, created.task_id)
                assert still.status == "input_required"


async def test_over_http_handles_belong_to_their_key_and_survive_a_restart(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    alice = create_key(database_url, "alice", "submit,read")
    bob = create_key(database_url, "bob", "submit,read,work")
    reader = create_key(database_url, "reader", "read")
    submitter = create_key(database_url, "submitter", "submit")
    server = start_server(database_url)
    async with http_client(f"{server.url}/mcp", alice) as client:
        created = await tasks.start(client, "run_task", RUN)
    async with http_client(f"{server.url}/mcp", bob) as other:
        for method in (tasks.get_task, tasks.cancel_task):
            with pytest.raises(MCPError) as refused:
                await method(other.session, created.task_id)
            assert refused.value.error.message == "Failed to retrieve task: Task not found"
        assert (await other.call_tool("get_statistics", {})).structured_content["waiting"] == 1  # type: ignore[index]
    async with http_client(f"{server.url}/mcp", reader) as weak:
        result = await weak.session.call_tool("run_task", RUN, allow_claimed=True)
        assert getattr(result, "is_error", False)
        assert "lacks the 'submit' scope" in result.content[0].text  # type: ignore[union-attr]
    async with http_client(f"{server.url}/mcp", submitter) as blind:
        result = await blind.session.call_tool("run_task", RUN, allow_claimed=True)
        assert getattr(result, "is_error", False)
        assert "lacks the 'read' scope" in result.content[0].text  # type: ignore[union-attr]

    server.stop()
    restarted = start_server(database_url)
    async with http_client(f"{restarted.url}/mcp", alice) as client:
        state = await tasks.get_task(client.session, created.task_id)
        assert state.status == "working"
        await tasks.cancel_task(client.session, created.task_id)
        assert (await tasks.get_task(client.session, created.task_id)).status == "cancelled"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_over_http_each_profile_has_its_path_and_a_flag_sets_the_default(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(database_url, None, "--mcp-tools", "worker")
    paths = [("/mcp", "worker"), *((f"/mcp/{p}", p) for p in PROFILES)]
    paths += [(f"/mcp?tools={p}", p) for p in PROFILES]
    for path, profile in paths:
        async with http_client(f"{server.url}{path}", extension=False) as client:
            assert {t.name for t in (await client.list_tools()).tools} == PROFILES[profile]
    async with httpx2.AsyncClient(timeout=10) as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        answer = await http.post(f"{server.url}/mcp?tools=everything", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["data"] == {"field": "tools"}
    assert "tools must be one of worker, producer, admin, all" in answer.json()["error"]["message"]


def inspector(*args: str) -> dict[str, Any]:
    """The MCP Inspector's CLI (from the npm registry, through npx); skips where it is missing."""
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed")
    command = ["npx", "-y", "@modelcontextprotocol/inspector", "--cli", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("the MCP Inspector could not be fetched in time")
    if done.returncode != 0 and "npm" in done.stderr.lower():
        pytest.skip(f"the MCP Inspector is not available: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_mcp_inspector_cli_lists_a_profile_and_runs_a_task(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    command = [sys.executable, "-m", "api.cli", "mcp", "--database", database_url]
    listed = inspector(*command, "--tools", "worker", "--method", "tools/list")
    assert {tool["name"] for tool in listed["tools"]} == PROFILES["worker"]
    server = start_server(database_url)
    url = f"{server.url}/mcp?tools=producer"
    listed = inspector(url, "--transport", "http", "--method", "tools/list")
    assert {tool["name"] for tool in listed["tools"]} == PROFILES["producer"]
    arguments = ["--tool-arg", "work_directory=/srv/repo", "--tool-arg", "prompt=hi"]
    arguments += ["--tool-arg", "timeout_seconds=0.5"]
    ran = inspector(url, "--transport", "http", "--method", "tools/call", "--tool-name",
                    "run_task", *arguments)  # fmt: skip
    assert ran["isError"] is False
    assert ran["structuredContent"]["finished"] is False  # nobody works here: it keeps waiting


# --- over stdio ---


def stdio(database_url: str, *args: str) -> StdioServerParameters:
    command = ["-m", "api.cli", "mcp", "--database", database_url, *args]
    return StdioServerParameters(command=sys.executable, args=command)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_over_stdio_handles_and_blocking_calls_with_a_worker_profile(
    database_url: str,
) -> None:
    async with (
        Client(stdio(database_url, "--tools", "producer"), extensions=[tasks.Tasks()]) as producer,
        Client(stdio(database_url, "--tools", "worker")) as worker,
    ):
        assert {t.name for t in (await worker.list_tools()).tools} == PROFILES["worker"]
        created = await tasks.start(producer, "run_task", RUN)
        claimed = await worker.call_tool(
            "get_next_task", {"work_directory": "/srv/repo", "worker_id": "w", "wait_seconds": 5}
        )
        task_id = claimed.structured_content["id"]  # type: ignore[index]
        await worker.call_tool("complete_task", {"task_id": task_id, "worker_id": "w", "result": 7})
        state = await tasks.poll(producer.session, created.task_id)
        assert state.result is not None
        assert structured(state.result)["result"] == 7

    async with (
        Client(stdio(database_url)) as plain,
        Client(stdio(database_url, "--tools", "worker")) as worker,
    ):

        async def work() -> None:
            arguments = {"work_directory": "/srv/repo", "worker_id": "w", "wait_seconds": 10}
            claimed = await worker.call_tool("get_next_task", arguments)
            task = claimed.structured_content
            assert task is not None
            await worker.call_tool(
                "complete_task", {"task_id": task["id"], "worker_id": "w", "result": "ok"}
            )

        working = asyncio.create_task(work())
        result = await plain.call_tool("run_task", {**RUN, "timeout_seconds": 30})
        await working
        assert result.structured_content is not None
        assert result.structured_content["result"] == "ok"
