"""Compiled execution answers exactly as the general executor: generated documents and variables
run on two apps (plans on, plans off) over two databases holding the same tasks, and their JSON
and statuses must match once ids and instants are named by order of appearance."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import graphql
import httpx
import orjson
import pytest
import strawberry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from strawberry.scalars import JSON

from api.app import create_app
from api.interfaces.gql import compiled, serializers
from api.security.keys import issue_key
from api.settings import Settings
from tests.conftest import ServerProcess

TASK_FIELDS = [
    "id", "workDirectory", "prompt", "priority", "tags", "status", "workerId", "createdAt",
    "startedAt", "completedAt", "updatedAt", "result", "errorMessage", "retryCount",
    "maxRetries", "metadata", "version", "leaseExpiresAt", "runAfter", "idempotencyKey",
    "dependsOn", "blockedBy", "requireReview", "reviewFeedback", "progress",
    "progressMessage", "logLineCount", "__typename",
]  # fmt: skip
EVENT_FIELDS = [
    "id", "taskId", "status", "previousStatus", "workerId", "at", "details", "workDirectory",
    "__typename",
]  # fmt: skip
STATISTICS_FIELDS = ["total", "waiting", "working", "completed", "failed", "inReview"]
DATASET = 6  # tasks both databases hold before the examples; 0 and 1 are claimed by w1

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?\+00:00")


def compiled_count() -> float:
    return REGISTRY.get_sample_value("graphql_compiled_executions_total") or 0.0


@dataclass(frozen=True)
class TaskRef:
    """Task number `index` of the dataset: each app substitutes its own id."""

    index: int


@dataclass
class App:
    http: httpx.AsyncClient
    keys: dict[str, str]
    view: Any
    ids: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # id -> "task#k", by first appearance

    def resolve(self, value: Any) -> Any:
        if isinstance(value, TaskRef):
            return self.ids[value.index]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def normalise(self, value: Any) -> Any:
        """Ids become their order of appearance and instants a placeholder: both differ by
        database, nothing else may."""
        if isinstance(value, str):
            value = UUID.sub(
                lambda m: self.names.setdefault(m[0], f"task#{len(self.names)}"), value
            )
            return INSTANT.sub("<instant>", value)
        if isinstance(value, dict):
            return {k: self.normalise(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.normalise(v) for v in value]
        return value

    async def post(self, auth: str, query: str, variables: dict[str, Any]) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.keys[auth]}"} if auth in self.keys else {}
        body = {"query": query, "variables": self.resolve(variables)}
        response = await self.http.post("/graphql", json=body, headers=headers)
        return response.status_code, self.normalise(response.json())


@contextlib.asynccontextmanager
async def app_on(path: Path, compiled_execution: bool) -> AsyncIterator[App]:
    # A failed task waits an hour before its retry: a retry falling due between the two apps'
    # answers would make them differ for a reason that is not the executor.
    settings = Settings(
        database_url=f"sqlite:///{path}",
        durability="normal",
        compiled_execution=compiled_execution,
        backoff_base=3600,
        backoff_cap=3600,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        now = datetime.now(UTC)
        keys = {
            "worker": (await issue_key(app.state.service.store.keys, "w", "read,submit,work", now))[
                1
            ],
            "reader": (await issue_key(app.state.service.store.keys, "r", "read", now))[1],
        }
        view = next(r.app for r in app.routes if getattr(r, "path", "") == "/graphql")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield App(http, keys, view)


async def seed(app: App) -> None:
    for index in range(DATASET):
        _, body = await app.post(
            "worker",
            "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id } }",
            {"i": {"workDirectory": "/repo", "prompt": f"task {index}", "tags": ["t"]}},
        )
        app.ids.append(
            next(k for k, v in app.names.items() if v == body["data"]["submitTask"]["id"])
        )
    for _ in range(2):
        await app.post(
            "worker", 'mutation { claimTask(workDirectory: "/repo", workerId: "w1") { id } }', {}
        )


@dataclass
class Pair:
    """The app under test (plans on) and the reference (plans off), driven by one event loop."""

    runner: asyncio.Runner
    fast: App
    general: App
    compiled: int = 0  # examples the fast app answered from a plan

    def compare(self, auth: str, query: str, variables: dict[str, Any]) -> None:
        self.runner.run(self._compare(auth, query, variables))

    async def _compare(self, auth: str, query: str, variables: dict[str, Any]) -> None:
        expected = await self.general.post(auth, query, variables)
        # Plans are built only for documents that validate, which this decides as the general
        # path does (the generator stays within the depth and alias limits).
        document = graphql.parse(query)
        if not graphql.validate(self.fast.view.schema._schema, document):
            self.fast.view.plans.learn(query, None)
        before = compiled_count()
        got = await self.fast.post(auth, query, variables)
        self.compiled += compiled_count() > before
        assert got == expected, (query, variables)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with asyncio.Runner() as runner:
        stack = contextlib.AsyncExitStack()
        fast = runner.run(stack.enter_async_context(app_on(tmp_path / "fast.db", True)))
        general = runner.run(stack.enter_async_context(app_on(tmp_path / "general.db", False)))
        runner.run(seed(fast))
        runner.run(seed(general))
        try:
            yield Pair(runner, fast, general)
        finally:
            runner.run(stack.aclose())


# -- generated documents ---------------------------------------------------------------------


@st.composite
def selection(draw: st.DrawFn, fields: list[str], on: str, fragments: list[str]) -> str:
    """Some of `fields`, some aliased, some through an inline fragment or a named one."""
    chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=7))
    plain: list[str] = []
    for name in chosen:
        alias = draw(st.sampled_from([None, None, f"{name}Alias", "x" + name[:3]]))
        text = f"{alias}: {name}" if alias and name != "__typename" else name
        place = draw(st.sampled_from(["plain", "plain", "inline", "fragment"]))
        if place == "inline":
            plain.append(f"... on {on} {{ {text} }}")
        elif place == "fragment":
            fragment = f"F{len(fragments)}"
            fragments.append(f"fragment {fragment} on {on} {{ {text} }}")
            plain.append(f"...{fragment}")
        else:
            plain.append(text)
    return "{ " + " ".join(plain) + " }"


ids = st.one_of(
    st.integers(0, DATASET - 1).map(TaskRef),
    st.sampled_from(["not-an-id", "00000000-0000-4000-8000-000000000000", 7]),
)
workers = st.sampled_from(["w1", "w2", ""])
directories = st.sampled_from(["/repo", "/other", "relative", ""])
submit_input = st.fixed_dictionaries(
    {"workDirectory": directories, "prompt": st.sampled_from(["p", "", "long " * 3])},
    optional={
        "priority": st.sampled_from(["HIGH", "LOW", "NOPE"]),
        "tags": st.sampled_from([["a"], [], ["a", "b"], 3]),
        "maxRetries": st.sampled_from([0, 2, -1, "x"]),
        "metadata": st.sampled_from([{}, {"k": [1, 2]}, "s"]),
        "dependsOn": st.lists(ids, max_size=2),
    },
)

# (root field and arguments, variable definitions, variables, what it returns)
Root = tuple[str, str, st.SearchStrategy[dict[str, Any]], str]
ROOTS: list[Root] = [
    (
        "submitTask(input: $i)",
        "$i: SubmitTaskInput!",
        st.fixed_dictionaries({"i": submit_input}),
        "Task",
    ),
    (
        "submitTasks(inputs: $i)",
        "$i: [SubmitTaskInput!]!",
        st.fixed_dictionaries({"i": st.lists(submit_input, max_size=3)}),
        "Task",
    ),
    (
        "claimTask(workDirectory: $d, workerId: $w)",
        "$d: String!, $w: String!",
        st.fixed_dictionaries({"d": directories, "w": workers}),
        "Task",
    ),
    (
        "claimTasks(workDirectory: $d, workerId: $w, limit: $n)",
        "$d: String!, $w: String!, $n: Int!",
        st.fixed_dictionaries(
            {"d": directories, "w": workers, "n": st.sampled_from([1, 2, 0, -3, "2"])}
        ),
        "Task",
    ),
    (
        "heartbeat(id: $id, workerId: $w)",
        "$id: ID!, $w: String!",
        st.fixed_dictionaries({"id": ids, "w": workers}),
        "Task",
    ),
    (
        "reportProgress(id: $id, workerId: $w, progress: $p)",
        "$id: ID!, $w: String!, $p: Float",
        st.fixed_dictionaries(
            {"id": ids, "w": workers, "p": st.sampled_from([0.5, 2.0, None, "x"])}
        ),
        "Task",
    ),
    (
        "completeTask(id: $id, workerId: $w, result: $r)",
        "$id: ID!, $w: String!, $r: JSON",
        st.fixed_dictionaries(
            {"id": ids, "w": workers, "r": st.sampled_from([None, {"ok": True}, [1]])}
        ),
        "Task",
    ),
    (
        "completeTasks(workerId: $w, items: $items)",
        "$w: String!, $items: [CompleteItem!]!",
        st.fixed_dictionaries(
            {"w": workers, "items": st.lists(st.fixed_dictionaries({"id": ids}), max_size=2)}
        ),
        "Task",
    ),
    (
        "failTask(id: $id, workerId: $w, error: $e)",
        "$id: ID!, $w: String!, $e: String!",
        st.fixed_dictionaries({"id": ids, "w": workers, "e": st.sampled_from(["boom", ""])}),
        "Task",
    ),
    (
        "releaseTask(id: $id, workerId: $w)",
        "$id: ID!, $w: String!",
        st.fixed_dictionaries({"id": ids, "w": workers}),
        "Task",
    ),
    ("task(id: $id)", "$id: ID!", st.fixed_dictionaries({"id": ids}), "Task"),
    (
        "tasks(first: $n)",
        "$n: Int!",
        st.fixed_dictionaries({"n": st.sampled_from([2, 10, 0, -1])}),
        "TaskConnection",
    ),
    (
        "events(after: $a, first: $n)",
        "$a: ID, $n: Int!",
        st.fixed_dictionaries(
            {"a": st.sampled_from([None, "3", "x"]), "n": st.sampled_from([3, 0, 5000])}
        ),
        "EventConnection",
    ),
    ("statistics", "", st.just({}), "Statistics"),
]
MUTATIONS = {"submitTask", "submitTasks", "claimTask", "claimTasks", "heartbeat", "reportProgress",
             "completeTask", "completeTasks", "failTask", "releaseTask"}  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(key, document, variables): a root field with generated selections and variables."""
    root, definitions, variables, returns = draw(st.sampled_from(ROOTS))
    fragments: list[str] = []
    if returns == "Task":
        body = draw(selection(TASK_FIELDS, "Task", fragments))
    elif returns == "TaskConnection":
        node = draw(selection(TASK_FIELDS, "Task", fragments))
        body = (
            f"{{ edges {{ node {node} cursor }} pageInfo {{ hasNextPage endCursor }} totalCount }}"
        )
    elif returns == "EventConnection":
        events = draw(selection(EVENT_FIELDS, "TaskEvent", fragments))
        body = f"{{ events {events} lastId hasNextPage }}"
    else:
        body = draw(selection(STATISTICS_FIELDS, "Statistics", fragments))
    kind = "mutation" if root.split("(")[0] in MUTATIONS else "query"
    alias = draw(st.sampled_from(["", "", "r: "]))
    head = f"{kind}({definitions})" if definitions else kind
    document = " ".join([f"{head} {{ {alias}{root} {body} }}", *fragments])
    auth = draw(st.sampled_from(["worker", "worker", "worker", "reader", "none"]))
    return auth, document, draw(variables)


