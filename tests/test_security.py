"""API keys, scopes, protected mode, rate limits and the GraphQL guards, through the real app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from graphql import OperationType
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from api.app import create_app
from api.cli.main import main as taskorch
from api.core.errors import Forbidden, Unauthenticated
from api.interfaces.gql.ide import STATIC, STATIC_PATH
from api.interfaces.gql.security import field_scope
from api.security.auth import Gate, Principal, require_scope
from api.security.keys import hash_key, issue_key
from api.security.ratelimit import RateLimiter
from api.security.redact import _PATTERNS, redact
from api.settings import Settings
from api.store import open_store
from tests.conftest import ServerProcess, eventually
from tests.ws import SUBSCRIBE

REMOTE = ("10.0.0.5", 123)
LOCAL = ("127.0.0.1", 123)
TASK_ID = "00000000-0000-4000-8000-000000000000"


class Harness:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.state.service.store

    async def issue(self, name: str, scopes: str) -> str:
        _, raw = await issue_key(self.store.keys, name, scopes, datetime.now(UTC))
        return raw

    def client(self, key: str | None = None, address: tuple[str, int] = LOCAL) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=self.app, client=address)
        return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)


@contextlib.asynccontextmanager
async def secured(database_url: str, **settings: Any) -> AsyncIterator[Harness]:
    app = create_app(Settings(database_url=database_url, durability="normal", **settings))
    async with app.router.lifespan_context(app):
        yield Harness(app)


async def post(client: httpx.AsyncClient, query: str, **variables: Any) -> httpx.Response:
    return await client.post("/graphql", json={"query": query, "variables": variables})


def code_of(response: httpx.Response) -> str | None:
    errors = response.json().get("errors") or []
    return errors[0]["extensions"]["code"] if errors else None


# Every operation, with arguments that pass validation (a missing task is fine: the check under
# test happens before the service runs), and the scope it needs.
OPERATIONS: dict[str, tuple[str, str | None]] = {
    "task": (f'{{ task(id: "{TASK_ID}") {{ id }} }}', "read"),
    "tasks": ("{ tasks { totalCount } }", "read"),
    "statistics": ("{ statistics { total } }", "read"),
    "introspection": ("{ __schema { queryType { name } } }", "read"),
    "__typename": ("{ __typename }", None),
    "submitTask": (
        'mutation { submitTask(input: {workDirectory: "/r", prompt: "p"}) { id } }',
        "submit",
    ),
    "submitTasks": (
        'mutation { submitTasks(inputs: [{workDirectory: "/r", prompt: "p"}]) { id } }',
        "submit",
    ),
    "cancelTask": (f'mutation {{ cancelTask(id: "{TASK_ID}") {{ id }} }}', "submit"),
    "retryTask": (f'mutation {{ retryTask(id: "{TASK_ID}") {{ id }} }}', "submit"),
    "updateTask": (
        f'mutation {{ updateTask(id: "{TASK_ID}", expectedVersion: 1, input: {{prompt: "q"}})'
        " { id } }",
        "submit",
    ),
    "claimTask": ('mutation { claimTask(workDirectory: "/r", workerId: "w") { id } }', "work"),
    "claimTasks": (
        'mutation { claimTasks(workDirectory: "/r", workerId: "w", limit: 2) { id } }',
        "work",
    ),
    "heartbeat": (f'mutation {{ heartbeat(id: "{TASK_ID}", workerId: "w") {{ id }} }}', "work"),
    "completeTask": (
        f'mutation {{ completeTask(id: "{TASK_ID}", workerId: "w") {{ id }} }}',
        "work",
    ),
    "completeTasks": (
        f'mutation {{ completeTasks(workerId: "w", items: [{{id: "{TASK_ID}"}}]) {{ id }} }}',
        "work",
    ),
    "failTask": (
        f'mutation {{ failTask(id: "{TASK_ID}", workerId: "w", error: "e") {{ id }} }}',
        "work",
    ),
    "releaseTask": (f'mutation {{ releaseTask(id: "{TASK_ID}", workerId: "w") {{ id }} }}', "work"),
    "reportProgress": (
        f'mutation {{ reportProgress(id: "{TASK_ID}", workerId: "w", progress: 0.5) {{ id }} }}',
        "work",
    ),
    "appendTaskLog": (
        f'mutation {{ appendTaskLog(id: "{TASK_ID}", workerId: "w", lines: ["x"]) }}',
        "work",
    ),
}


async def test_scope_matrix(database_url: str) -> None:
    """Every operation with a key of every scope: allowed, or refused with 403 FORBIDDEN."""
    async with secured(database_url) as harness:
        keys = {
            scope: await harness.issue(f"only-{scope}", scope)
            for scope in ("read", "submit", "work", "admin")
        }
        outcomes: dict[tuple[str, str], bool] = {}
        for scope, key in keys.items():
            async with harness.client(key) as client:
                for name, (query, _) in OPERATIONS.items():
                    response = await post(client, query)
                    refused = code_of(response) == "FORBIDDEN"
                    assert refused == (response.status_code == 403), (name, scope, response.text)
                    if refused:
                        assert response.json()["data"] is None
                    else:
                        assert response.status_code == 200, (name, scope, response.text)
                    outcomes[(name, scope)] = not refused
        expected = {
            (name, scope): needed is None or scope in (needed, "admin")
            for name, (_, needed) in OPERATIONS.items()
            for scope in keys
        }
        assert outcomes == expected


async def test_refused_mutation_changes_nothing(database_url: str) -> None:
    async with secured(database_url) as harness:
        reader = await harness.issue("reader", "read")
        async with harness.client(reader) as client:
            query, _ = OPERATIONS["submitTask"]
            both = query.replace("mutation {", "mutation { __typename ")
            assert (await post(client, both)).status_code == 403
            refused = await post(
                client, "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id } }",
                i={"workDirectory": "/r", "prompt": "p"},
            )  # fmt: skip
            assert code_of(refused) == "FORBIDDEN"
            assert "'submit'" in refused.json()["errors"][0]["message"]
            stats = await post(client, "{ statistics { total } }")
            assert stats.json()["data"]["statistics"]["total"] == 0


async def test_scope_check_follows_fragments(database_url: str) -> None:
    async with secured(database_url) as harness:
        reader = await harness.issue("reader", "read")
        async with harness.client(reader) as client:
            sneaky = (
                "mutation { ...M } fragment M on Mutation { ... on Mutation {"
                ' claimTask(workDirectory: "/r", workerId: "w") { id } } }'
            )
            assert code_of(await post(client, sneaky)) == "FORBIDDEN"


def test_unknown_mutations_need_admin() -> None:
    assert field_scope(OperationType.MUTATION, "dropEverything") == "admin"
    assert field_scope(OperationType.QUERY, "anything") == "read"
    assert field_scope(OperationType.SUBSCRIPTION, "taskEvents") == "read"


def test_require_scope_for_other_interfaces() -> None:
    worker = Principal("w", frozenset({"work"}))
    assert require_scope(worker, "work") is worker
    with pytest.raises(Forbidden) as refused:
        require_scope(worker, "submit")
    assert refused.value.code == "FORBIDDEN"
    assert "submit" in refused.value.message
    assert require_scope(Principal("a", frozenset({"admin"})), "submit")
    with pytest.raises(Unauthenticated):
        require_scope(None, "read")


async def test_protected_mode_serves_only_loopback_until_a_key_exists(database_url: str) -> None:
    async with secured(database_url) as harness:
        async with harness.client(address=REMOTE) as remote:
            refused = await post(remote, "{ statistics { total } }")
            assert refused.status_code == 401
            assert code_of(refused) == "UNAUTHENTICATED"
            assert "taskorch keys create" in refused.json()["errors"][0]["message"]
            assert (await remote.get("/health")).status_code == 200
            rest = await remote.get("/api/v1/tasks")
            assert rest.status_code == 401
            assert rest.json()["success"] is False
            assert rest.json()["error"]["code"] == "UNAUTHENTICATED"
        async with harness.client() as local:
            assert (await post(local, "{ statistics { total } }")).status_code == 200

        key = await harness.issue("ops", "read")
        async with harness.client() as local:
            response = await post(local, "{ statistics { total } }")
            assert response.status_code == 401
            assert code_of(response) == "UNAUTHENTICATED"
            assert response.headers["www-authenticate"].startswith("Bearer")
        async with harness.client(key, address=REMOTE) as remote:
            assert (await post(remote, "{ statistics { total } }")).status_code == 200


@pytest.mark.parametrize(
    "authorization", ["Bearer tko_not-a-key", "Basic dXNlcjpwYXNz", "Bearer", "tko_bare"]
)
async def test_bad_credentials_get_401(database_url: str, authorization: str) -> None:
    async with secured(database_url) as harness:
        await harness.issue("real", "admin")
        async with harness.client() as client:
            response = await client.post(
                "/graphql",
                json={"query": "{ __typename }"},
                headers={"Authorization": authorization},
            )
            assert response.status_code == 401
            body = response.json()
            assert body["data"] is None
            assert code_of(response) == "UNAUTHENTICATED"


async def test_revoked_key_stops_working_at_once(database_url: str) -> None:
    async with secured(database_url) as harness:
        key = await harness.issue("doomed", "read")
        await harness.issue("other", "read")
        async with harness.client(key) as client:
            assert (await post(client, "{ __typename }")).status_code == 200
            # revoked by the command line: another process, another connection
            code = await asyncio.to_thread(
                taskorch, ["keys", "revoke", "doomed", "--database", str(database_url)]
            )
            assert code == 0
            assert (await post(client, "{ __typename }")).status_code == 401  # the next request


async def test_first_key_ends_protected_mode_at_once(database_url: str) -> None:
    # loopback, no key: protected mode serves it
    async with secured(database_url) as harness, harness.client() as local:
        assert (await post(local, "{ __typename }")).status_code == 200
        await issue_key(harness.store.keys, "first", "read", datetime.now(UTC))  # as from the CLI
        assert (await post(local, "{ __typename }")).status_code == 401


async def test_revocation_takes_effect_on_the_next_lookup(database_url: str) -> None:
    store = open_store(Settings(database_url=database_url))
    await store.open()
    try:
        now = [0.0]
        gate = Gate(store, Settings(database_url=database_url), clock=lambda: now[0])
        _, raw = await issue_key(store.keys, "k", "read", datetime.now(UTC))
        principal = await gate.authenticate(f"Bearer {raw}", "10.0.0.5")
        assert principal.name == "k"
        assert principal.scopes == frozenset({"read"})
        await store.keys.revoke_key(
            "k", datetime.now(UTC)
        )  # as the CLI does, from outside the gate
        with pytest.raises(Unauthenticated):
            await gate.authenticate(f"Bearer {raw}", "10.0.0.5")
        key = (await store.keys.list_keys())[0]
        assert key.last_used_at is not None  # the first use was recorded
    finally:
        await store.close()


async def test_rate_limit_answers_429_with_retry_after(database_url: str) -> None:
    from api.ops.metrics import RATE_LIMITED

    refused_before = RATE_LIMITED._value.get()
    async with secured(database_url, rate_limit=5) as harness:
        first, second = await harness.issue("first", "read"), await harness.issue("second", "read")
        async with harness.client(first) as client:
            statuses = [(await post(client, "{ __typename }")).status_code for _ in range(5)]
            assert statuses == [200] * 5
            limited = await post(client, "{ __typename }")
            assert limited.status_code == 429
            assert code_of(limited) == "RATE_LIMITED"
            retry_after = int(limited.headers["retry-after"])
            assert 1 <= retry_after <= 12  # one token refills in 60 s / 5
            rest = await client.get("/api/v1/tasks")
            assert rest.status_code == 429
            assert rest.json()["error"]["code"] == "RATE_LIMITED"
        async with harness.client(second) as client:  # each key has its own bucket
            assert (await post(client, "{ __typename }")).status_code == 200
        async with harness.client(address=REMOTE) as anonymous:  # no key: a bucket per address
            statuses = [(await post(anonymous, "{ __typename }")).status_code for _ in range(6)]
            assert statuses == [401] * 5 + [429]
    assert RATE_LIMITED._value.get() - refused_before == 3  # counted for /metrics


async def test_rate_limit_zero_turns_it_off(database_url: str) -> None:
    async with secured(database_url, rate_limit=0) as harness:
        key = await harness.issue("busy", "read")
        async with harness.client(key) as client:
            for _ in range(30):
                assert (await post(client, "{ __typename }")).status_code == 200


def test_a_key_made_with_its_own_rate_limit_spends_that_one(
    database_url: str,
    start_server: Callable[..., ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = {}
    for name, extra in (("slow", ["--rate-limit", "5"]), ("fleet", [])):
        assert taskorch(["keys", "create", "--name", name, "--scopes", "read", *extra,
                         "--database", database_url]) == 0  # fmt: skip
        raw[name] = capsys.readouterr().out.strip()
    server = start_server(database_url)  # the server's default limit, which `slow` overrides

    async def check() -> None:
        async with httpx.AsyncClient(base_url=server.url) as http:
            slow = {"Authorization": f"Bearer {raw['slow']}"}
            fleet = {"Authorization": f"Bearer {raw['fleet']}"}
            body = {"query": "{ __typename }"}
            statuses = [(await http.post("/graphql", json=body, headers=slow)).status_code
                        for _ in range(6)]  # fmt: skip
            assert statuses == [200] * 5 + [429]
            for _ in range(50):  # the other key is not throttled
                assert (await http.post("/graphql", json=body, headers=fleet)).status_code == 200
            assert (await http.post("/graphql", json=body, headers=slow)).status_code == 429

    asyncio.run(check())


async def test_the_default_rate_limit_lets_a_busy_key_through(database_url: str) -> None:
    """2,000 requests a minute from one key (a small fleet's claims and heartbeats) all pass."""
    async with secured(database_url) as harness:
        key = await harness.issue("fleet", "read")
        async with harness.client(key, address=REMOTE) as client:
            for _ in range(2_000):
                response = await client.get("/api/v1/tasks?limit=1")
                assert response.status_code == 200, response.text


def test_a_key_limit_overrides_the_server_default_both_ways() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.take("own", 5) for _ in range(6)][-2:] == [0.0, pytest.approx(12.0)]
    assert all(limiter.take("unlimited", 0) == 0.0 for _ in range(100))
    assert [limiter.take("default") for _ in range(4)][-1] == pytest.approx(20.0)
    off = RateLimiter(0, clock=lambda: now[0])  # the server's limit off; a key's own still holds
    assert [off.take("own", 1) for _ in range(2)][-1] == pytest.approx(60.0)
    assert all(off.take("default") == 0.0 for _ in range(100))


