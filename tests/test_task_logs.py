"""Progress and logs of held tasks: storing, numbering under concurrency, paging, pruning, and the
taskLogs subscription across server processes over a real WebSocket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.core import domain
from api.core.errors import Conflict, NotFound, ValidationError
from api.core.service import TaskService
from tests.conftest import FakeClock, GraphQLClient, ServerProcess
from tests.ws import Subscriber

SUBMIT = 'mutation { submitTask(input: {workDirectory: "/repo", prompt: "p"}) { id } }'
CLAIM = 'mutation($w: String!) { claimTask(workDirectory: "/repo", workerId: $w) { id } }'
APPEND = "mutation($id: ID!, $w: String!, $lines: [String!]!) {"
APPEND += " appendTaskLog(id: $id, workerId: $w, lines: $lines) }"
PROGRESS = """mutation($id: ID!, $w: String!, $p: Float, $m: String, $lease: Int) {
  reportProgress(id: $id, workerId: $w, progress: $p, message: $m, leaseSeconds: $lease) {
    progress progressMessage leaseExpiresAt version logLineCount } }"""
LOGS = """query($id: ID!, $after: Int, $first: Int!) { task(id: $id) {
  logLineCount logs(after: $after, first: $first) { lines { line text at } lastLine hasNextPage } } }"""
TASK_LOGS = """subscription($taskId: ID!, $after: Int) {
  taskLogs(taskId: $taskId, after: $after) { line text at } }"""


async def held_task(client: GraphQLClient, worker: str = "w1") -> str:
    await client.ok(SUBMIT)
    task_id: str = (await client.ok(CLAIM, w=worker))["claimTask"]["id"]
    return task_id


async def test_report_progress_stores_it_and_extends_the_lease(gql: GraphQLClient) -> None:
    task_id = await held_task(gql)
    first = await gql.ok(PROGRESS, id=task_id, w="w1", p=0.25, m="reading", lease=30)
    assert first["reportProgress"]["progress"] == 0.25
    assert first["reportProgress"]["progressMessage"] == "reading"
    later = await gql.ok(PROGRESS, id=task_id, w="w1", p=None, m=None, lease=3000)
    progress = later["reportProgress"]
    assert progress["progress"] == 0.25
    assert progress["progressMessage"] == "reading"
    assert progress["leaseExpiresAt"] > first["reportProgress"]["leaseExpiresAt"]
    done = (await gql.ok(PROGRESS, id=task_id, w="w1", p=1, m="done"))["reportProgress"]
    assert done["progress"] == 1.0
    assert done["progressMessage"] == "done"
    # no history row: progress is not a status change
    history = await gql.ok(f'{{ task(id: "{task_id}") {{ history {{ status }} }} }}')
    assert [e["status"] for e in history["task"]["history"]] == ["WAITING", "WORKING"]


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({"p": 1.5}, "progress"),
        ({"p": -0.1}, "progress"),
        ({"m": "x" * (domain.MAX_PROGRESS_MESSAGE + 1)}, "message"),
        ({"m": "a\x00b"}, "message"),
        ({"lease": 0}, "leaseSeconds"),
    ],
)
async def test_bad_progress_is_refused_naming_the_field(
    gql: GraphQLClient, variables: dict[str, Any], field: str
) -> None:
    task_id = await held_task(gql)
    error = await gql.error(PROGRESS, id=task_id, w="w1", **variables)
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": field}, error
    task = await gql.ok(f'{{ task(id: "{task_id}") {{ progress progressMessage }} }}')
    assert task["task"] == {"progress": None, "progressMessage": None}


async def test_only_the_holder_reports_progress_or_appends(gql: GraphQLClient) -> None:
    task_id = await held_task(gql)
    for query, variables in ((PROGRESS, {"p": 0.5}), (APPEND, {"lines": ["x"]})):
        error = await gql.error(query, id=task_id, w="intruder", **variables)
        assert error["extensions"]["code"] == "CONFLICT"
        assert "held by another worker" in error["message"]
    await gql.ok("mutation($id: ID!) { cancelTask(id: $id) { id } }", id=task_id)
    error = await gql.error(APPEND, id=task_id, w="w1", lines=["late"])
    assert error["extensions"]["code"] == "CONFLICT"
    assert "CANCELLED" in error["message"]
    logs = await gql.ok(LOGS, id=task_id, after=0, first=10)
    assert logs["task"]["logLineCount"] == 0
    assert logs["task"]["logs"]["lines"] == []


async def test_appends_are_numbered_on_and_read_in_pages(gql: GraphQLClient) -> None:
    task_id = await held_task(gql)
    assert (await gql.ok(APPEND, id=task_id, w="w1", lines=["a", "b", "c"]))["appendTaskLog"] == 3
    assert (await gql.ok(APPEND, id=task_id, w="w1", lines=["", "é ✓"]))["appendTaskLog"] == 5
    page = (await gql.ok(LOGS, id=task_id, after=0, first=2))["task"]
    assert page["logLineCount"] == 5
    assert [(n["line"], n["text"]) for n in page["logs"]["lines"]] == [(1, "a"), (2, "b")]
    assert page["logs"]["hasNextPage"]
    assert page["logs"]["lastLine"] == 2
    rest = (await gql.ok(LOGS, id=task_id, after=2, first=10))["task"]["logs"]
    assert [(n["line"], n["text"]) for n in rest["lines"]] == [(3, "c"), (4, ""), (5, "é ✓")]
    assert not rest["hasNextPage"]
    assert rest["lastLine"] == 5
    empty = (await gql.ok(LOGS, id=task_id, after=5, first=10))["task"]["logs"]
    assert empty == {"lines": [], "lastLine": 5, "hasNextPage": False}


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        ([], "lines"),
        (["ok"] * (domain.MAX_LOG_LINES_PER_CALL + 1), "lines"),
        (["ok", "é" * (domain.MAX_LOG_LINE_BYTES // 2 + 1)], "lines[1]"),
        (["ok", "ok", "a\x00"], "lines[2]"),
    ],
)
async def test_bad_log_lines_are_refused_whole(
    gql: GraphQLClient, lines: list[str], field: str
) -> None:
    task_id = await held_task(gql)
    error = await gql.error(APPEND, id=task_id, w="w1", lines=lines)
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": field}, error
    logs = await gql.ok(LOGS, id=task_id, after=0, first=10)
    assert logs["task"]["logLineCount"] == 0
    assert logs["task"]["logs"]["lines"] == []
    # the longest line allowed is stored as it is
    longest = "é" * (domain.MAX_LOG_LINE_BYTES // 2)
    assert (await gql.ok(APPEND, id=task_id, w="w1", lines=[longest]))["appendTaskLog"] == 1


async def test_a_new_claim_starts_progress_again(service: TaskService, submit_task: Any) -> None:
    task = await submit_task()
    (held,) = await service.claim("/repo", "w1")
    await service.report_progress(held.id, "w1", 0.5, "half")
    await service.append_logs(held.id, "w1", ["one"])
    await service.release(held.id, "w1")
    (again,) = await service.claim("/repo", "w2")
    assert again.id == task.id
    assert again.progress is None
    assert again.progress_message is None
    assert again.log_line_count == 1  # the log spans attempts
    assert await service.append_logs(again.id, "w2", ["two"]) == 2


async def test_many_concurrent_appenders_get_each_line_number_once(
    service: TaskService, submit_task: Any
) -> None:
    await submit_task()
    (task,) = await service.claim("/repo", "w1")

    async def append(n: int) -> int:
        return await service.append_logs(task.id, "w1", [f"{n}.{i}" for i in range(n % 3 + 1)])

    async def intrude() -> None:
        with pytest.raises(Conflict):
            await service.append_logs(task.id, "intruder", ["no"])

    results = await asyncio.gather(*(append(n) for n in range(60)), *(intrude() for _ in range(10)))
    total = sum(n % 3 + 1 for n in range(60))
    lasts = [r for r in results if r is not None]
    assert len(set(lasts)) == 60
    assert max(lasts) == total
    lines, more = await service.log_page(task.id, 0, 1000)
    assert not more
    assert [line.line for line in lines] == list(range(1, total + 1))
    # each call's lines are stored together, in order, ending at the number it was told
    by_text = {line.text: line.line for line in lines}
    for n in range(60):
        count = n % 3 + 1
        numbers = [by_text[f"{n}.{i}"] for i in range(count)]
        assert numbers == list(range(numbers[0], numbers[0] + count))
        assert numbers[-1] in lasts
    assert "no" not in by_text


async def test_logs_of_a_missing_task_are_not_found(service: TaskService) -> None:
    with pytest.raises(NotFound):
        await service.log_page("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValidationError) as refused:
        await service.log_page("00000000-0000-0000-0000-000000000000", after=-1)
    assert refused.value.field == "after"


async def test_the_oldest_lines_go_past_the_cap(
    service: TaskService, submit_task: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.store import changes

    monkeypatch.setattr(changes, "MAX_LOG_LINES_KEPT", 5)
    await submit_task()
    (task,) = await service.claim("/repo", "w1")
    await service.append_logs(task.id, "w1", [str(n) for n in range(1, 5)])
    assert await service.append_logs(task.id, "w1", [str(n) for n in range(5, 8)]) == 7
    lines, _ = await service.log_page(task.id, 0, 100)
    assert [(line.line, line.text) for line in lines] == [(n, str(n)) for n in range(3, 8)]


async def test_prune_deletes_a_task_with_its_log(
    service: TaskService, submit_task: Any, clock: FakeClock
) -> None:
    kept = await submit_task()
    await submit_task(work_directory="/other")
    (task,) = await service.claim("/other", "w1")
    await service.append_logs(task.id, "w1", ["a", "b"])
    await service.complete(task.id, "w1")
    clock.advance(3600)
    assert await service.prune(timedelta(minutes=1)) == 1
    assert await service.store.logs_after(task.id, 0, 10) == []
    assert (await service.get(kept.id)).status is domain.TaskStatus.WAITING


async def test_log_stream_ends_when_the_task_does(service: TaskService, submit_task: Any) -> None:
    await submit_task()
    (task,) = await service.claim("/repo", "w1")
    await service.append_logs(task.id, "w1", ["before"])
    got: list[tuple[int, str]] = []

    async def read() -> None:
        async for line in service.logs(task.id, 0):
            got.append((line.line, line.text))

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    await service.append_logs(task.id, "w1", ["during"])
    await service.complete(task.id, "w1")
    await asyncio.wait_for(reader, 5)
    assert got == [(1, "before"), (2, "during")]


# --- over the network ---


async def test_rest_progress_and_logs(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=f"{server.url}/api/v1", timeout=30) as http:
        created = (await http.post("/tasks", json={"work_directory": "/r", "prompt": "p"})).json()
        task_id = created["data"]["id"]
        await http.get("/tasks/next", params={"work_directory": "/r", "worker_id": "w"})
        progress = await http.post(
            f"/tasks/{task_id}/progress", json={"worker_id": "w", "progress": 0.5, "message": "m"}
        )
        assert progress.status_code == 200, progress.text
        assert progress.json()["data"]["progress"] == 0.5
        bad = await http.post(f"/tasks/{task_id}/progress", json={"worker_id": "w", "progress": 2})
        assert bad.status_code == 400
        assert bad.json()["error"]["details"]["field"] == "progress"
        appended = await http.post(
            f"/tasks/{task_id}/logs", json={"worker_id": "w", "lines": ["a", "b"]}
        )
        assert appended.json()["data"] == {"last_line": 2}
        other = await http.post(f"/tasks/{task_id}/logs", json={"worker_id": "x", "lines": ["c"]})
        assert other.status_code == 409
        page = (await http.get(f"/tasks/{task_id}/logs", params={"after": 1, "first": 5})).json()
        assert [(n["line"], n["text"]) for n in page["data"]["lines"]] == [(2, "b")]
        assert page["data"]["last_line"] == 2
        assert page["data"]["has_more"] is False
        missing = await http.get("/tasks/00000000-0000-0000-0000-000000000000/logs")
        assert missing.status_code == 404
        assert (await http.get(f"/tasks/{task_id}")).json()["data"]["log_line_count"] == 2


async def test_subscriber_on_one_server_sees_every_line_once_while_another_appends(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    """Appends race the subscriber's replay: it starts after some lines are stored, on another
    process than the one appending, and ends when the task is completed."""
    writer_server = start_server(database_url)
    reader_server = start_server(database_url)
    async with httpx.AsyncClient(base_url=writer_server.url, timeout=30) as http:
        client = GraphQLClient(http)
        task_id = await held_task(client)
        batches = 40

        async def append_all() -> None:
            for n in range(batches):
                lines = [f"{n}.{i}" for i in range(n % 4 + 1)]
                await client.ok(APPEND, id=task_id, w="w1", lines=lines)
                if n % 10 == 0:
                    await asyncio.sleep(0.02)

        appending = asyncio.create_task(append_all())
        await asyncio.sleep(0.05)
        subscriber = await Subscriber.connect(reader_server.ws_url)
        try:
            op = await subscriber.subscribe(TASK_LOGS, taskId=task_id, after=0)
            await appending
            total = sum(n % 4 + 1 for n in range(batches))
            await client.ok(
                'mutation($id: ID!) { completeTask(id: $id, workerId: "w1") { id } }', id=task_id
            )
            received: list[int] = []
            while True:
                message = await subscriber.message(15)
                if message["type"] == "complete":
                    assert message["id"] == op
                    break
                assert message["type"] == "next", message
                assert not message["payload"].get("errors"), message
                received.append(message["payload"]["data"]["taskLogs"]["line"])
            assert received == list(range(1, total + 1))
        finally:
            await subscriber.close()


async def test_subscription_to_a_missing_task_is_an_error(server: ServerProcess) -> None:
    subscriber = await Subscriber.connect(server.ws_url)
    try:
        await subscriber.subscribe(TASK_LOGS, taskId="00000000-0000-0000-0000-000000000000")
        message = await subscriber.message()
        assert message["type"] in ("error", "next"), message
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "NOT_FOUND"
    finally:
        await subscriber.close()


async def test_the_migration_keeps_existing_tasks(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.settings import Settings
    from api.store import migrations, open_store
    from api.store.base import SCHEMA_VERSION

    every = list(migrations._MIGRATIONS)
    monkeypatch.setattr(migrations, "_MIGRATIONS", every[:4])
    old = open_store(Settings(database_url=database_url, durability="normal"))
    await old.open()
    task_id = "6f1c0a4e-0000-4000-8000-000000000001"
    d = old.sql.dialect  # type: ignore[attr-defined]
    now = d.time(datetime.now(UTC))
    await old._write(  # type: ignore[attr-defined]
        (
            "INSERT INTO tasks (id, work_directory, prompt, priority, status, worker_id,"
            " created_at, updated_at, lease_expires_at) VALUES (:id, '/repo', 'kept', 1,"
            " 'WORKING', 'w1', :now, :now, :lease)",
            {"id": task_id, "now": now, "lease": d.time(datetime.now(UTC) + timedelta(hours=1))},
        )
    )
    assert await old.schema_version() == 4
    await old.close()
    monkeypatch.setattr(migrations, "_MIGRATIONS", every)
    new = open_store(Settings(database_url=database_url, durability="normal"))
    await new.open()
    try:
        assert await new.schema_version() == SCHEMA_VERSION
        task = await new.get(task_id)
        assert task is not None
        assert (task.prompt, task.worker_id, task.status) == (
            "kept",
            "w1",
            domain.TaskStatus.WORKING,
        )
        assert (task.progress, task.progress_message, task.log_line_count) == (None, None, 0)
        assert await new.append_logs(task_id, "w1", ["first"], datetime.now(UTC)) == 1
    finally:
        await new.close()


def test_a_backup_keeps_the_logs(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'live.db'}"
    server = start_server(url)
    base = f"{server.url}/api/v1"
    task_id = httpx.post(f"{base}/tasks", json={"work_directory": "/r", "prompt": "p"}).json()[
        "data"
    ]["id"]
    httpx.get(f"{base}/tasks/next", params={"work_directory": "/r", "worker_id": "w"})
    httpx.post(f"{base}/tasks/{task_id}/logs", json={"worker_id": "w", "lines": ["a", "b"]})
    backup = tmp_path / "backup.db"
    command = [sys.executable, "-m", "api.cli", "backup", "--database", url, str(backup)]
    subprocess.run(command, check=True, capture_output=True)
    copy = start_server(f"sqlite:///{backup}")
    page = httpx.get(f"{copy.url}/api/v1/tasks/{task_id}/logs").json()["data"]
    assert [line["text"] for line in page["lines"]] == ["a", "b"]
