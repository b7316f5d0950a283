"""Two server processes on one SQLite file behave as one server: claims stay exactly-once, and
subscribers and waiting claims see what the other process commits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import GraphQLClient, ServerProcess
from tests.ws import Subscriber

SUBMIT = """mutation($dir: String!, $p: String!) {
  submitTask(input: {workDirectory: $dir, prompt: $p}) { id } }"""
CLAIM = """mutation($dir: String!, $w: String!, $wait: Float) {
  claimTask(workDirectory: $dir, workerId: $w, waitSeconds: $wait) { id } }"""


async def test_two_processes_share_events_waiters_and_claims(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = start_server(url), start_server(url)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as http_b,
    ):
        on_a, on_b = GraphQLClient(http_a), GraphQLClient(http_b)
        subscriber = await Subscriber.connect(a.ws_url)
        try:
            await subscriber.subscribe()
            await asyncio.sleep(0.3)
            # a change on B reaches A's subscriber, interleaved with A's own, in id order
            ids = []
            for i in range(10):
                client = on_b if i % 2 else on_a
                ids.append((await client.ok(SUBMIT, dir="/mixed", p=f"p{i}"))["submitTask"]["id"])
            events = await subscriber.events(10)
            assert [e["taskId"] for e in events] == ids
            assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
        finally:
            await subscriber.close()

        # a waiting claim on A is woken by a submit on B
        waiting = asyncio.create_task(on_a.ok(CLAIM, dir="/wake", w="wa", wait=10))
        await asyncio.sleep(0.3)
        submitted_at = time.monotonic()
        task_id = (await on_b.ok(SUBMIT, dir="/wake", p="x"))["submitTask"]["id"]
        assert (await waiting)["claimTask"]["id"] == task_id
        assert time.monotonic() - submitted_at < 0.5

        # claimers on both processes take each task exactly once
        async def drain(client: GraphQLClient, name: str) -> list[str]:
            got: list[str] = []
            while (task := (await client.ok(CLAIM, dir="/mixed", w=name))["claimTask"]) is not None:
                got.append(task["id"])
            return got

        results = await asyncio.gather(
            *(drain(on_a if i % 2 else on_b, f"w{i}") for i in range(10))
        )
        claimed = [t for r in results for t in r]
        assert sorted(claimed) == sorted(ids)