def test_token_bucket_refills_and_says_how_long_to_wait() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(limiter.take("a") == 0.0 for _ in range(60))
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 2.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    small = RateLimiter(1, clock=lambda: now[0], max_buckets=3)
    for name in "wxyz":
        small.take(name)
    assert len(small._buckets) <= 3


# --- guards against hostile documents ---


async def test_query_depth_is_limited(database_url: str) -> None:
    async with secured(database_url, max_query_depth=4) as harness, harness.client() as client:
        shallow = "{ tasks { edges { node { id } } } }"
        assert (await post(client, shallow)).status_code == 200
        deep = "{ tasks { edges { node { history { task { history { id } } } } } } }"
        response = await post(client, deep)
        assert code_of(response) == "VALIDATION_ERROR"
        assert "depth" in response.json()["errors"][0]["message"]


async def test_aliases_are_limited(database_url: str) -> None:
    async with secured(database_url, max_aliases=3) as harness, harness.client() as client:
        ok = "{ a: __typename b: __typename c: __typename }"
        assert not (await post(client, ok)).json().get("errors")
        many = "{ " + " ".join(f"a{i}: statistics {{ total }}" for i in range(4)) + " }"
        response = await post(client, many)
        assert code_of(response) == "VALIDATION_ERROR"
        assert "aliases" in response.json()["errors"][0]["message"]


