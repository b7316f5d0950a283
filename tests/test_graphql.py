"""The GraphQL contract: names, defaults, error codes, and hostile documents, over the ASGI app."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import GraphQLClient

TASK_FIELDS = """
    id workDirectory prompt priority tags status workerId createdAt startedAt completedAt updatedAt
    result errorMessage retryCount maxRetries metadata version leaseExpiresAt runAfter idempotencyKey
    history { id taskId status previousStatus workerId at details task { id } }
"""
SUBMIT = f"mutation($input: SubmitTaskInput!) {{ submitTask(input: $input) {{ {TASK_FIELDS} }} }}"
CLAIM = """mutation($dir: String!, $worker: String!, $lease: Int, $wait: Float) {
  claimTask(workDirectory: $dir, workerId: $worker, leaseSeconds: $lease, waitSeconds: $wait) {
    id status workerId version leaseExpiresAt } }"""
COMPLETE = """mutation($id: ID!, $worker: String!, $result: JSON) {
  completeTask(id: $id, workerId: $worker, result: $result) { id status result completedAt } }"""
FAIL = """mutation($id: ID!, $worker: String!, $error: String!, $retry: Boolean) {
  failTask(id: $id, workerId: $worker, error: $error, retry: $retry) {
    id status retryCount errorMessage runAfter } }"""


async def submit(gql: GraphQLClient, **fields: Any) -> dict[str, Any]:
    fields.setdefault("workDirectory", "/repo")
    fields.setdefault("prompt", "do it")
    data = await gql.ok(SUBMIT, input=fields)
    task: dict[str, Any] = data["submitTask"]
    return task


async def test_submit_returns_every_contract_field(gql: GraphQLClient) -> None:
    task = await submit(gql, tags=["a"], metadata={"k": [1, 2]}, idempotencyKey="k1")
    assert task["status"] == "WAITING"
    assert task["priority"] == "MEDIUM"
    assert task["maxRetries"] == 3
    assert task["retryCount"] == 0
    assert task["version"] == 1
    assert task["metadata"] == {"k": [1, 2]}
    assert task["tags"] == ["a"]
    assert task["idempotencyKey"] == "k1"
    assert task["result"] is None
    assert task["createdAt"].endswith("+00:00")
    (event,) = task["history"]
    assert event["status"] == "WAITING"
    assert event["previousStatus"] is None
    assert event["taskId"] == task["id"]
    assert event["task"]["id"] == task["id"]


async def test_full_lifecycle_over_graphql(gql: GraphQLClient) -> None:
    task = await submit(gql)
    claimed = (await gql.ok(CLAIM, dir="/repo", worker="w1", lease=60))["claimTask"]
    assert claimed["id"] == task["id"]
    assert claimed["status"] == "WORKING"
    beat = await gql.ok(
        'mutation($id: ID!) { heartbeat(id: $id, workerId: "w1", leaseSeconds: 120) { version } }',
        id=task["id"],
    )
    assert beat["heartbeat"]["version"] == claimed["version"] + 1
    done = (await gql.ok(COMPLETE, id=task["id"], worker="w1", result={"ok": True}))["completeTask"]
    assert done["status"] == "COMPLETED"
    assert done["result"] == {"ok": True}
    stats = await gql.ok("{ statistics { total waiting working completed failed cancelled } }")
    assert stats["statistics"] == {
        "total": 1, "waiting": 0, "working": 0, "completed": 1, "failed": 0, "cancelled": 0,
    }  # fmt: skip


async def test_claim_returns_null_when_nothing_is_claimable(gql: GraphQLClient) -> None:
    assert (await gql.ok(CLAIM, dir="/empty", worker="w1"))["claimTask"] is None


async def test_fail_retry_cancel_update_over_graphql(gql: GraphQLClient) -> None:
    task = await submit(gql, maxRetries=0)
    await gql.ok(CLAIM, dir="/repo", worker="w1")
    failed = (await gql.ok(FAIL, id=task["id"], worker="w1", error="boom"))["failTask"]
    assert failed["status"] == "FAILED"
    assert failed["errorMessage"] == "boom"
    retried = await gql.ok(
        "mutation($id: ID!) { retryTask(id: $id) { status version } }", id=task["id"]
    )
    assert retried["retryTask"]["status"] == "WAITING"
    updated = await gql.ok(
        """mutation($id: ID!, $v: Int!) { updateTask(id: $id, expectedVersion: $v,
             input: {prompt: "new", tags: ["x"], priority: LOW}) { prompt tags priority version } }""",
        id=task["id"],
        v=retried["retryTask"]["version"],
    )
    assert updated["updateTask"]["prompt"] == "new"
    assert updated["updateTask"]["priority"] == "LOW"
    cancelled = await gql.ok(
        'mutation($id: ID!) { cancelTask(id: $id, reason: "dup") { status history { details } } }',
        id=task["id"],
    )
    assert cancelled["cancelTask"]["status"] == "CANCELLED"
    assert cancelled["cancelTask"]["history"][-1]["details"] == {"reason": "dup"}


async def test_fail_with_retries_left_requeues_with_run_after(gql: GraphQLClient) -> None:
    task = await submit(gql)
    await gql.ok(CLAIM, dir="/repo", worker="w1")
    failed = (await gql.ok(FAIL, id=task["id"], worker="w1", error="flaky"))["failTask"]
    assert failed["status"] == "WAITING"
    assert failed["retryCount"] == 1
    assert failed["runAfter"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"workDirectory": "relative"}, "workDirectory"),
        ({"workDirectory": "/a/../b"}, "workDirectory"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 100_001}, "prompt"),
        ({"tags": ["bad tag"]}, "tags"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"maxRetries": 101}, "maxRetries"),
        ({"metadata": [1]}, "metadata"),
        ({"metadata": {"x": "y" * 70_000}}, "metadata"),
        ({"runAfter": "2030-01-01T00:00:00"}, "runAfter"),
        ({"metadata": {"x": "a\x00b"}}, "metadata"),
        ({"metadata": {"a\x00": 1}}, "metadata"),
        ({"idempotencyKey": "k\x00"}, "idempotencyKey"),
    ],
)
async def test_invalid_submissions_name_the_field_and_store_nothing(
    gql: GraphQLClient, fields: dict[str, Any], field: str
) -> None:
    base = {"workDirectory": "/repo", "prompt": "p", **fields}
    error = await gql.error(SUBMIT, input=base)
    assert error["extensions"]["code"] == "VALIDATION_ERROR"
    assert error["extensions"]["field"] == field, error
    assert (await gql.ok("{ statistics { total } }"))["statistics"]["total"] == 0


async def test_nul_characters_are_refused_by_name_and_change_nothing(gql: GraphQLClient) -> None:
    # PostgreSQL cannot store a NUL in TEXT or jsonb: it is the client's error, on both stores.
    task = await submit(gql, metadata={"literal": "a\\u0000b"})  # a backslash, not a NUL
    assert task["metadata"] == {"literal": "a\\u0000b"}
    await gql.ok(CLAIM, dir="/repo", worker="w1")
    for query, variables, field in [
        (FAIL, {"error": "bad\x00"}, "error"),
        (COMPLETE, {"result": {"out": ["\x00"]}}, "result"),
    ]:
        error = await gql.error(query, id=task["id"], worker="w1", **variables)
        assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": field}, error
    cancel = 'mutation($id: ID!) { cancelTask(id: $id, reason: "r\\u0000") { id } }'
    error = await gql.error(cancel, id=task["id"])
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "reason"}
    held = await gql.ok("query($id: ID!) { task(id: $id) { status version } }", id=task["id"])
    assert held["task"] == {"status": "WORKING", "version": 2}


async def test_a_subscription_over_http_says_to_use_the_websocket(gql: GraphQLClient) -> None:
    for document in [
        "subscription { taskEvents { id } }",
        "query Q { statistics { total } } subscription S { taskEvents { id } }",
    ]:
        response = await gql.http.post(
            "/graphql",
            json={"query": document, "operationName": None if "Q" not in document else "S"},
        )
        assert response.status_code == 400, response.text
        (error,) = response.json()["errors"]
        assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "query"}
        assert "WebSocket" in error["message"]
    get = await gql.http.get("/graphql", params={"query": "subscription { taskEvents { id } }"})
    assert get.json()["errors"][0]["extensions"]["code"] == "VALIDATION_ERROR"
    # the same document's query, beside it, still runs
    body = await gql.http.post(
        "/graphql",
        json={
            "query": "query Q { statistics { total } } subscription S { taskEvents { id } }",
            "operationName": "Q",
        },
    )
    assert body.json() == {"data": {"statistics": {"total": 0}}}


async def test_bad_enum_in_variables_is_a_validation_error(gql: GraphQLClient) -> None:
    error = await gql.error(
        SUBMIT, input={"workDirectory": "/r", "prompt": "p", "priority": "URGENT"}
    )
    assert error["extensions"]["code"] == "VALIDATION_ERROR"
    assert error["extensions"]["field"] == "priority"


async def test_submit_tasks_is_all_or_none(gql: GraphQLClient) -> None:
    query = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id prompt } }"
    inputs = [{"workDirectory": "/r", "prompt": f"p{i}"} for i in range(3)]
    tasks = (await gql.ok(query, inputs=inputs))["submitTasks"]
    assert [t["prompt"] for t in tasks] == ["p0", "p1", "p2"]
    error = await gql.error(query, inputs=[*inputs, {"workDirectory": "/r", "prompt": ""}])
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "inputs[3].prompt"}
    assert (await gql.ok("{ statistics { total } }"))["statistics"]["total"] == 3
    too_many = [{"workDirectory": "/r", "prompt": "p"}] * 1001
    error = await gql.error(query, inputs=too_many)
    assert error["extensions"]["field"] == "inputs"


async def test_error_codes_for_missing_and_conflicting(gql: GraphQLClient) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    error = await gql.error(COMPLETE, id=missing, worker="w")
    assert error["extensions"]["code"] == "NOT_FOUND"
    task = await submit(gql)
    error = await gql.error(COMPLETE, id=task["id"], worker="w")
    assert error["extensions"]["code"] == "CONFLICT"
    assert "WAITING" in error["message"]
    assert (await gql.ok("query($id: ID!) { task(id: $id) { id } }", id=missing))["task"] is None


BIG = 123456789012345678901234567890


async def test_integers_beyond_64_bits_stay_exact(gql: GraphQLClient) -> None:
    """JSON allows any integer: stored and answered exactly, whether the general executor or a
    compiled plan (from the second request of the same document on) reads the request."""
    metadata = {"big": BIG, "negative": -BIG, "u64": 2**64 - 1, "past": 2**64, "text": "9" * 30}
    query = "mutation($input: SubmitTaskInput!) { submitTask(input: $input) { id metadata } }"
    fields = {"workDirectory": "/repo", "prompt": "p", "metadata": metadata}
    before = REGISTRY.get_sample_value("graphql_compiled_executions_total") or 0.0
    answers = [(await gql.ok(query, input=fields))["submitTask"] for _ in range(3)]
    assert (REGISTRY.get_sample_value("graphql_compiled_executions_total") or 0.0) > before
    for task in answers:
        assert task["metadata"] == metadata
        assert type(task["metadata"]["big"]) is int
    claimed = (await gql.ok(CLAIM, dir="/repo", worker="w1"))["claimTask"]
    done = await gql.ok(COMPLETE, id=claimed["id"], worker="w1", result=[BIG, 0.00001])
    assert done["completeTask"]["result"] == [BIG, 0.00001]
    read = await gql.ok("query($id: ID!) { task(id: $id) { metadata result } }", id=claimed["id"])
    assert read["task"] == {"metadata": metadata, "result": [BIG, 0.00001]}


async def test_total_count_is_given_however_it_is_selected(gql: GraphQLClient) -> None:
    for _ in range(3):
        await submit(gql)
    fragments = {
        "{ tasks(first: 1) { totalCount } }": "totalCount",
        "{ tasks(first: 1) { all: totalCount } }": "all",
        "{ tasks(first: 1) { ...Counted } } fragment Counted on TaskConnection { totalCount }": (
            "totalCount"
        ),
        "{ tasks(first: 1) { ... on TaskConnection { n: totalCount } } }": "n",
    }
    for query, key in fragments.items():
        assert (await gql.ok(query))["tasks"][key] == 3, query
    # not selected: the page alone, and it is the same page
    without = await gql.ok("{ tasks(first: 2) { edges { node { id } } } }")
    counted = await gql.ok("{ tasks(first: 2) { totalCount edges { node { id } } } }")
    assert without["tasks"]["edges"] == counted["tasks"]["edges"]
    assert len(without["tasks"]["edges"]) == 2


async def test_stale_version_update_is_a_conflict(gql: GraphQLClient) -> None:
    task = await submit(gql)
    query = """mutation($id: ID!, $v: Int!) {
      updateTask(id: $id, expectedVersion: $v, input: {prompt: "x"}) { version } }"""
    await gql.ok(query, id=task["id"], v=1)
    error = await gql.error(query, id=task["id"], v=1)
    assert error["extensions"]["code"] == "CONFLICT"
    assert error["extensions"]["currentVersion"] == 2


async def test_tasks_connection_filters_and_pages(gql: GraphQLClient) -> None:
    for i in range(5):
        await submit(gql, tags=["t"] if i < 2 else [], priority="HIGH" if i == 0 else "LOW")
    query = """query($after: String, $tag: String, $priority: TaskPriority, $status: [TaskStatus!]) {
      tasks(first: 2, after: $after, tag: $tag, priority: $priority, status: $status) {
        totalCount pageInfo { hasNextPage endCursor } edges { cursor node { id } } } }"""
    ids, after = [], None
    while True:
        page = (await gql.ok(query, after=after))["tasks"]
        assert page["totalCount"] == 5
        ids += [e["node"]["id"] for e in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert len(set(ids)) == 5
    assert (await gql.ok(query, tag="t"))["tasks"]["totalCount"] == 2
    assert (await gql.ok(query, priority="HIGH"))["tasks"]["totalCount"] == 1
    assert (await gql.ok(query, status=["WORKING"]))["tasks"]["totalCount"] == 0
    error = await gql.error(query, after="garbage")
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "after"}


@pytest.mark.parametrize(
    "document",
    [
        "{",
        "mutation { nope }",
        "{ tasks { edges { node { id nonsense } } } }",
        "{ " + 'task(id: "x") { ' * 300 + "id" + " }" * 300 + " }",
    ],
)
async def test_malformed_documents_get_client_errors(gql: GraphQLClient, document: str) -> None:
    response = await gql.http.post("/graphql", json={"query": document})
    assert 200 <= response.status_code < 500
    body = response.json()
    assert body["errors"]
    assert body["errors"][0]["extensions"]["code"] == "VALIDATION_ERROR"
    assert (await gql.ok("{ statistics { total } }"))["statistics"]["total"] == 0


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"query": 5}', b"\xff\xfe"])
async def test_malformed_json_is_a_4xx(gql: GraphQLClient, body: bytes) -> None:
    response = await gql.http.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert (await gql.ok("{ statistics { total } }"))["statistics"]["total"] == 0


async def test_internal_errors_are_masked(
    gql: GraphQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.core.service import TaskService

    async def broken(self: TaskService, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret FROM tasks -- boom")

    monkeypatch.setattr(TaskService, "statistics", broken)
    error = await gql.error("{ statistics { total } }")
    assert error["extensions"] == {"code": "INTERNAL_ERROR"}
    assert "SELECT" not in error["message"]
    assert "Traceback" not in str(error)


ANY_ID = "7b0f5c1e-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("document", "field", "message"),
    [
        (
            'mutation { submitTask(input: {workDirectory: "repo", prompt: "x"}) { id } }',
            "workDirectory",
            "workDirectory must be an absolute POSIX path starting with '/'",
        ),
        (
            'mutation { submitTasks(inputs: [{workDirectory: "/r", prompt: "x"},'
            ' {workDirectory: "/r", prompt: " "}]) { id } }',
            "inputs[1].prompt",
            "inputs[1].prompt must be a non-empty string",
        ),
        (
            'mutation { submitTasks(inputs: [{workDirectory: "/r", prompt: "x",'
            ' idempotencyKey: ""}]) { id } }',
            "inputs[0].idempotencyKey",
            "inputs[0].idempotencyKey must be 1 to 255 characters",
        ),
        (
            'mutation { submitTask(input: {workDirectory: "/r", prompt: "x", maxRetries: 101})'
            " { id } }",
            "maxRetries",
            "maxRetries must be a whole number from 0 to 100",
        ),
        (
            'mutation { submitTask(input: {workDirectory: "/r", prompt: "x",'
            ' runAfter: "2030-01-01T00:00:00"}) { id } }',
            "runAfter",
            "runAfter must include a timezone, e.g. 2030-01-01T00:00:00Z",
        ),
        (
            'mutation { claimTask(workDirectory: "/r", workerId: " ") { id } }',
            "workerId",
            "workerId must be 1 to 255 characters",
        ),
        (
            'mutation { claimTask(workDirectory: "/r", workerId: "w", leaseSeconds: 0) { id } }',
            "leaseSeconds",
            "leaseSeconds must be from 1 to 86400 seconds",
        ),
        (
            'mutation { claimTask(workDirectory: "/r", workerId: "w", waitSeconds: 61) { id } }',
            "waitSeconds",
            "waitSeconds must be from 0 to 60 seconds",
        ),
        (
            f'mutation {{ updateTask(id: "{ANY_ID}", expectedVersion: -1, input: {{prompt: "x"}})'
            " { id } }",
            "expectedVersion",
            "expectedVersion must be a task version: a whole number >= 0",
        ),
        (
            f'mutation {{ updateTask(id: "{ANY_ID}", expectedVersion: 1, input: {{}}) {{ id }} }}',
            "input",
            "input must change at least one field",
        ),
        (
            'mutation { failTask(id: "nope", workerId: "w", error: "e") { id } }',
            "id",
            "id must be a task id (a UUID)",
        ),
        (
            'query { tasks(workDirectory: "x") { totalCount } }',
            "workDirectory",
            "workDirectory must be an absolute POSIX path starting with '/'",
        ),
        (
            'query { tasks(tag: "a b") { totalCount } }',
            "tag",
            "tag: each tag must be 1 to 64 characters of letters, digits and _.:-",
        ),
    ],
)
async def test_validation_errors_name_fields_as_graphql_spells_them(
    gql: GraphQLClient, document: str, field: str, message: str
) -> None:
    error = await gql.error(document)
    assert error["message"] == message
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": field}


DEPS = """mutation($input: SubmitTaskInput!) { submitTask(input: $input) {
  id status dependsOn blockedBy requireReview reviewFeedback } }"""
REVIEW = """mutation($id: ID!, $note: String, $feedback: String!, $approve: Boolean!,
    $retry: Boolean) {
  approveTask(id: $id, note: $note) @include(if: $approve) { id status }
  rejectTask(id: $id, feedback: $feedback, retry: $retry) @skip(if: $approve) {
    id status reviewFeedback retryCount }
}"""


async def test_dependencies_and_review_gates_over_graphql(gql: GraphQLClient) -> None:
    first = (
        await gql.ok(DEPS, input={"workDirectory": "/a", "prompt": "p", "requireReview": True})
    )["submitTask"]
    assert (first["requireReview"], first["dependsOn"], first["reviewFeedback"]) == (True, [], None)
    then = (
        await gql.ok(DEPS, input={"workDirectory": "/b", "prompt": "q", "dependsOn": [first["id"]]})
    )["submitTask"]
    assert (then["status"], then["blockedBy"], then["requireReview"]) == (
        "BLOCKED", [first["id"]], False,
    )  # fmt: skip
    missing = "00000000-0000-0000-0000-000000000001"
    batch = """mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"""
    error = await gql.error(
        batch,
        inputs=[
            {"workDirectory": "/b", "prompt": "ok"},
            {"workDirectory": "/b", "prompt": "bad", "dependsOn": [first["id"], missing]},
        ],
    )
    assert error["extensions"] == {"code": "VALIDATION_ERROR", "field": "inputs[1].dependsOn[1]"}
    blocked = await gql.ok("{ tasks(status: [BLOCKED]) { totalCount } statistics { blocked } }")
    assert (blocked["tasks"]["totalCount"], blocked["statistics"]["blocked"]) == (1, 1)
    error = await gql.error(REVIEW, id=first["id"], feedback="x", approve=True)
    assert error["extensions"]["code"] == "CONFLICT"
    assert (await gql.ok(CLAIM, dir="/a", worker="w"))["claimTask"]["id"] == first["id"]
    done = (await gql.ok(COMPLETE, id=first["id"], worker="w", result={"n": 1}))["completeTask"]
    assert (done["status"], done["result"], done["completedAt"]) == ("IN_REVIEW", {"n": 1}, None)
    stats = await gql.ok("{ statistics { inReview blocked } }")
    assert stats["statistics"] == {"inReview": 1, "blocked": 1}
    rejected = (await gql.ok(REVIEW, id=first["id"], feedback="add tests", approve=False))[
        "rejectTask"
    ]
    assert rejected == {
        "id": first["id"], "status": "WAITING", "reviewFeedback": "add tests", "retryCount": 1,
    }  # fmt: skip
    await gql.ok(CLAIM, dir="/a", worker="w")
    await gql.ok(COMPLETE, id=first["id"], worker="w", result={"n": 2})
    approved = (await gql.ok(REVIEW, id=first["id"], note="good", feedback="", approve=True))[
        "approveTask"
    ]
    assert approved["status"] == "COMPLETED"
    history = await gql.ok(
        "query($id: ID!) { task(id: $id) { history { status details } } }", id=first["id"]
    )
    assert history["task"]["history"][-1] == {
        "status": "COMPLETED", "details": {"reason": "approved", "note": "good"},
    }  # fmt: skip
    after = await gql.ok(
        "query($id: ID!) { task(id: $id) { status blockedBy history { status details } } }",
        id=then["id"],
    )
    assert after["task"]["status"] == "WAITING"
    assert after["task"]["blockedBy"] == []
    assert after["task"]["history"][-1] == {"status": "WAITING", "details": {"reason": "unblocked"}}


async def test_a_failed_dependency_cancels_its_dependents_over_graphql(gql: GraphQLClient) -> None:
    first = await submit(gql, workDirectory="/a", maxRetries=0)
    then = (
        await gql.ok(DEPS, input={"workDirectory": "/b", "prompt": "q", "dependsOn": [first["id"]]})
    )["submitTask"]
    await gql.ok(CLAIM, dir="/a", worker="w")
    await gql.ok(FAIL, id=first["id"], worker="w", error="boom")
    after = await gql.ok(
        "query($id: ID!) { task(id: $id) { status history { details } } }", id=then["id"]
    )
    assert after["task"]["status"] == "CANCELLED"
    assert after["task"]["history"][-1]["details"] == {
        "reason": "dependency_failed", "dependency": first["id"],
    }  # fmt: skip
    error = await gql.error("mutation($id: ID!) { retryTask(id: $id) { id } }", id=then["id"])
    assert error["extensions"]["code"] == "CONFLICT"
    assert first["id"] in error["message"]
