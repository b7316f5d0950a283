"""Generated queries, mutations, variables and raw bodies against a real server: never a 500, never
a stack trace or SQL in a response, every error coded, and the server still answers afterwards."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import graphql
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, from_schema, nodes

from api.interfaces.gql.schema import build_schema
from tests.conftest import ServerProcess

# Anything that betrays the inside of the server.
LEAKS = re.compile(
    r"Traceback|File \"|sqlite3|aiosqlite|asyncpg|OperationalError|IntegrityError|"
    r"\bSELECT\b|\bINSERT INTO\b|\bUPDATE tasks\b|\bDELETE FROM\b|\bapi/store/"
)
# A claim may wait up to a minute for work; the fuzzer must not sit in that wait.
WAIT = re.compile(r"waitSeconds:\s*-?[0-9.eE+-]+")

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

SCALARS = {
    "DateTime": st.sampled_from(
        [
            "2030-01-01T00:00:00Z",
            "2020-02-30T00:00:00",
            "not a date",
            "",
            "9999-12-31T23:59:59+14:00",
        ]
    ).map(nodes.String),
    "JSON": st.one_of(
        st.text(max_size=20).map(nodes.String),
        st.integers().map(nodes.Int),
        st.booleans().map(nodes.Boolean),
        st.just(nodes.Null),
        st.just(graphql.parse_value('{password: "hunter2", nested: [1, {token: "t"}]}')),
    ),
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

submit_inputs = st.fixed_dictionaries(
    {"workDirectory": st.text(max_size=40) | st.just("/r"), "prompt": st.text(max_size=40)},
    optional={
        "priority": st.sampled_from(["LOW", "HIGH", "URGENT", 3]),
        "tags": st.lists(st.text(max_size=70), max_size=25) | json_values,
        "maxRetries": st.integers(-(2**40), 2**40),
        "metadata": json_values,
        "runAfter": st.text(max_size=30) | st.just("2030-01-01T00:00:00Z"),
        "idempotencyKey": st.text(max_size=300),
    },
)


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert not LEAKS.search(response.text), response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict):
            for error in body.get("errors") or []:
                assert error.get("extensions", {}).get("code"), error


def test_generated_requests_never_break_the_server(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'fuzz.db'}")
    sdl = build_schema().as_str()
    http = httpx.Client(base_url=server.url, timeout=30)

    def send(query: str, variables: Any = None) -> None:
        query = WAIT.sub("waitSeconds: 0", query)
        check(http.post("/graphql", json={"query": query, "variables": variables}))

    @FUZZ
    @given(from_schema(sdl, custom_scalars=SCALARS))
    def valid_documents(query: str) -> None:
        send(query)

    @FUZZ
    @given(from_schema(sdl, custom_scalars=SCALARS, mode=Mode.NEGATIVE))
    def invalid_documents(query: str) -> None:
        send(query)

    @FUZZ
    @given(submit_inputs)
    def submit_variables(value: dict[str, Any]) -> None:
        send(
            "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id metadata tags } }",
            {"i": value},
        )

    @FUZZ
    @given(json_values, st.text(max_size=200))
    def raw_bodies(body: Any, text: str) -> None:
        check(http.post("/graphql", content=json.dumps(body).encode()))
        check(http.post("/graphql", json={"query": text}))
        check(http.get("/graphql", params={"query": text}))

    try:
        for phase in (valid_documents, invalid_documents, submit_variables, raw_bodies):
            phase()

        assert server.process.poll() is None
        assert http.get("/health").status_code == 200
        answer = http.post(
            "/graphql",
            json={
                "query": 'mutation { submitTask(input: {workDirectory: "/ok", prompt: "p"}) { status } }'
            },
        )
        assert answer.json() == {"data": {"submitTask": {"status": "WAITING"}}}
    finally:
        http.close()