async def test_tokens_are_limited(database_url: str) -> None:
    async with secured(database_url) as harness, harness.client() as client:
        huge = "{ " + "__typename " * 10_001 + "}"
        response = await post(client, huge)
        # a GraphQL validation error: answered 200, the refusal in `errors`
        assert response.status_code == 200
        assert code_of(response) == "VALIDATION_ERROR"
        assert "tokens" in response.json()["errors"][0]["message"]


async def test_request_body_is_limited_before_it_is_read(database_url: str) -> None:
    async with secured(database_url, max_body_bytes=10_000) as harness, harness.client() as client:
        declared = await client.post("/graphql", content=b"{" + b" " * 20_000 + b"}",
                                     headers={"content-type": "application/json"})  # fmt: skip
        assert declared.status_code == 413
        assert code_of(declared) == "PAYLOAD_TOO_LARGE"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 5_000

        streamed = await client.post(
            "/graphql", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert code_of(streamed) == "PAYLOAD_TOO_LARGE"
        assert (await post(client, "{ __typename }")).status_code == 200


async def test_batches_over_a_thousand_are_refused(database_url: str) -> None:
    async with secured(database_url) as harness, harness.client() as client:
        inputs = [{"workDirectory": "/r", "prompt": "p"}] * 1001
        response = await post(
            client, "mutation($i: [SubmitTaskInput!]!) { submitTasks(inputs: $i) { id } }", i=inputs
        )
        assert code_of(response) == "VALIDATION_ERROR"
        assert response.json()["errors"][0]["extensions"]["field"] == "inputs"


async def test_introspection_can_be_turned_off(database_url: str) -> None:
    query = "{ __schema { queryType { name } } }"
    async with secured(database_url) as harness, harness.client() as client:
        assert (await post(client, query)).json()["data"]["__schema"]["queryType"][
            "name"
        ] == "Query"
    async with secured(database_url, introspection=False) as harness, harness.client() as client:
        response = await post(client, query)
        assert code_of(response) == "VALIDATION_ERROR"
        assert "introspection" in response.json()["errors"][0]["message"].lower()
        assert (await post(client, "{ statistics { total } }")).status_code == 200


async def test_key_is_stored_as_a_hash(database_url: str) -> None:
    async with secured(database_url) as harness:
        raw = await harness.issue("k", "read")
        assert await harness.store.keys.find_key(hash_key(raw)) is not None
        assert await harness.store.keys.find_key(raw) is None


# --- the subscription WebSocket, against a real server process ---


async def issue_offline(database_url: str, **scopes: str) -> dict[str, str]:
    """Keys created the way an operator does, in a store of their own."""
    store = open_store(Settings(database_url=database_url))
    await store.open()
    try:
        return {
            name: (await issue_key(store.keys, name, scope, datetime.now(UTC)))[1]
            for name, scope in scopes.items()
        }
    finally:
        await store.close()


async def ws_connect(url: str, payload: dict[str, Any], **options: Any) -> ClientConnection:
    socket = await websockets.connect(
        url, subprotocols=[Subprotocol("graphql-transport-ws")], **options
    )
    await socket.send(json.dumps({"type": "connection_init", "payload": payload}))
    return socket


async def ws_next(socket: ClientConnection) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 10))
        if message["type"] != "ping":
            return message


