"""An operation that cannot start over graphql-transport-ws gets an `error` message with the
errors HTTP gives for the same document, seen by a raw socket and by the `gql` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from tests.conftest import ServerProcess
from tests.test_security import issue_offline
from tests.ws import SUBSCRIBE, Subscriber

# (document, operationName): each fails before anything runs.
UNSTARTABLE = {
    "syntax error": ("subscription {", None),
    "token limit": ("subscription { " + "__typename " * 10_001 + "}", None),
    "unknown operation": ("subscription A { taskEvents { id } }", "Missing"),
    "no operation": ("fragment F on Subscription { __typename }", None),
    "unknown field": ("subscription { nope }", None),
}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'taskorch.db'}"


@pytest.fixture
def server(sqlite_url: str, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(sqlite_url)


async def http_messages(server: ServerProcess, payload: dict[str, Any], key: str = "") -> list[str]:
    """The error messages HTTP answers for `payload`; some refusals are plain text."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        response = await http.post("/graphql", json=payload)
    assert response.status_code >= 200, response.text
    if not response.headers["content-type"].startswith("application/json"):
        return [response.text]
    return [error["message"] for error in response.json()["errors"]]


def payload_of(document: str, name: str | None) -> dict[str, Any]:
    return {"query": document, **({"operationName": name} if name else {})}


def subscribe_frame(op_id: str, payload: dict[str, Any]) -> str:
    return json.dumps({"id": op_id, "type": "subscribe", "payload": payload})


@pytest.mark.parametrize("case", UNSTARTABLE)
async def test_unstartable_subscription_gets_the_errors_http_gives(
    server: ServerProcess, case: str
) -> None:
    document, name = UNSTARTABLE[case]
    subscriber = await Subscriber.connect(server.ws_url)
    try:
        await subscriber.connection.send(
            subscribe_frame("2", payload_of(document, name))  # raw: clients refuse some of these
        )
        message = await subscriber.message()
        assert message["type"] == "error", message
        assert message["id"] == "2", message
        assert [e["extensions"]["code"] for e in message["payload"]] == ["VALIDATION_ERROR"]
        assert [e["message"] for e in message["payload"]] == await http_messages(
            server, payload_of(document, name)
        )
        # The socket still serves the caller's other operations.
        op_id = await subscriber.subscribe()
        async with httpx.AsyncClient(base_url=server.url) as http:
            await http.post(
                "/graphql",
                json={"query": 'mutation { submitTask(input: {workDirectory: "/r", prompt: "p"}) { id } }'},
            )  # fmt: skip
        event = await subscriber.message()
        assert event["type"] == "next", event
        assert event["id"] == op_id, event
    finally:
        await subscriber.close()


async def test_subscription_without_the_scope_is_an_error_and_the_socket_stays_open(
    sqlite_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    keys = await issue_offline(sqlite_url, worker="work")
    server = start_server(sqlite_url)
    subscriber = await Subscriber.connect(
        server.ws_url, {"Authorization": f"Bearer {keys['worker']}"}
    )
    try:
        op_id = await subscriber.subscribe()
        message = await subscriber.message()
        assert message["type"] == "error", message
        assert message["id"] == op_id, message
        error = message["payload"][0]
        assert error["extensions"] == {
            "code": "FORBIDDEN",
            "field": "taskEvents",
            "requiredScope": "read",
        }
        assert [error["message"]] == await http_messages(
            server, {"query": SUBSCRIBE}, key=keys["worker"]
        )
        await subscriber.connection.send('{"type": "ping"}')
        assert await subscriber.message() == {"type": "pong"}
    finally:
        await subscriber.close()


class RawRequest(GraphQLRequest):
    """A request whose text is sent as it is: `gql` parses documents before sending them."""

    def __init__(self, query: str) -> None:
        super().__init__("subscription { __typename }")
        self.query = query

    @property
    def payload(self) -> dict[str, Any]:
        return {"query": self.query}


@pytest.fixture
async def gql_client(server: ServerProcess) -> AsyncIterator[Any]:
    transport = WebsocketsTransport(url=server.ws_url, subprotocols=["graphql-transport-ws"])
    async with Client(transport=transport) as session:
        yield session


async def first_result(session: Any, request: GraphQLRequest) -> list[Any]:
    return [result async for result in session.subscribe(request)][:1]


async def test_gql_client_raises_the_syntax_error(gql_client: Any) -> None:
    with pytest.raises(TransportQueryError) as raised:
        await asyncio.wait_for(first_result(gql_client, RawRequest("subscription {")), 10)
    assert raised.value.errors is not None
    assert raised.value.errors[0]["extensions"]["code"] == "VALIDATION_ERROR"
    assert raised.value.errors[0]["message"].startswith("Syntax Error")


async def test_gql_client_raises_the_unknown_operation(gql_client: Any) -> None:
    request = GraphQLRequest("subscription A { taskEvents { id } }", operation_name="Missing")
    with pytest.raises(TransportQueryError) as raised:
        await asyncio.wait_for(first_result(gql_client, request), 10)
    assert raised.value.errors is not None
    assert raised.value.errors[0]["message"] == 'Unknown operation named "Missing".'
