"""Property-based run of REST v1 against its own OpenAPI document, on a real server process."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ServerProcess


@pytest.fixture(scope="module")
def rest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    database = tmp_path_factory.mktemp("schemathesis") / "taskorch.db"
    server = ServerProcess(f"sqlite:///{database}", {"TASKORCH_DURABILITY": "normal"})
    try:
        server.wait_ready()
        for n in range(5):  # some tasks for the generated ids and claims to meet
            body = {"work_directory": "/repo", "prompt": f"task {n}"}
            httpx.post(f"{server.url}/api/v1/tasks", json=body).raise_for_status()
        yield server
    finally:
        server.stop()


def check(case: schemathesis.Case, statuses: list[int]) -> None:
    if case.query and "wait_seconds" in case.query:
        case.query["wait_seconds"] = 0  # a valid wait blocks up to a minute: keep the run short
    response = case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
    )
    statuses.append(response.status_code)


def test_rest_v1_conforms_to_its_openapi_document(rest_server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{rest_server.url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10
    statuses: list[int] = []
    for operation in operations:
        # Hypothesis drives each operation in turn; ~100 requests over the ten operations.
        run = settings(
            max_examples=10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(case=operation.as_strategy())(lambda case: check(case, statuses)))
        run()
    print(f"{len(statuses)} requests: {sorted(collections.Counter(statuses).items())}")
    assert len(statuses) >= 50 and 200 in statuses and 400 in statuses


def test_the_document_is_served_as_json(rest_server: ServerProcess) -> None:
    document = httpx.get(f"{rest_server.url}/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.")
