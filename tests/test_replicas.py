"""Two `taskorch serve` replicas on one PostgreSQL database: claims stay exactly-once across them,
and a subscriber on one sees, in order, what happens on the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tests.conftest import GraphQLClient, ServerProcess
from tests.ws import Subscriber

SUBMIT_MANY = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
SUBMIT = "mutation($dir: String!, $p: String!) { submitTask(input: {workDirectory: $dir, prompt: $p}) { id } }"
CLAIM = """mutation($dir: String!, $w: String!) {
  claimTask(workDirectory: $dir, workerId: $w) { id workerId status } }"""
COMPLETE = "mutation($id: ID!, $w: String!) { completeTask(id: $id, workerId: $w) { status } }"
HISTORY = "query($id: ID!) { task(id: $id) { history { id status } } }"
STATS = "query($dir: String) { statistics(workDirectory: $dir) { waiting working total } }"

TASKS = 2_000
CLAIMERS = 200
WORK = "/replicas/work"
WATCHED = "/replicas/watched"


async def claim_until_empty(client: GraphQLClient, worker: str) -> list[str]:
    claimed: list[str] = []
    while (task := (await client.ok(CLAIM, dir=WORK, w=worker))["claimTask"]) is not None:
        assert task["workerId"] == worker
        assert task["status"] == "WORKING"
        claimed.append(task["id"])
    return claimed


async def submit_claim_complete(client: GraphQLClient, count: int) -> list[str]:
    """Full lifecycles, one after another, on one replica; returns the task ids in order."""
    ids: list[str] = []
    for i in range(count):
        task_id = (await client.ok(SUBMIT, dir=WATCHED, p=f"watched {i}"))["submitTask"]["id"]
        await client.ok(CLAIM, dir=WATCHED, w="watcher")
        await client.ok(COMPLETE, id=task_id, w="watcher")
        ids.append(task_id)
    return ids


async def test_two_replicas_claim_exactly_once_and_share_events(
    postgres_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    env = {"TASKORCH_RATE_LIMIT": "0", "TASKORCH_LOG_LEVEL": "WARNING"}
    replica_a = start_server(postgres_url, env)
    replica_b = start_server(postgres_url, env)
    # Idle connections are dropped well before uvicorn's 5 s keep-alive ends, so a request is
    # never sent on a connection the server is closing at that moment.
    limits = httpx.Limits(max_connections=CLAIMERS // 2, keepalive_expiry=1.0)
    subscriber = await Subscriber.connect(replica_a.ws_url)
    async with (
        httpx.AsyncClient(base_url=replica_a.url, timeout=60, limits=limits) as http_a,
        httpx.AsyncClient(base_url=replica_b.url, timeout=60, limits=limits) as http_b,
    ):
        a, b = GraphQLClient(http_a), GraphQLClient(http_b)
        try:
            # after "0": replay from the table, then live, so no change can slip in before it starts
            await subscriber.subscribe(dir=WATCHED, after="0")
            inputs = [{"workDirectory": WORK, "prompt": f"task {i}"} for i in range(TASKS)]
            await asyncio.gather(
                a.ok(SUBMIT_MANY, inputs=inputs[: TASKS // 2]),
                b.ok(SUBMIT_MANY, inputs=inputs[TASKS // 2 :]),
            )

            started = time.monotonic()
            *claims, watched = await asyncio.gather(
                *(claim_until_empty(a if i % 2 else b, f"worker-{i}") for i in range(CLAIMERS)),
                submit_claim_complete(b, 10),  # meanwhile, on replica B only
            )
            elapsed = time.monotonic() - started
            print(f"\n{TASKS} claims by {CLAIMERS} claimers over 2 replicas in {elapsed:.2f}s")

            ids = [task_id for claimed in claims for task_id in claimed]
            assert len(ids) == TASKS
            assert len(set(ids)) == TASKS
            for client in (a, b):
                stats = (await client.ok(STATS, dir=WORK))["statistics"]
                assert stats == {"waiting": 0, "working": TASKS, "total": TASKS}

            events = await subscriber.events(30, timeout=20)
            event_ids = [int(e["id"]) for e in events]
            assert event_ids == sorted(event_ids)
            assert len(set(event_ids)) == 30
            for index, task_id in enumerate(watched):
                mine = events[index * 3 : index * 3 + 3]
                assert [e["taskId"] for e in mine] == [task_id] * 3
                assert [e["status"] for e in mine] == ["WAITING", "WORKING", "COMPLETED"]
                stored = (await b.ok(HISTORY, id=task_id))["task"]["history"]
                assert [e["id"] for e in mine] == [e["id"] for e in stored]
        finally:
            await subscriber.close()
