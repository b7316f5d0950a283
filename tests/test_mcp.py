"""MCP tools driven by the SDK's own client: in-process, over HTTP on a real server, and over stdio."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer

from api.core.service import TaskService
from api.interfaces.mcp import build_mcp
from tests.conftest import FakeClock, GraphQLClient, ServerProcess, eventually

TOOLS = {
    "create_task", "get_next_task", "complete_task", "fail_task", "heartbeat",
    "get_task", "list_tasks", "cancel_task", "retry_task", "get_statistics", "release_task",
    "run_task", "approve_task", "reject_task", "list_work_directories",
    "configure_work_directory", "cancel_tasks", "retry_tasks",
    "report_progress", "append_task_log", "get_task_logs",
}  # fmt: skip


@pytest.fixture
def tools(service: TaskService) -> MCPServer:
    """The tools in-process (the SDK client's task group must live in the test's own task)."""
    return build_mcp(lambda: service)


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """The tool's structured result, after checking that its text content says the same."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert len(result.content) == 1
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


async def error(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


async def test_tools_are_listed_with_descriptions_and_snake_case_arguments(
    tools: MCPServer,
) -> None:
    async with Client(tools) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description
            assert len(tool.description) > 60
            assert tool.output_schema is not None
            assert all(name == name.lower() for name in tool.input_schema.get("properties", {}))
        assert tools["get_next_task"].input_schema["required"] == ["work_directory", "worker_id"]
        assert "ctx" not in tools["get_task"].input_schema["properties"]


async def test_a_task_through_its_whole_life(tools: MCPServer, clock: FakeClock) -> None:
    async with Client(tools) as client:
        created = await call(
            client, "create_task", work_directory="/repo", prompt="fix it", priority="HIGH",
            tags=["ci"], max_retries=1, metadata={"ticket": 7}, idempotency_key="k",
        )  # fmt: skip
        assert created["status"] == "WAITING"
        assert created["work_directory"] == "/repo"
        assert created["priority"] == "HIGH"
        assert created["tags"] == ["ci"]
        assert created["metadata"] == {"ticket": 7}
        assert created["max_retries"] == 1
        again = await call(
            client, "create_task", work_directory="/repo", prompt="x", idempotency_key="k"
        )
        assert again["id"] == created["id"]

        claimed = await call(client, "get_next_task", work_directory="/repo", worker_id="agent")
        assert claimed["id"] == created["id"]
        assert claimed["status"] == "WORKING"
        assert claimed["worker_id"] == "agent"
        clock.advance(10)
        beat = await call(
            client, "heartbeat", task_id=created["id"], worker_id="agent", lease_seconds=600
        )
        assert beat["lease_expires_at"] > claimed["lease_expires_at"]
        done = await call(
            client, "complete_task", task_id=created["id"], worker_id="agent", result={"ok": 1}
        )
        assert done["status"] == "COMPLETED"
        assert done["result"] == {"ok": 1}
        assert await call(client, "get_task", task_id=created["id"]) == done


async def test_get_next_task_answers_task_null_when_nothing_is_claimable(tools: MCPServer) -> None:
    async with Client(tools) as client:
        nothing = await call(client, "get_next_task", work_directory="/none", worker_id="a")
        assert nothing == {"task": None}


async def test_get_next_task_returns_the_task_like_every_other_tool(tools: MCPServer) -> None:
    async with Client(tools) as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert listed["get_next_task"].output_schema["type"] == "object"  # type: ignore[index]
        created = await call(client, "create_task", work_directory="/repo", prompt="p")
        claimed = await call(client, "get_next_task", work_directory="/repo", worker_id="w")
        assert set(claimed) == set(created)
        assert claimed["id"] == created["id"]
        assert claimed == await call(client, "get_task", task_id=created["id"])


async def test_fail_cancel_retry_list_and_statistics(tools: MCPServer) -> None:
    async with Client(tools) as client:
        first = await call(client, "create_task", work_directory="/repo", prompt="a", max_retries=0)
        second = await call(client, "create_task", work_directory="/repo", prompt="b", tags=["x"])
        await call(client, "create_task", work_directory="/other", prompt="c")
        await call(client, "get_next_task", work_directory="/repo", worker_id="w")
        failed = await call(client, "fail_task", task_id=first["id"], worker_id="w", error="boom")
        assert failed["status"] == "FAILED"
        assert failed["error_message"] == "boom"
        retried = await call(client, "retry_task", task_id=first["id"])
        assert retried["status"] == "WAITING"
        cancelled = await call(client, "cancel_task", task_id=second["id"], reason="not needed")
        assert cancelled["status"] == "CANCELLED"

        page = await call(client, "list_tasks", work_directory="/repo", limit=1)
        assert [t["id"] for t in page["tasks"]] == [first["id"]]
        assert page["total"] == 2
        assert page["has_more"] is True
        page = await call(client, "list_tasks", work_directory="/repo", limit=1, offset=1)
        assert [t["id"] for t in page["tasks"]] == [second["id"]]
        assert page["has_more"] is False
        assert (await call(client, "list_tasks", status="CANCELLED"))["total"] == 1
        assert (await call(client, "list_tasks", tag="x"))["tasks"][0]["id"] == second["id"]

        stats = await call(client, "get_statistics")
        assert stats == {
            "total": 3,
            "waiting": 2,
            "working": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 1,
            "blocked": 0,
            "in_review": 0,
        }
        assert (await call(client, "get_statistics", work_directory="/other"))["total"] == 1


async def test_bad_input_is_a_tool_error_naming_the_argument_as_the_tool_does(
    tools: MCPServer, gql: GraphQLClient
) -> None:
    async with Client(tools) as client:
        graphql = await gql.error(
            'mutation { submitTask(input: {workDirectory: "repo", prompt: "x"}) { id } }'
        )
        text = await error(client, "create_task", work_directory="repo", prompt="x")
        assert text.endswith(": work_directory must be an absolute POSIX path starting with '/'")
        assert text.endswith(graphql["message"].replace("workDirectory", "work_directory"))
        text = await error(client, "get_next_task", work_directory="/r", worker_id=" ")
        assert text.endswith(": worker_id must be 1 to 255 characters")
        graphql = await gql.error('query { statistics(workDirectory: "/a/../b") { total } }')
        text = await error(client, "get_statistics", work_directory="/a/../b")
        assert text.endswith(graphql["message"].replace("workDirectory", "work_directory"))
        assert "no task with id" in await error(
            client, "get_task", task_id="7b0f5c1e-0000-4000-8000-000000000000"
        )
        assert "must be a task id" in await error(client, "retry_task", task_id="nope")
        created = await call(client, "create_task", work_directory="/repo", prompt="p")
        conflict = await error(client, "complete_task", task_id=created["id"], worker_id="w")
        assert "not WORKING" in conflict


async def test_tools_over_http_on_a_real_server(server: ServerProcess) -> None:
    async with Client(f"{server.url}/mcp") as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        created = await call(client, "create_task", work_directory="/srv", prompt="over http")
        claimed = await call(
            client, "get_next_task", work_directory="/srv", worker_id="w", wait_seconds=1
        )
        assert claimed["id"] == created["id"]
        assert claimed["status"] == "WORKING"
        assert await call(client, "get_next_task", work_directory="/srv", worker_id="w") == {
            "task": None
        }
        await call(client, "complete_task", task_id=created["id"], worker_id="w", result="done")
        assert (await call(client, "get_task", task_id=created["id"]))["status"] == "COMPLETED"
        assert (await call(client, "get_statistics", work_directory="/srv"))["completed"] == 1
        assert "absolute" in await error(client, "list_tasks", work_directory="srv")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stdio_command_serves_the_same_tools(database_url: str) -> None:
    command = StdioServerParameters(
        command=sys.executable, args=["-m", "api.cli", "mcp", "--database", database_url]
    )
    async with Client(command) as client:
        created = await call(client, "create_task", work_directory="/local", prompt="over stdio")
        listed = await call(client, "list_tasks", work_directory="/local")
        assert [t["id"] for t in listed["tasks"]] == [created["id"]]
        claimed = await call(client, "get_next_task", work_directory="/local", worker_id="w")
        assert claimed["id"] == created["id"]
        assert claimed["status"] == "WORKING"
        nothing = await call(client, "get_next_task", work_directory="/local", worker_id="w")
        assert nothing == {"task": None}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stdio_command_prunes_finished_tasks_under_retention(database_url: str) -> None:
    command = StdioServerParameters(
        command=sys.executable,
        args=["-m", "api.cli", "mcp", "--database", database_url],
        env={"TASKORCH_RETENTION": "1s"},
    )
    async with Client(command) as client:
        task = await call(client, "create_task", work_directory="/local", prompt="then forget")
        await call(client, "get_next_task", work_directory="/local", worker_id="w")
        await call(client, "complete_task", task_id=task["id"], worker_id="w")

        async def pruned() -> bool:
            result = await client.call_tool("get_task", {"task_id": task["id"]})
            if not result.is_error:
                return False
            text: str = result.content[0].text  # type: ignore[union-attr]
            return "no task with id" in text

        await eventually(pruned)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_http_tools_need_a_key_with_their_scope(
    server: ServerProcess, database_url: str
) -> None:
    import subprocess

    import httpx2

    def create_key(name: str, scopes: str) -> str:
        command = [sys.executable, "-m", "api.cli", "keys", "create", "--name", name]
        command += ["--scopes", scopes, "--database", database_url]
        return subprocess.run(command, capture_output=True, check=True, text=True).stdout.strip()

    reader = create_key("reader", "read")
    headers = {"Authorization": f"Bearer {reader}"}
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client,
    ):
        assert (await call(client, "get_statistics"))["total"] == 0
        refused = await error(client, "create_task", work_directory="/srv", prompt="p")
        assert "lacks the 'submit' scope" in refused


