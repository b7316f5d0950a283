"""Work-directory controls and bulk changes: a cap on WORKING tasks that holds across server
processes, pause and resume waking waiting claims everywhere, and bulk cancel racing workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from api.core.domain import TaskFilter, TaskStatus
from api.core.errors import Conflict, ValidationError
from api.core.service import TaskService
from api.core.validation import task_spec
from tests.conftest import GraphQLClient, ServerProcess

CONFIGURE = """mutation($dir: String!, $max: Int, $paused: Boolean) {
  configureWorkDirectory(workDirectory: $dir, maxWorking: $max, paused: $paused) {
    workDirectory maxWorking paused configured waiting working total } }"""
PAUSE = """mutation($dir: String!, $paused: Boolean) {
  configureWorkDirectory(workDirectory: $dir, paused: $paused) { maxWorking paused } }"""
SUBMIT_MANY = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
CLAIM = """mutation($dir: String!, $w: String!, $wait: Float) {
  claimTask(workDirectory: $dir, workerId: $w, waitSeconds: $wait) { id } }"""
CLAIM_MANY = """mutation($dir: String!, $w: String!, $limit: Int!) {
  claimTasks(workDirectory: $dir, workerId: $w, limit: $limit) { id } }"""
COMPLETE = "mutation($id: ID!, $w: String!) { completeTask(id: $id, workerId: $w) { status } }"
STATS = "query($dir: String) { statistics(workDirectory: $dir) { waiting working total } }"
DIRECTORIES = """{ workDirectories { workDirectory maxWorking paused configured waiting working
  completed failed cancelled total } }"""
EVENTS = """query($after: ID, $dir: String) {
  events(after: $after, first: 1000, filter: {workDirectory: $dir}) {
    events { id status previousStatus } lastId hasNextPage } }"""

env = {"TASKORCH_RATE_LIMIT": "0", "TASKORCH_LOG_LEVEL": "WARNING"}


async def most_working_ever(client: GraphQLClient, directory: str) -> tuple[int, int]:
    """Replay the directory's history in id order: the most tasks WORKING at any instant, and how
    many claims there were."""
    working = most = claims = 0
    after: str | None = None
    while True:
        page = (await client.ok(EVENTS, after=after, dir=directory))["events"]
        for event in page["events"]:
            if event["status"] == "WORKING":
                working += 1
                claims += 1
            elif event["previousStatus"] == "WORKING":
                working -= 1
            most = max(most, working)
        after = page["lastId"]
        if not page["hasNextPage"]:
            return most, claims


async def test_the_cap_holds_across_two_server_processes(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    cap, tasks, claimers, directory = 3, 240, 60, "/capped"
    a, b = start_server(database_url, env), start_server(database_url, env)
    limits = httpx.Limits(max_connections=claimers, keepalive_expiry=1.0)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60, limits=limits) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=60, limits=limits) as http_b,
    ):
        on_a, on_b = GraphQLClient(http_a), GraphQLClient(http_b)
        configured = (await on_a.ok(CONFIGURE, dir=directory, max=cap))["configureWorkDirectory"]
        assert (configured["maxWorking"], configured["configured"]) == (cap, True)
        inputs = [{"workDirectory": directory, "prompt": f"t{i}"} for i in range(tasks)]
        await on_b.ok(SUBMIT_MANY, inputs=inputs)

        async def worker(client: GraphQLClient, name: str) -> int:
            done = 0
            while True:
                claimed = (await client.ok(CLAIM, dir=directory, w=name, wait=0.5))["claimTask"]
                if claimed is None:
                    stats = (await client.ok(STATS, dir=directory))["statistics"]
                    if stats["waiting"] == 0 and stats["working"] == 0:
                        return done
                    continue
                await asyncio.sleep(0.005)  # the work
                await client.ok(COMPLETE, id=claimed["id"], w=name)
                done += 1

        done = await asyncio.gather(
            *(worker(on_a if i % 2 else on_b, f"w{i}") for i in range(claimers))
        )
        assert sum(done) == tasks
        most, claims = await most_working_ever(on_a, directory)
        assert claims == tasks
        assert most == cap  # reached, and never exceeded
        # a batch claim gets at most what the cap leaves room for
        await on_a.ok(SUBMIT_MANY, inputs=inputs[:10])
        assert len((await on_b.ok(CLAIM_MANY, dir=directory, w="x", limit=10))["claimTasks"]) == 3
        assert (await on_a.ok(CLAIM_MANY, dir=directory, w="y", limit=10))["claimTasks"] == []


async def test_pause_and_a_freed_place_wake_waiting_claims_on_another_process(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    a, b = start_server(database_url, env), start_server(database_url, env)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as http_b,
    ):
        on_a, on_b = GraphQLClient(http_a), GraphQLClient(http_b)
        paused = (await on_a.ok(PAUSE, dir="/paused", paused=True))["configureWorkDirectory"]
        assert paused == {"maxWorking": None, "paused": True}
        inputs = [{"workDirectory": "/paused", "prompt": f"p{i}"} for i in range(2)]
        await on_a.ok(SUBMIT_MANY, inputs=inputs)
        assert (await on_b.ok(CLAIM, dir="/paused", w="w", wait=0))["claimTask"] is None
        assert (await on_a.ok(CLAIM_MANY, dir="/paused", w="w", limit=5))["claimTasks"] == []

        waiting = asyncio.create_task(on_b.ok(CLAIM, dir="/paused", w="wb", wait=20))
        await asyncio.sleep(0.8)
        assert not waiting.done()  # paused: a waiting claim keeps waiting
        resumed_at = time.monotonic()
        await on_a.ok(CONFIGURE, dir="/paused", max=1, paused=False)
        claimed = (await waiting)["claimTask"]
        assert claimed is not None
        assert time.monotonic() - resumed_at < 1.5  # woken by the resume, not by a re-check

        # at the cap (1): a waiting claim on A wakes when B's task leaves WORKING
        waiting = asyncio.create_task(on_a.ok(CLAIM, dir="/paused", w="wa", wait=20))
        await asyncio.sleep(0.8)
        assert not waiting.done()
        freed_at = time.monotonic()
        await on_b.ok(COMPLETE, id=claimed["id"], w="wb")
        assert (await waiting)["claimTask"] is not None
        assert time.monotonic() - freed_at < 1.5

        listed = {d["workDirectory"]: d for d in (await on_b.ok(DIRECTORIES))["workDirectories"]}
        assert listed["/paused"] == {
            "workDirectory": "/paused", "maxWorking": 1, "paused": False, "configured": True,
            "waiting": 0, "working": 1, "completed": 1, "failed": 0, "cancelled": 0, "total": 2,
        }  # fmt: skip


async def test_configure_validates_and_keeps_what_it_is_not_given(gql: GraphQLClient) -> None:
    await gql.ok(SUBMIT_MANY, inputs=[{"workDirectory": "/tasks/only", "prompt": "x"}])
    first = (await gql.ok(CONFIGURE, dir="/repo", max=2))["configureWorkDirectory"]
    assert (first["maxWorking"], first["paused"]) == (2, False)
    assert (await gql.ok(PAUSE, dir="/repo/", paused=True))["configureWorkDirectory"] == {
        "maxWorking": 2,
        "paused": True,
    }  # the path is normalised as everywhere, and the cap kept
    removed = (await gql.ok(CONFIGURE, dir="/repo", max=None))["configureWorkDirectory"]
    assert (removed["maxWorking"], removed["paused"]) == (None, True)
    assert (await gql.ok(CONFIGURE, dir="/repo", max=0))["configureWorkDirectory"][
        "maxWorking"
    ] is None
    for bad, field in (
        ({"max": -1}, "maxWorking"),
        ({"max": 0, "dir": "relative"}, "workDirectory"),
    ):
        error = await gql.error(CONFIGURE, **{"dir": "/repo", **bad})
        assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": field}
    listed = (await gql.ok(DIRECTORIES))["workDirectories"]
    assert [(d["workDirectory"], d["configured"], d["total"]) for d in listed] == [
        ("/repo", True, 0),
        ("/tasks/only", False, 1),
    ]


BULK = """mutation($filter: TaskFilterInput!, $reason: String) {
  cancelTasks(filter: $filter, reason: $reason) { matched changed skipped changedIds skippedIds } }"""
RETRY = """mutation($filter: TaskFilterInput!) {
  retryTasks(filter: $filter) { matched changed skipped } }"""
TASKS = """query($filter: TaskFilterInput) { tasks(filter: $filter) { totalCount } }"""


async def test_bulk_changes_refuse_an_empty_filter_and_filter_by_creation(
    gql: GraphQLClient,
) -> None:
    error = await gql.error(BULK, filter={})
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "filter"}
    error = await gql.error(BULK, filter={"statuses": ["COMPLETED"]})
    assert error["extensions"]["field"] == "filter.statuses"
    await gql.ok(SUBMIT_MANY, inputs=[{"workDirectory": "/b", "prompt": f"x{i}"} for i in range(3)])
    future = "2999-01-01T00:00:00Z"
    assert (await gql.ok(TASKS, filter={"createdAfter": future}))["tasks"]["totalCount"] == 0
    assert (await gql.ok(TASKS, filter={"createdBefore": future}))["tasks"]["totalCount"] == 3
    none = (await gql.ok(BULK, filter={"createdAfter": future}))["cancelTasks"]
    assert (none["matched"], none["changed"]) == (0, 0)
    done = await gql.ok(BULK, filter={"statuses": ["WAITING", "WORKING"]}, reason="r")
    assert (done["cancelTasks"]["changed"], done["cancelTasks"]["skipped"]) == (3, 0)
    again = (await gql.ok(RETRY, filter={"workDirectory": "/b"}))["retryTasks"]
    assert again == {"matched": 3, "changed": 3, "skipped": 0}


async def test_bulk_cancel_racing_workers_leaves_each_task_in_one_state(
    service: TaskService,
) -> None:
    count = 1200
    specs = [task_spec(work_directory="/race", prompt=f"p{i}") for i in range(count)]
    ids = [
        t.id
        for start in range(0, count, 1000)
        for t in await service.submit_many(specs[start : start + 1000])
    ]
    stop = asyncio.Event()

    async def worker(name: str) -> None:
        while not stop.is_set():
            tasks = await service.claim("/race", name, limit=3)
            if not tasks:
                return
            for task in tasks:
                # cancelled meanwhile: the completion is refused, not applied
                with contextlib.suppress(Conflict):
                    await service.complete(task.id, name, {"ok": True})

    workers = [asyncio.create_task(worker(f"w{i}")) for i in range(20)]
    await asyncio.sleep(0.05)
    result = await service.cancel_many(TaskFilter(work_directory="/race"), "stop")
    stop.set()
    await asyncio.gather(*workers)

    assert result.matched == result.changed + result.skipped
    assert result.changed > 0
    cancelled: set[str] = set()
    statuses: Counter[TaskStatus] = Counter()
    for task_id in ids:
        task = await service.get(task_id)
        history = await service.history(task_id)
        assert history[-1].status is task.status
        final = [e for e in history if e.status.is_final]
        statuses[task.status] += 1
        if task.status is TaskStatus.CANCELLED:
            cancelled.add(task_id)
            assert [e.details for e in final] == [{"reason": "stop"}]
        else:
            assert task.status in (TaskStatus.COMPLETED, TaskStatus.WAITING, TaskStatus.WORKING)
            assert len(final) == (1 if task.status is TaskStatus.COMPLETED else 0)
    assert cancelled == set(result.changed_ids)
    assert not set(result.skipped_ids) & cancelled
    # every task the bulk did not change was out of its reach: finished before its chunk came
    assert statuses[TaskStatus.WAITING] == statuses[TaskStatus.WORKING] == 0


async def test_a_bulk_filter_is_checked_before_anything_changes(service: TaskService) -> None:
    with pytest.raises(ValidationError) as refused:
        await service.retry_many(TaskFilter())
    assert refused.value.field == "filter"
    with pytest.raises(ValidationError):
        await service.retry_many(TaskFilter(statuses=(TaskStatus.WAITING,)))


async def test_rest_and_mcp_serve_the_controls_and_bulk_changes(
    service: TaskService, server: ServerProcess
) -> None:
    from mcp import Client

    from api.interfaces.mcp import build_mcp

    api = f"{server.url}/api/v1"
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(3):
            await http.post(f"{api}/tasks", json={"work_directory": "/rest", "prompt": f"p{i}"})
        put = await http.put(
            f"{api}/work-directories", json={"work_directory": "/rest", "max_working": 1}
        )
        assert put.status_code == 200, put.text
        assert (put.json()["data"]["max_working"], put.json()["data"]["waiting"]) == (1, 3)
        kept = await http.put(f"{api}/work-directories", json={"work_directory": "/rest"})
        assert kept.json()["data"]["max_working"] == 1
        bad = await http.put(
            f"{api}/work-directories", json={"work_directory": "/rest", "max_working": -2}
        )
        assert (bad.status_code, bad.json()["error"]["details"]) == (400, {"field": "max_working"})
        listed = (await http.get(f"{api}/work-directories")).json()["data"]["work_directories"]
        assert [(d["work_directory"], d["max_working"]) for d in listed] == [("/rest", 1)]
        refused = await http.post(f"{api}/tasks/cancel", json={"filter": {}})
        assert refused.json()["error"]["details"] == {"field": "filter"}
        done = await http.post(
            f"{api}/tasks/cancel", json={"filter": {"work_directory": "/rest"}, "reason": "r"}
        )
        assert (done.json()["data"]["matched"], done.json()["data"]["changed"]) == (3, 3)
        again = await http.post(f"{api}/tasks/retry", json={"filter": {"statuses": ["CANCELLED"]}})
        assert again.json()["data"]["changed"] == 3

    async with Client(build_mcp(lambda: service)) as client:
        await service.submit_many([task_spec(work_directory="/mcp", prompt="x")])
        result = await client.call_tool(
            "configure_work_directory", {"work_directory": "/mcp", "paused": True}
        )
        assert result.structured_content is not None
        assert result.structured_content["paused"] is True
        assert await service.claim("/mcp", "w") == []
        result = await client.call_tool("list_work_directories", {"work_directory": "/mcp"})
        assert result.structured_content is not None
        assert [d["paused"] for d in result.structured_content["work_directories"]] == [True]
        result = await client.call_tool("cancel_tasks", {})
        assert result.is_error
        result = await client.call_tool("cancel_tasks", {"work_directory": "/mcp"})
        assert result.structured_content is not None
        assert result.structured_content["changed"] == 1
        result = await client.call_tool(
            "retry_tasks", {"statuses": ["CANCELLED"], "work_directory": "/mcp"}
        )
        assert result.structured_content is not None
        assert result.structured_content["changed"] == 1


async def test_controls_and_bulk_changes_need_the_admin_scope(database_url: str) -> None:
    from datetime import UTC, datetime

    from api.security.keys import issue_key
    from api.settings import Settings
    from api.store import open_store
    from tests.conftest import running_app

    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    try:
        now = datetime.now(UTC)
        _, submitter = await issue_key(store.keys, "submitter", "read,submit,work", now)
        _, admin = await issue_key(store.keys, "admin", "admin", now)
    finally:
        await store.close()
    async with running_app(Settings(database_url=database_url, durability="normal")) as http:
        client = GraphQLClient(http)
        for key, allowed in ((submitter, False), (admin, True)):
            http.headers["Authorization"] = f"Bearer {key}"
            for query, variables in (
                (CONFIGURE, {"dir": "/scoped", "max": 1}),
                (BULK, {"filter": {"workDirectory": "/scoped"}}),
                (RETRY, {"filter": {"workDirectory": "/scoped"}}),
            ):
                sent = await http.post("/graphql", json={"query": query, "variables": variables})
                body = sent.json()
                if allowed:
                    assert not body.get("errors"), body
                else:
                    assert (sent.status_code, body["errors"][0]["extensions"]["code"]) == (
                        403,
                        "FORBIDDEN",
                    )
            assert (await client.ok(DIRECTORIES))["workDirectories"] is not None
        http.headers["Authorization"] = f"Bearer {submitter}"
        put = await http.put("/api/v1/work-directories", json={"work_directory": "/scoped"})
        assert put.status_code == 403
