"""Live updates against a real server process: subscriptions over WebSocket and waiting claims."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import GraphQLClient, ServerProcess, eventually
from tests.ws import SUBSCRIBE, StalledSubscriber, Subscriber

SUBMIT = "mutation($dir: String!, $p: String!) { submitTask(input: {workDirectory: $dir, prompt: $p}) { id } }"
CLAIM = """mutation($dir: String!, $w: String!, $wait: Float) {
  claimTask(workDirectory: $dir, workerId: $w, waitSeconds: $wait) { id } }"""
COMPLETE = "mutation($id: ID!, $w: String!) { completeTask(id: $id, workerId: $w) { id } }"


async def submit(remote: GraphQLClient, directory: str = "/repo", prompt: str = "p") -> str:
    task_id: str = (await remote.ok(SUBMIT, dir=directory, p=prompt))["submitTask"]["id"]
    return task_id


async def test_subscriber_sees_submit_claim_complete_in_order(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe()
    await asyncio.sleep(0.2)  # let the subscription register before the first change
    task_id = await submit(remote)
    await remote.ok(CLAIM, dir="/repo", w="w1")
    await remote.ok(COMPLETE, id=task_id, w="w1")
    events = await sub.events(3)
    assert [e["status"] for e in events] == ["WAITING", "WORKING", "COMPLETED"]
    assert [e["previousStatus"] for e in events] == [None, "WAITING", "WORKING"]
    assert all(e["taskId"] == task_id for e in events)
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    await sub.close()


async def test_filters_all_must_match(server: ServerProcess, remote: GraphQLClient) -> None:
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe(dir="/b", statuses=["WORKING"])
    await asyncio.sleep(0.2)
    await submit(remote, "/a")
    b_id = await submit(remote, "/b")
    await remote.ok(CLAIM, dir="/a", w="w")
    await remote.ok(CLAIM, dir="/b", w="w")
    event = await sub.event()
    assert (event["taskId"], event["status"], event["workDirectory"]) == (b_id, "WORKING", "/b")
    with pytest.raises(TimeoutError):
        await sub.event(timeout=0.5)
    await sub.close()


async def test_resume_with_after_misses_nothing(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe()
    await asyncio.sleep(0.2)
    first = await submit(remote)
    seen = await sub.event()
    await sub.close()
    # while disconnected
    await remote.ok(CLAIM, dir="/repo", w="w1")
    await remote.ok(COMPLETE, id=first, w="w1")
    second = await submit(remote)
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe(after=seen["id"])
    replayed = await sub.events(3)
    assert [(e["taskId"], e["status"]) for e in replayed] == [
        (first, "WORKING"), (first, "COMPLETED"), (second, "WAITING"),
    ]  # fmt: skip
    third = await submit(remote)  # live again, right after the replay
    live = await sub.event()
    assert (live["taskId"], live["status"]) == (third, "WAITING")
    ids = [int(seen["id"])] + [int(e["id"]) for e in [*replayed, live]]
    assert ids == sorted(set(ids))  # no duplicate, in order
    await sub.close()


async def test_resume_while_changes_keep_coming_has_no_gap_or_duplicate(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    for i in range(50):
        await submit(remote, prompt=f"before {i}")

    async def producer() -> None:
        for i in range(50):
            await submit(remote, prompt=f"during {i}")

    sub = await Subscriber.connect(server.ws_url)
    producing = asyncio.create_task(producer())
    await sub.subscribe(after="0")
    events = await sub.events(100)
    await producing
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100
    await sub.close()


async def test_two_subscribers_see_the_same_events(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    one, two = await Subscriber.connect(server.ws_url), await Subscriber.connect(server.ws_url)
    await one.subscribe()
    await two.subscribe()
    await asyncio.sleep(0.2)
    for _ in range(5):
        await submit(remote)
    assert [e["id"] for e in await one.events(5)] == [e["id"] for e in await two.events(5)]
    await one.close()
    await two.close()


async def test_rolled_back_change_publishes_no_event(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    held = await submit(remote)
    await remote.ok(CLAIM, dir="/repo", w="w1")
    not_held = await submit(remote)
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe(statuses=["COMPLETED"])
    await asyncio.sleep(0.2)
    query = """mutation($items: [CompleteItem!]!) { completeTasks(workerId: "w1", items: $items) { id } }"""
    error = await remote.error(query, items=[{"id": held}, {"id": not_held}])
    assert error["extensions"]["code"] == "CONFLICT"
    with pytest.raises(TimeoutError):
        await sub.event(timeout=0.7)  # the completion of `held` was rolled back with the batch
    task = await remote.ok("query($id: ID!) { task(id: $id) { status } }", id=held)
    assert task["task"]["status"] == "WORKING"
    await sub.close()


async def test_bad_subscription_arguments_are_validation_errors(server: ServerProcess) -> None:
    sub = await Subscriber.connect(server.ws_url)
    await sub.subscribe(after="-5")
    message = await sub.message()
    assert message["type"] in ("error", "next")
    errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
    assert errors[0]["extensions"] == {"code": "VALIDATION_ERROR", "field": "after"}
    await sub.close()


async def test_waiting_claim_is_woken_by_the_submit(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    waiting = asyncio.create_task(remote.ok(CLAIM, dir="/wake", w="w1", wait=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    submitted_at = time.monotonic()
    task_id = await submit(remote, "/wake")
    claimed = await waiting
    assert claimed["claimTask"]["id"] == task_id
    assert time.monotonic() - submitted_at < 0.5


async def test_waiting_claim_returns_null_at_the_deadline(remote: GraphQLClient) -> None:
    started = time.monotonic()
    assert (await remote.ok(CLAIM, dir="/none", w="w1", wait=0.5))["claimTask"] is None
    assert time.monotonic() - started >= 0.5


async def test_twenty_waiters_and_twenty_submits_give_twenty_distinct_claims(
    server: ServerProcess,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        client = GraphQLClient(http)
        waiters = [
            asyncio.create_task(client.ok(CLAIM, dir="/many", w=f"w{i}", wait=15))
            for i in range(20)
        ]
        await asyncio.sleep(0.5)
        submitted = {await submit(client, "/many", f"p{i}") for i in range(20)}
        claims = [(await w)["claimTask"] for w in waiters]
    assert all(c is not None for c in claims)
    assert {c["id"] for c in claims} == submitted


async def test_disconnected_waiter_takes_no_task(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(
                "/graphql",
                json={"query": CLAIM, "variables": {"dir": "/gone", "w": "ghost", "wait": 20}},
            )
    await asyncio.sleep(0.3)
    task_id = await submit(remote, "/gone")
    await asyncio.sleep(0.5)
    task = (await remote.ok("query($id: ID!) { task(id: $id) { status workerId } }", id=task_id))[
        "task"
    ]
    assert task == {"status": "WAITING", "workerId": None}
    assert (await remote.ok(CLAIM, dir="/gone", w="alive"))["claimTask"]["id"] == task_id


@pytest.mark.parametrize("shared", [False, True], ids=["apart", "sharing-one-execution"])
async def test_slow_subscriber_does_not_block_a_fast_one(
    database_url: str, start_server: Callable[..., ServerProcess], shared: bool
) -> None:
    server = start_server(database_url, {"TASKORCH_SUBSCRIBER_BUFFER": "20"})
    async with contextlib.AsyncExitStack() as sockets:
        heavy = SUBSCRIBE.replace("workDirectory }", "workDirectory task { prompt } }")
        # ~100 KB a message to a client that does not read: the server's sends to it block
        slow = await asyncio.to_thread(StalledSubscriber.connect, server.ws_url, heavy)
        sockets.callback(slow.close)
        fast = await Subscriber.connect(server.ws_url)
        sockets.push_async_callback(fast.close)
        await fast.subscribe(heavy if shared else SUBSCRIBE)
        await asyncio.sleep(0.2)
        reading = asyncio.create_task(fast.events(400))
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            client = GraphQLClient(http)
            query = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
            batch = [{"workDirectory": "/flood", "prompt": "x" * 99_000} for _ in range(10)]
            for _ in range(40):
                await client.ok(query, inputs=batch)
                # paced, so that a reader keeping up is never 20 events behind, whatever the load
                await asyncio.sleep(0.1)
        assert len(await reading) == 400  # the fast one got everything; the slow one read nothing
        # the slow one, which never read, was cut off with a clear error, and can resume with `after`
        outcome: list[Any] = []
        while True:
            message = await asyncio.to_thread(slow.message)
            if message["type"] != "next":
                outcome.append(message)
                break
            if message["payload"].get("errors"):
                outcome.append(message["payload"]["errors"][0])
                break
        (error,) = outcome
        assert error["extensions"]["code"] == "SLOW_SUBSCRIBER"
        assert "after" in error["message"]
        resume_after = int(error["extensions"]["resumeAfter"])
        resumed_client = await Subscriber.connect(server.ws_url)
        sockets.push_async_callback(resumed_client.close)
        await resumed_client.subscribe(after=str(resume_after))  # replays what the slow one missed
        resumed = await resumed_client.events(400 - resume_after)
        assert [int(e["id"]) for e in resumed] == list(range(resume_after + 1, 401))


async def test_closing_the_socket_frees_its_subscription(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    async def live() -> float:
        text = (await remote.http.get("/metrics")).text
        (line,) = [x for x in text.splitlines() if x.startswith("live_subscriptions ")]
        return float(line.split()[1])

    subscribers = [await Subscriber.connect(server.ws_url) for _ in range(3)]
    for subscriber in subscribers:
        await subscriber.subscribe()
    await asyncio.sleep(0.3)
    assert await live() == 3
    for subscriber in subscribers:
        await subscriber.close()

    async def freed() -> bool:
        return await live() == 0

    await eventually(freed, timeout=5)