async def close_code(socket: ClientConnection) -> int | None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws_next(socket)
    return closed.value.rcvd.code if closed.value.rcvd else None


def subscribe(op_id: str) -> str:
    return json.dumps(
        {"id": op_id, "type": "subscribe", "payload": {"query": SUBSCRIBE, "variables": {}}}
    )


async def test_websocket_needs_a_valid_key_and_the_read_scope(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    keys = await issue_offline(database_url, reader="read", worker="work", boss="admin")
    server = start_server(database_url)

    for payload in ({}, {"Authorization": "Bearer tko_wrong"}, {"Authorization": keys["reader"]}):
        socket = await ws_connect(server.ws_url, payload)
        assert await close_code(socket) == 4401, payload

    worker = await ws_connect(server.ws_url, {"Authorization": f"Bearer {keys['worker']}"})
    assert (await ws_next(worker))["type"] == "connection_ack"
    await worker.send(subscribe("1"))
    refused = await ws_next(worker)
    assert refused["type"] == "error"
    assert refused["payload"][0]["extensions"]["code"] == "FORBIDDEN"
    await worker.close()

    reader = await ws_connect(server.ws_url, {"Authorization": f"Bearer {keys['reader']}"})
    assert (await ws_next(reader))["type"] == "connection_ack"
    await reader.send(subscribe("1"))
    headers = {"Authorization": f"Bearer {keys['boss']}"}
    by_header = await ws_connect(server.ws_url, {}, additional_headers=headers)
    assert (await ws_next(by_header))["type"] == "connection_ack"
    await by_header.send(subscribe("1"))
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        submitted = await post(http, OPERATIONS["submitTask"][0])
        assert submitted.status_code == 200, submitted.text
    for socket in (reader, by_header):
        event = await ws_next(socket)
        assert event["type"] == "next"
        assert event["payload"]["data"]["taskEvents"]["status"] == "WAITING"
        await socket.close()


async def test_websocket_revoked_key_is_closed_on_its_next_subscribe(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    keys = await issue_offline(database_url, doomed="read")
    server = start_server(database_url)
    auth = {"Authorization": f"Bearer {keys['doomed']}"}
    held = await ws_connect(server.ws_url, auth)
    assert (await ws_next(held))["type"] == "connection_ack"

    assert (
        await asyncio.to_thread(taskorch, ["keys", "revoke", "doomed", "--database", database_url])
        == 0
    )

    async def refused() -> bool:
        socket = await ws_connect(server.ws_url, auth)
        try:
            return (await ws_next(socket))["type"] != "connection_ack"
        except websockets.ConnectionClosed as closed:
            return closed.rcvd is not None and closed.rcvd.code == 4401
        finally:
            await socket.close()

    await eventually(refused, timeout=5)
    await held.send(subscribe("1"))
    assert await close_code(held) == 4401


async def test_websocket_subscribe_messages_spend_the_rate_limit(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    keys = await issue_offline(database_url, reader="read")
    server = start_server(database_url, {"TASKORCH_RATE_LIMIT": "3"})
    socket = await ws_connect(server.ws_url, {"Authorization": f"Bearer {keys['reader']}"})
    # the upgrade carried no key, so it spent the address's allowance; subscribes spend the key's
    assert (await ws_next(socket))["type"] == "connection_ack"
    for op_id in "1234":
        await socket.send(subscribe(op_id))
    refused = await ws_next(socket)
    assert refused["type"] == "error"
    assert refused["id"] == "4"
    assert refused["payload"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert refused["payload"][0]["extensions"]["retryAfter"] >= 1
    await socket.close()
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {keys['reader']}"}
    ) as http:
        limited = await post(http, "{ __typename }")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1


# --- secrets stay out of logs ---


def test_redact_masks_keys_and_secret_looking_values() -> None:
    raw = "tko_" + "x" * 43
    masked = redact(
        {
            "metadata": {"password": "p", "api_key": "k", "private_key": "pk", "note": "fine"},
            "header": f"Authorization: Bearer {raw}",
            "items": [raw, {"token": "t"}],
        }
    )
    assert raw not in json.dumps(masked)
    assert masked["metadata"] == {
        "password": "[REDACTED]",
        "api_key": "[REDACTED]",
        "private_key": "[REDACTED]",
        "note": "fine",
    }
    assert masked["items"][1] == {"token": "[REDACTED]"}


_SECRET_FRAGMENTS = st.sampled_from(
    ["Bearer ", "bearer\t", "tko_", "TKO_", "://", "user:", "@", "pass", "PASSWD=", "token:",
     "Secret = ", "api_key=", "api-key: ", "APIKEY=", "authorization=", "Credentials:", "'", '"',
     "KEY", " ", "abc123", "x.y/z", "é", ";"]
)  # fmt: skip


@given(st.lists(st.one_of(_SECRET_FRAGMENTS, st.text(max_size=8)), max_size=12).map("".join))
def test_redact_leaves_only_text_no_pattern_matches_unscanned(text: str) -> None:
    """Text is scanned once for anything a pattern needs before the patterns run: the result is
    what running every pattern gives."""
    expected = text
    for pattern, replacement in _PATTERNS:
        expected = pattern.sub(replacement, expected)
    assert redact(text) == expected


async def test_keys_and_secrets_stay_out_of_the_server_log(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    keys = await issue_offline(url, boss="admin")
    server = start_server(url, {"TASKORCH_LOG_LEVEL": "DEBUG"})
    headers = {"Authorization": f"Bearer {keys['boss']}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        submitted = await post(
            http,
            "mutation($i: SubmitTaskInput!) { submitTask(input: $i) { id } }",
            i={"workDirectory": "/r", "prompt": "p", "metadata": {"password": "hunter2-secret"}},
        )
        assert submitted.status_code == 200, submitted.text
        wrong = await http.post(
            "/graphql",
            json={"query": "{ __typename }"},
            headers={"Authorization": "Bearer tko_wrong-guess-123"},
        )
        assert wrong.status_code == 401
    log = server.log.read_text()
    assert "POST /graphql" in log or "/graphql" in log  # the requests were logged
    for secret in (keys["boss"], "tko_wrong-guess-123", "hunter2-secret"):
        assert secret not in log


async def test_startup_warns_how_to_create_a_key_while_none_exists(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="taskorch.auth"):
        async with secured(database_url):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "taskorch.auth"]
    assert any("taskorch keys create --name NAME --scopes" in m for m in warnings), warnings


async def test_graphiql_page_and_assets_open_without_a_key_but_operations_do_not(
    database_url: str,
) -> None:
    async with secured(database_url) as harness:
        await harness.issue("reader", "read")  # keys exist: protected mode is over
        async with harness.client(address=REMOTE) as browser:
            page = await browser.get("/graphql", headers={"Accept": "text/html"})
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            asset = next(p for p in STATIC.rglob("*.js") if p.is_file())
            served = await browser.get(f"{STATIC_PATH}/{asset.relative_to(STATIC).as_posix()}")
            assert served.status_code == 200
            assert served.content == asset.read_bytes()
            # Anything that runs an operation still needs a key, in a browser or not.
            query = await browser.get(
                "/graphql", params={"query": "{ __typename }"}, headers={"Accept": "text/html"}
            )
            assert query.status_code == 401
            assert (await post(browser, "{ __typename }")).status_code == 401
            assert (
                await browser.get("/api/v1/tasks", headers={"Accept": "text/html"})
            ).status_code == 401


def test_the_database_password_never_reaches_the_log(
    postgres_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    # The test server trusts every local connection, so any password connects; none may be logged.
    secret = "pw-7f3a9c-never-logged"
    url = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@", 1)
    assert secret in url
    server = start_server(url)
    assert httpx.get(f"{server.url}/health").status_code == 200
    log = server.log.read_text()
    assert "serving postgresql://postgres:[REDACTED]@" in log, log
    assert secret not in log