async def test_dependencies_and_reviews_through_the_tools(tools: MCPServer) -> None:
    async with Client(tools) as client:
        first = await call(
            client, "create_task", work_directory="/a", prompt="p", require_review=True
        )
        then = await call(client, "create_task", work_directory="/b", prompt="q",
                          depends_on=[first["id"]])  # fmt: skip
        assert (then["status"], then["blocked_by"]) == ("BLOCKED", [first["id"]])
        text = await error(client, "create_task", work_directory="/b", prompt="q",
                           depends_on=["00000000-0000-0000-0000-000000000000"])  # fmt: skip
        assert "depends_on[0]" in text
        await call(client, "get_next_task", work_directory="/a", worker_id="w")
        done = await call(client, "complete_task", task_id=first["id"], worker_id="w")
        assert done["status"] == "IN_REVIEW"
        assert "IN_REVIEW" in await error(client, "approve_task", task_id=then["id"])
        again = await call(client, "reject_task", task_id=first["id"], feedback="more tests")
        assert (again["status"], again["review_feedback"]) == ("WAITING", "more tests")
        await call(client, "get_next_task", work_directory="/a", worker_id="w")
        await call(client, "complete_task", task_id=first["id"], worker_id="w")
        approved = await call(client, "approve_task", task_id=first["id"], note="ok")
        assert approved["status"] == "COMPLETED"
        assert (await call(client, "get_task", task_id=then["id"]))["status"] == "WAITING"
        stats = await call(client, "get_statistics")
        assert (stats["blocked"], stats["in_review"], stats["waiting"]) == (0, 0, 1)
        failed = await call(client, "create_task", work_directory="/c", prompt="r",
                            require_review=True)  # fmt: skip
        await call(client, "get_next_task", work_directory="/c", worker_id="w")
        await call(client, "complete_task", task_id=failed["id"], worker_id="w")
        final = await call(client, "reject_task", task_id=failed["id"], feedback="no", retry=False)
        assert final["status"] == "FAILED"


async def test_an_agent_reports_progress_and_streams_its_log(tools: MCPServer) -> None:
    async with Client(tools) as client:
        created = await call(client, "create_task", work_directory="/repo", prompt="build")
        await call(client, "get_next_task", work_directory="/repo", worker_id="agent")
        task_id = created["id"]
        progress = await call(
            client, "report_progress", task_id=task_id, worker_id="agent", progress=0.3,
            message="compiling",
        )  # fmt: skip
        assert (progress["progress"], progress["progress_message"]) == (0.3, "compiling")
        appended = await call(
            client, "append_task_log", task_id=task_id, worker_id="agent", lines=["a", "b", "c"]
        )
        assert appended == {"last_line": 3}
        page = await call(client, "get_task_logs", task_id=task_id, after=1, limit=1)
        assert [line["text"] for line in page["lines"]] == ["b"]
        assert page["last_line"] == 2
        assert page["has_more"] is True
        refused = await error(
            client, "append_task_log", task_id=task_id, worker_id="other", lines=["x"]
        )
        assert "held by another worker" in refused
        bad = await error(
            client, "report_progress", task_id=task_id, worker_id="agent", progress=1.5
        )
        assert "progress must be a number from 0 to 1" in bad
