"""Shared live subscriptions, on a real server over real sockets: sockets that subscribe alike share
one execution and receive the same payloads; different variables, a replay, or a socket leaving
never mix streams."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GraphQLClient, ServerProcess, eventually
from tests.ws import SUBSCRIBE, Subscriber

WITH_TASK = SUBSCRIBE.replace("workDirectory }", "workDirectory task { prompt status } }")
SUBMIT = "mutation($d: String!, $p: String!) { submitTask(input: {workDirectory: $d, prompt: $p}) { id } }"


async def gauges(http: httpx.AsyncClient) -> tuple[float, float]:
    text = (await http.get("/metrics")).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return values["live_subscriptions"], values["live_subscription_executions"]


async def payloads(subscriber: Subscriber, count: int) -> list[str]:
    """The next `count` event payloads, as the JSON text of each."""
    out = []
    for _ in range(count):
        message = await subscriber.message()
        assert message["type"] == "next", message
        assert "errors" not in message["payload"], message
        out.append(json.dumps(message["payload"], sort_keys=True))
    return out


async def test_alike_subscriptions_share_one_execution_and_get_the_same_events(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    http = remote.http
    async with contextlib.AsyncExitStack() as stack:

        async def connect() -> Subscriber:
            subscriber = await Subscriber.connect(server.ws_url)
            stack.push_async_callback(subscriber.close)
            return subscriber

        alike = [await connect() for _ in range(20)]
        for subscriber in alike:
            await subscriber.subscribe(WITH_TASK)
        only_b = [await connect() for _ in range(2)]
        for subscriber in only_b:
            await subscriber.subscribe(WITH_TASK, dir="/b")
        replaying = await connect()
        await replaying.subscribe(WITH_TASK, after="0")

        async def all_started() -> bool:
            return await gauges(http) == (23, 3)  # 20 share one, 2 share another, 1 replays

        await eventually(all_started)
        await asyncio.sleep(0.2)  # a started execution has subscribed to the bus
        for index, directory in enumerate(["/a", "/b", "/a", "/b", "/a"]):
            await remote.ok(SUBMIT, d=directory, p=f"p{index}")

        seen = [await payloads(s, 5) for s in alike]
        assert all(got == seen[0] for got in seen)
        events = [json.loads(p)["data"]["taskEvents"] for p in seen[0]]
        assert [e["task"]["prompt"] for e in events] == [f"p{i}" for i in range(5)]
        assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
        for subscriber in only_b:
            got = [json.loads(p)["data"]["taskEvents"] for p in await payloads(subscriber, 2)]
            assert [e["task"]["prompt"] for e in got] == ["p1", "p3"]
        assert await payloads(replaying, 5) == seen[0]

        # half the group leaves; the rest go on, with nothing extra and nothing missed
        for subscriber in alike[:10]:
            await subscriber.close()

        async def half_left() -> bool:
            return await gauges(http) == (13, 3)

        await eventually(half_left)
        await remote.ok(SUBMIT, d="/a", p="after")
        later = [await payloads(s, 1) for s in alike[10:]]
        assert all(
            json.loads(p[0])["data"]["taskEvents"]["task"]["prompt"] == "after" for p in later
        )
        assert len({p[0] for p in later}) == 1

        # completing one operation ends only that socket's share
        op = alike[10]
        await op.connection.send(json.dumps({"id": "1", "type": "complete"}))

        async def one_completed() -> bool:
            return await gauges(http) == (12, 3)

        await eventually(one_completed)

    async def all_gone() -> bool:
        return await gauges(http) == (0, 0)

    await eventually(all_gone)


async def test_a_shared_subscription_refuses_what_it_cannot_run(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    subscriber = await Subscriber.connect(server.ws_url)
    try:
        await subscriber.subscribe("subscription { taskEvents { noSuchField } }")
        message = await subscriber.message()
        assert message["type"] == "error", message
        assert message["payload"][0]["extensions"]["code"] == "VALIDATION_ERROR"
        await subscriber.subscribe(SUBSCRIBE, dir="relative")
        message = await subscriber.message()
        assert message["type"] == "next", message
        assert message["payload"]["errors"][0]["extensions"]["field"] == "workDirectory"
        assert (await subscriber.message())["type"] == "complete"
        # the socket still serves
        await subscriber.subscribe(SUBSCRIBE)
        await asyncio.sleep(0.3)
        await remote.ok(SUBMIT, d="/ok", p="p")
        assert (await subscriber.event())["workDirectory"] == "/ok"
    finally:
        await subscriber.close()


async def test_sockets_are_not_compressed_even_when_the_client_offers_it(
    server: ServerProcess,
) -> None:
    subscriber = await Subscriber.connect(server.ws_url)  # the client offers permessage-deflate
    try:
        response = subscriber.connection.response
        assert response is not None
        assert "Sec-WebSocket-Extensions" not in response.headers
        assert subscriber.connection.protocol.extensions == []
    finally:
        await subscriber.close()