DIFFERENTIAL = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def run_differential(pair: Pair, examples: int) -> None:
    @settings(DIFFERENTIAL, max_examples=examples)
    @given(requests())
    def check(request: tuple[str, str, dict[str, Any]]) -> None:
        pair.compare(*request)

    check()


def test_compiled_plans_answer_as_the_general_executor(pair: Pair) -> None:
    run_differential(pair, 150)
    # Most generated documents validate, and each of those must have been answered by its plan.
    assert pair.compiled > 75


def test_the_comparison_notices_a_wrong_serializer(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serializer that spells enum values in lower case (status, priority) must be caught."""
    original = serializers._enum_names

    def lower_case_enums(type_: Any) -> Any:
        names = original(type_)
        if names is None:
            return None
        cls, by_member = names
        return cls, {member: name.lower() for member, name in by_member.items()}

    monkeypatch.setattr(serializers, "_enum_names", lower_case_enums)
    fields = " ".join(TASK_FIELDS)
    query = f"mutation($i: SubmitTaskInput!) {{ submitTask(input: $i) {{ {fields} }} }}"
    with pytest.raises(AssertionError, match="'waiting'"):
        pair.compare("worker", query, {"i": {"workDirectory": "/repo", "prompt": "p"}})


# -- when plans are built and taken ----------------------------------------------------------


def test_a_plan_is_built_after_the_first_answer_and_taken_from_the_second(pair: Pair) -> None:
    async def scenario() -> None:
        query = "query($id: ID!) { task(id: $id) { id status } }"
        before = compiled_count()
        first = await pair.fast.post("worker", query, {"id": TaskRef(2)})
        assert compiled_count() == before  # the general path served it
        second = await pair.fast.post("worker", query, {"id": TaskRef(2)})
        assert compiled_count() == before + 1
        assert first == second == (200, {"data": {"task": {"id": "task#2", "status": "WAITING"}}})

    pair.runner.run(scenario())


@pytest.mark.parametrize(
    "query",
    [
        "query($id: ID!, $s: Boolean!) { task(id: $id) { id status @include(if: $s) } }",
        "query($id: ID!) { task(id: $id) { id history { status } } }",
        "query($id: ID!) { a: task(id: $id) { id } b: task(id: $id) { id } }",
        "query($id: ID!) { task(id: $id) { id nope } }",  # invalid: never compiled
        "{ __schema { queryType { name } } }",
    ],
)
def test_documents_plans_do_not_take_keep_the_general_executor(pair: Pair, query: str) -> None:
    async def scenario() -> None:
        variables = {"id": TaskRef(2), "s": True} if "$" in query else {}
        before = compiled_count()
        answers = [await pair.fast.post("worker", query, variables) for _ in range(3)]
        assert compiled_count() == before
        assert answers[0] == answers[1] == answers[2]
        assert answers[0] == await pair.general.post("worker", query, variables)

    pair.runner.run(scenario())


def test_a_refused_scope_answers_with_the_same_status(pair: Pair) -> None:
    async def scenario() -> None:
        query = 'mutation { claimTask(workDirectory: "/repo", workerId: "w9") { id } }'
        await pair.fast.post("worker", query, {})  # taught: a plan now exists
        before = compiled_count()
        for auth in ("reader", "none"):
            got = await pair.fast.post(auth, query, {})
            assert got == await pair.general.post(auth, query, {})
            assert got[0] in (401, 403)
        # only the reader's reached GraphQL: a request without a key is refused before it
        assert compiled_count() == before + 1

    pair.runner.run(scenario())


def test_compiled_execution_can_be_turned_off() -> None:
    assert Settings.load({"TASKORCH_COMPILED_EXECUTION": "false"}).compiled_execution is False
    assert Settings.load({}).compiled_execution is True


def test_a_served_document_is_answered_by_its_plan(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'served.db'}")
    try:
        server.wait_ready()
        query = "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id status prompt } }"
        answers = [
            httpx.post(
                f"{server.url}/graphql",
                json={"query": query, "variables": {"i": {"workDirectory": "/r", "prompt": "p"}}},
            ).json()
            for _ in range(3)
        ]
        assert [a["data"]["submitTask"]["prompt"] for a in answers] == ["p", "p", "p"]
        assert len({a["data"]["submitTask"]["id"] for a in answers}) == 3
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "graphql_compiled_executions_total 2.0" in metrics
        assert 'response_time_seconds_count{operation="graphql:submitTask"} 3.0' in metrics
    finally:
        server.stop()


def test_a_waiting_claim_answered_by_its_plan_ends_when_its_client_goes_away(
    tmp_path: Path,
) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'served.db'}")
    claim = (
        "mutation($d: String!, $w: String!, $wait: Float) {"
        " claimTask(workDirectory: $d, workerId: $w, waitSeconds: $wait) { id } }"
    )
    submit = "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id } }"

    def post(query: str, timeout: float = 10, **variables: Any) -> Any:
        body = {"query": query, "variables": variables}
        return httpx.post(f"{server.url}/graphql", json=body, timeout=timeout).json()["data"]

    try:
        server.wait_ready()
        assert post(claim, d="/gone", w="teacher") == {"claimTask": None}  # now it has a plan
        with pytest.raises(httpx.ReadTimeout):
            post(claim, timeout=0.5, d="/gone", w="ghost", wait=20)
        time.sleep(0.3)
        task_id = post(submit, i={"workDirectory": "/gone", "prompt": "p"})["submitTask"]["id"]
        time.sleep(0.5)
        assert post(claim, d="/gone", w="alive") == {"claimTask": {"id": task_id}}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "graphql_compiled_executions_total 2.0" in metrics  # the ghost's and alive's
    finally:
        server.stop()


# -- serializers, off their inline paths -----------------------------------------------------


@strawberry.enum
class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@strawberry.type
class Item:
    ident: strawberry.ID
    text: str | None
    count: int
    flag: bool
    colour: Colour | None
    at: datetime | None
    words: list[str]
    data: JSON | None
    blob: JSON


class Holder:
    """What `Item` fields read, any Python value at all."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


HELD: dict[str, Any] = {}


@strawberry.type
class ItemQuery:
    @strawberry.field
    def item(self) -> Item:
        return cast(Item, Holder(**HELD))


ITEM_QUERY = "{ item { ident text count flag colour at words data blob __typename } }"
PLAIN = {
    "ident": "a", "text": "t", "count": 1, "flag": True, "colour": Colour.RED,
    "at": datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "words": ["w"], "data": {"a": [1]},
    "blob": {},
}  # fmt: skip


class StrSub(str):
    pass


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"text": None, "colour": None, "at": None, "data": None},
        {"data": [1, "x"], "blob": 0},
        {"ident": 7, "text": StrSub("s"), "count": True, "flag": 0, "words": ("x", 3)},
        {"count": 2.0, "colour": "blue", "at": datetime(2030, 1, 2)},
        {"count": 2**31},  # out of Int's range: an error
        {"count": None},  # a null for a non-null field: an error
        {"colour": "green"},  # no such value: an error
        {"at": "2030-01-02"},  # not a datetime: an error
        {"words": "ab"},  # a string is not a list here
        {"blob": None},  # a null for a non-null JSON: an error
    ],
)
def test_a_serializer_answers_as_graphql_core_or_leaves_it_to_graphql_core(
    changes: dict[str, Any],
) -> None:
    """Each value takes the inline path or the field's own serializer: either gives what
    graphql-core completes, or it raises and the plan lets graphql-core complete the result."""
    schema = strawberry.Schema(query=ItemQuery)
    plan = compiled.build_plan(schema, graphql.parse(ITEM_QUERY), None)
    HELD.clear()
    HELD.update({**PLAIN, **changes})
    general = schema.execute_sync(ITEM_QUERY)
    try:
        serialized = plan.serialize(ItemQuery().item())
    except Exception:
        assert general.errors, "the serializer refused what graphql-core completes"
        return
    assert not general.errors, general.errors
    # as JSON: True and 1 are equal in Python, not in a response
    assert orjson.dumps({"item": serialized}) == orjson.dumps(general.data)
