"""REST v1: every route through the app in-process, with the envelope and its error codes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from api.settings import Settings
from tests.conftest import running_app

API = "/api/v1"


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, durability="normal", lease_sweep_interval=0.2)
    async with running_app(settings) as client:
        yield client


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "data", "error", "timestamp"}
    assert body["success"] is True
    assert body["error"] is None
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    return body["data"]


def failed(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"code", "message", "details"}
    error: dict[str, Any] = body["error"]
    return error


async def submit(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    fields.setdefault("work_directory", "/repo")
    fields.setdefault("prompt", "fix the bug")
    task: dict[str, Any] = ok(await http.post(f"{API}/tasks", json=fields), 201)
    return task


async def claim(http: httpx.AsyncClient, worker: str = "w1", path: str = "/repo") -> Any:
    return ok(await http.get(f"{API}/tasks/next", params={"work_path": path, "worker_id": worker}))


async def test_create_returns_201_with_snake_case_task(http: httpx.AsyncClient) -> None:
    task = await submit(
        http,
        priority="HIGH",
        tags=["ci"],
        metadata={"ticket": 7},
        max_retries=1,
        idempotency_key="k1",
    )
    assert task["status"] == "WAITING"
    assert task["priority"] == "HIGH"
    assert task["work_directory"] == "/repo"
    assert task["tags"] == ["ci"]
    assert task["metadata"] == {"ticket": 7}
    assert task["max_retries"] == 1
    assert task["version"] == 1
    uuid.UUID(task["id"])
    again = await submit(http, idempotency_key="k1", prompt="other")
    assert again["id"] == task["id"]


async def test_bad_input_is_400_with_the_graphql_message_and_snake_case_field(
    http: httpx.AsyncClient,
) -> None:
    error = failed(
        await http.post(f"{API}/tasks", json={"work_directory": "repo", "prompt": "x"}),
        400,
        "VALIDATION_ERROR",
    )
    assert error["message"] == "work_directory must be an absolute POSIX path starting with '/'"
    assert error["details"] == {"field": "work_directory"}
    error = failed(
        await http.post(f"{API}/tasks", json={"work_directory": "/r", "prompt": "x", "priorty": 1}),
        400,
        "VALIDATION_ERROR",
    )
    assert error["details"]["field"] == "priorty"
    error = failed(
        await http.post(
            f"{API}/tasks", json={"work_directory": "/r", "prompt": "x", "max_retries": 500}
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert error["details"]["field"] == "max_retries"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_malformed_json_is_400(http: httpx.AsyncClient, body: bytes) -> None:
    response = await http.post(
        f"{API}/tasks", content=body, headers={"content-type": "application/json"}
    )
    assert failed(response, 400, "VALIDATION_ERROR")["details"]["field"] == "body"


async def test_list_filters_and_pages_by_offset(http: httpx.AsyncClient) -> None:
    ids = [
        (await submit(http, prompt=f"p{i}", tags=["even"] if i % 2 == 0 else []))["id"]
        for i in range(5)
    ]
    await submit(http, work_directory="/other", priority="LOW")
    page = ok(
        await http.get(f"{API}/tasks", params={"work_directory": "/repo", "limit": 2, "offset": 2})
    )
    assert [t["id"] for t in page["tasks"]] == ids[2:4]
    assert page["total"] == 5
    assert page["has_more"] is True
    assert (page["limit"], page["offset"]) == (2, 2)
    last = ok(await http.get(f"{API}/tasks", params={"work_directory": "/repo", "offset": 4}))
    assert [t["id"] for t in last["tasks"]] == ids[4:]
    assert last["has_more"] is False
    even = ok(await http.get(f"{API}/tasks", params={"tag": "even"}))
    assert [t["id"] for t in even["tasks"]] == ids[0::2]
    low = ok(await http.get(f"{API}/tasks", params={"priority": "LOW"}))
    assert [t["work_directory"] for t in low["tasks"]] == ["/other"]
    await claim(http)
    working = ok(
        await http.get(f"{API}/tasks", params=[("status", "WORKING"), ("status", "FAILED")])
    )
    assert [t["id"] for t in working["tasks"]] == ids[:1]
    failed(await http.get(f"{API}/tasks", params={"limit": "many"}), 400, "VALIDATION_ERROR")
    failed(await http.get(f"{API}/tasks", params={"status": "DONE"}), 400, "VALIDATION_ERROR")


async def test_next_claims_or_returns_null(http: httpx.AsyncClient) -> None:
    assert await claim(http) is None
    task = await submit(http)
    claimed = await claim(http)
    assert claimed["id"] == task["id"]
    assert claimed["status"] == "WORKING"
    assert claimed["worker_id"] == "w1"
    assert claimed["lease_expires_at"] is not None
    assert await claim(http) is None
    error = failed(
        await http.get(f"{API}/tasks/next", params={"worker_id": "w"}), 400, "VALIDATION_ERROR"
    )
    assert error["details"]["field"] == "work_directory"
    assert "work_directory" in error["message"]
    assert "work_path" in error["message"]


async def test_next_takes_work_directory_as_well_as_work_path(http: httpx.AsyncClient) -> None:
    task = await submit(http, work_directory="/dir")
    params = {"work_directory": "/dir", "worker_id": "w"}
    claimed = ok(await http.get(f"{API}/tasks/next", params=params))
    assert claimed["id"] == task["id"]
    error = failed(
        await http.get(f"{API}/tasks/next", params={"work_directory": "dir", "worker_id": "w"}),
        400,
        "VALIDATION_ERROR",
    )
    assert error["details"]["field"] == "work_directory"


async def test_next_waits_for_a_task(http: httpx.AsyncClient) -> None:
    import asyncio

    waiting = asyncio.ensure_future(
        http.get(
            f"{API}/tasks/next", params={"work_path": "/repo", "worker_id": "w", "wait_seconds": 10}
        )
    )
    await asyncio.sleep(0.2)
    task = await submit(http)
    assert ok(await waiting)["id"] == task["id"]


async def test_get_and_not_found(http: httpx.AsyncClient) -> None:
    task = await submit(http)
    assert ok(await http.get(f"{API}/tasks/{task['id']}")) == task
    error = failed(await http.get(f"{API}/tasks/{uuid.uuid4()}"), 404, "NOT_FOUND")
    assert "no task with id" in error["message"]
    failed(await http.get(f"{API}/tasks/not-a-uuid"), 400, "VALIDATION_ERROR")


async def test_put_updates_with_expected_version(http: httpx.AsyncClient) -> None:
    task = await submit(http)
    url = f"{API}/tasks/{task['id']}"
    updated = ok(
        await http.put(url, json={"expected_version": 1, "prompt": "new", "priority": "LOW"})
    )
    assert updated["prompt"] == "new"
    assert updated["priority"] == "LOW"
    assert updated["version"] == 2
    stale = failed(
        await http.put(url, json={"expected_version": 1, "prompt": "x"}), 409, "CONFLICT"
    )
    assert stale["details"] == {"currentVersion": 2}
    error = failed(await http.put(url, json={"prompt": "x"}), 400, "VALIDATION_ERROR")
    assert error["details"]["field"] == "expected_version"
    failed(await http.put(url, json={"expected_version": 2}), 400, "VALIDATION_ERROR")


async def test_complete_with_original_prompt(http: httpx.AsyncClient) -> None:
    task = await submit(http, prompt="the prompt")
    await claim(http)
    url = f"{API}/tasks/{task['id']}/complete"
    body = {"worker_id": "w1", "result": {"ok": True}, "original_prompt": "another prompt"}
    failed(await http.post(url, json=body), 409, "CONFLICT")
    assert ok(await http.get(f"{API}/tasks/{task['id']}"))["status"] == "WORKING"
    failed(
        await http.post(url, json={**body, "worker_id": "w2", "original_prompt": "the prompt"}),
        409,
        "CONFLICT",
    )
    done = ok(await http.post(url, json={**body, "original_prompt": "the prompt"}))
    assert done["status"] == "COMPLETED"
    assert done["result"] == {"ok": True}
    failed(await http.post(url, json={"worker_id": "w1"}), 409, "CONFLICT")
    other = await submit(http)
    await claim(http)
    done = ok(
        await http.post(
            f"{API}/tasks/{other['id']}/complete", json={"worker_id": "w1", "result": 42}
        )
    )
    assert done["result"] == 42


async def test_fail_requeues_then_fails(http: httpx.AsyncClient) -> None:
    task = await submit(http, max_retries=0)
    await claim(http)
    url = f"{API}/tasks/{task['id']}/fail"
    failed(await http.post(url, json={"worker_id": "w1"}), 400, "VALIDATION_ERROR")
    failed(
        await http.post(url, json={"worker_id": "w1", "error": "x", "retry": "no"}),
        400,
        "VALIDATION_ERROR",
    )
    result = ok(await http.post(url, json={"worker_id": "w1", "error": "boom"}))
    assert result["status"] == "FAILED"
    assert result["error_message"] == "boom"


async def test_cancel_and_retry(http: httpx.AsyncClient) -> None:
    task = await submit(http)
    url = f"{API}/tasks/{task['id']}"
    failed(await http.post(f"{url}/retry"), 409, "CONFLICT")
    cancelled = ok(await http.post(f"{url}/cancel", json={"reason": "not needed"}))
    assert cancelled["status"] == "CANCELLED"
    failed(await http.post(f"{url}/cancel"), 409, "CONFLICT")
    retried = ok(await http.post(f"{url}/retry"))
    assert retried["status"] == "WAITING"
    assert ok(await http.post(f"{url}/cancel"))["status"] == "CANCELLED"  # the body is optional
    failed(await http.post(f"{API}/tasks/{uuid.uuid4()}/cancel"), 404, "NOT_FOUND")


async def test_statistics(http: httpx.AsyncClient) -> None:
    await submit(http)
    await submit(http, work_directory="/other")
    await claim(http)
    stats = ok(await http.get(f"{API}/statistics"))
    assert stats == {
        "total": 2,
        "waiting": 1,
        "working": 1,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "blocked": 0,
        "in_review": 0,
    }
    assert (
        ok(await http.get(f"{API}/statistics", params={"work_directory": "/other"}))["total"] == 1
    )
    failed(
        await http.get(f"{API}/statistics", params={"work_directory": "x"}), 400, "VALIDATION_ERROR"
    )


async def test_openapi_lists_every_route(http: httpx.AsyncClient) -> None:
    response = await http.get(f"{API}/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {path: sorted(ops) for path, ops in paths.items()} == {
        "/api/v1/tasks": ["get", "post"],
        "/api/v1/tasks/next": ["get"],
        "/api/v1/tasks/{id}": ["get", "put"],
        "/api/v1/tasks/{id}/complete": ["post"],
        "/api/v1/tasks/{id}/fail": ["post"],
        "/api/v1/tasks/{id}/cancel": ["post"],
        "/api/v1/tasks/{id}/retry": ["post"],
        "/api/v1/tasks/{id}/approve": ["post"],
        "/api/v1/tasks/{id}/reject": ["post"],
        "/api/v1/tasks/{id}/progress": ["post"],
        "/api/v1/tasks/{id}/logs": ["get", "post"],
        "/api/v1/statistics": ["get"],
        "/api/v1/tasks/cancel": ["post"],
        "/api/v1/tasks/retry": ["post"],
        "/api/v1/work-directories": ["get", "put"],
    }


async def test_scopes_are_enforced_per_route(database_url: str) -> None:
    from datetime import UTC, datetime

    from api.security.keys import issue_key
    from api.store import open_store

    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    try:
        _, reader = await issue_key(store.keys, "reader", "read", datetime.now(UTC))
        _, worker = await issue_key(store.keys, "worker", "work", datetime.now(UTC))
    finally:
        await store.close()
    settings = Settings(database_url=database_url, durability="normal")
    async with running_app(settings) as http:
        as_reader = {"Authorization": f"Bearer {reader}"}
        as_worker = {"Authorization": f"Bearer {worker}"}
        body = {"work_directory": "/repo", "prompt": "p"}
        failed(await http.post(f"{API}/tasks", json=body), 401, "UNAUTHENTICATED")
        error = failed(
            await http.post(f"{API}/tasks", json=body, headers=as_reader), 403, "FORBIDDEN"
        )
        assert "submit" in error["message"]
        assert ok(await http.get(f"{API}/statistics", headers=as_reader))["total"] == 0
        failed(await http.get(f"{API}/statistics", headers=as_worker), 403, "FORBIDDEN")
        params = {"work_path": "/repo", "worker_id": "w"}
        assert ok(await http.get(f"{API}/tasks/next", params=params, headers=as_worker)) is None
        failed(
            await http.get(f"{API}/tasks/next", params=params, headers=as_reader), 403, "FORBIDDEN"
        )
        logs = f"{API}/tasks/00000000-0000-0000-0000-000000000000/logs"
        append = {"worker_id": "w", "lines": ["x"]}
        failed(await http.post(logs, json=append, headers=as_reader), 403, "FORBIDDEN")
        failed(await http.post(logs, json=append, headers=as_worker), 404, "NOT_FOUND")
        failed(await http.get(logs, headers=as_worker), 403, "FORBIDDEN")
        failed(await http.get(logs, headers=as_reader), 404, "NOT_FOUND")
        progress = logs.removesuffix("/logs") + "/progress"
        failed(
            await http.post(progress, json={"worker_id": "w"}, headers=as_reader), 403, "FORBIDDEN"
        )


async def test_a_method_a_path_lacks_is_405_naming_every_method_it_has(
    http: httpx.AsyncClient,
) -> None:
    task = await submit(http)
    expected = {
        f"{API}/tasks": "GET, HEAD, POST",
        f"{API}/tasks/next": "GET, HEAD",
        f"{API}/tasks/{task['id']}": "GET, HEAD, PUT",
        f"{API}/tasks/{task['id']}/complete": "POST",
        f"{API}/tasks/{task['id']}/fail": "POST",
        f"{API}/tasks/{task['id']}/cancel": "POST",
        f"{API}/tasks/{task['id']}/retry": "POST",
        f"{API}/tasks/{task['id']}/progress": "POST",
        f"{API}/tasks/{task['id']}/logs": "GET, HEAD, POST",
        f"{API}/statistics": "GET, HEAD",
        f"{API}/openapi.json": "GET, HEAD",
    }
    for path, allow in expected.items():
        for method in ("OPTIONS", "DELETE", "PATCH"):
            response = await http.request(method, path)
            failed(response, 405, "METHOD_NOT_ALLOWED")
            assert response.headers["allow"] == allow, (method, path)
    response = await http.put(f"{API}/tasks/next", json={"expected_version": 1, "prompt": "p"})
    failed(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "GET, HEAD"


async def test_whole_numbers_written_with_a_fraction_are_whole_numbers(
    http: httpx.AsyncClient,
) -> None:
    task = await submit(http, max_retries=13.0)
    assert task["max_retries"] == 13
    body = {"expected_version": float(task["version"]), "max_retries": 2.0}
    assert ok(await http.put(f"{API}/tasks/{task['id']}", json=body))["max_retries"] == 2
    failed(await http.post(f"{API}/tasks", json={"work_directory": "/r", "prompt": "p",
                                                 "max_retries": 1.5}), 400, "VALIDATION_ERROR")  # fmt: skip


async def test_openapi_declares_bearer_keys_and_the_middlewares_refusals(
    http: httpx.AsyncClient,
) -> None:
    document = (await http.get(f"{API}/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert document["security"] == [{"bearer": []}]
    for path in document["paths"].values():
        for operation in path.values():
            assert {"401", "403", "413", "429", "503"} <= set(operation["responses"])
            assert "Retry-After" in operation["responses"]["429"]["headers"]
    update = document["paths"]["/api/v1/tasks/{id}"]["put"]["requestBody"]
    assert "anyOf" in update["content"]["application/json"]["schema"]


async def test_dependencies_and_reviews_over_rest(database_url: str) -> None:
    from datetime import UTC, datetime

    from api.security.keys import issue_key
    from api.store import open_store

    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    try:
        _, admin = await issue_key(store.keys, "admin", "admin", datetime.now(UTC))
        _, worker = await issue_key(store.keys, "worker", "work,submit,read", datetime.now(UTC))
        _, reviewer = await issue_key(store.keys, "reviewer", "review", datetime.now(UTC))
    finally:
        await store.close()
    settings = Settings(database_url=database_url, durability="normal")
    async with running_app(settings) as http:
        http.headers["Authorization"] = f"Bearer {admin}"
        first = await submit(http, work_directory="/a", require_review=True)
        assert (first["require_review"], first["depends_on"]) == (True, [])
        then = await submit(http, depends_on=[first["id"]])
        assert (then["status"], then["blocked_by"]) == ("BLOCKED", [first["id"]])
        missing = str(uuid.uuid4())
        error = failed(
            await http.post(
                f"{API}/tasks",
                json={"work_directory": "/r", "prompt": "p", "depends_on": [first["id"], missing]},
            ),
            400,
            "VALIDATION_ERROR",
        )
        assert error["details"] == {"field": "depends_on[1]"}
        assert (await claim(http, path="/a"))["id"] == first["id"]
        done = ok(await http.post(f"{API}/tasks/{first['id']}/complete", json={"worker_id": "w1"}))
        assert done["status"] == "IN_REVIEW"
        stats = ok(await http.get(f"{API}/statistics"))
        assert (stats["blocked"], stats["in_review"]) == (1, 1)
        as_worker = {"Authorization": f"Bearer {worker}"}
        as_reviewer = {"Authorization": f"Bearer {reviewer}"}
        approve = f"{API}/tasks/{first['id']}/approve"
        failed(await http.post(approve, headers=as_worker), 403, "FORBIDDEN")
        rejected = ok(
            await http.post(
                f"{API}/tasks/{first['id']}/reject",
                json={"feedback": "tests?"},
                headers=as_reviewer,
            )
        )
        assert (rejected["status"], rejected["review_feedback"], rejected["retry_count"]) == (
            "WAITING", "tests?", 1,
        )  # fmt: skip
        failed(await http.post(approve, headers=as_reviewer), 409, "CONFLICT")
        await claim(http, path="/a")
        await http.post(f"{API}/tasks/{first['id']}/complete", json={"worker_id": "w1"})
        approved = ok(await http.post(approve, json={"note": "fine"}, headers=as_reviewer))
        assert approved["status"] == "COMPLETED"
        after = ok(await http.get(f"{API}/tasks/{then['id']}"))
        assert (after["status"], after["blocked_by"]) == ("WAITING", [])
        listed = ok(await http.get(f"{API}/tasks", params={"status": "WAITING"}))
        assert [t["id"] for t in listed["tasks"]] == [then["id"]]
