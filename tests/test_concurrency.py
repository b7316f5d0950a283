"""Where queues break: many concurrent clients on every claim, lease and retry path."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from api.core.domain import TaskStatus
from api.core.errors import Conflict
from api.core.service import TaskService
from api.core.validation import task_spec
from tests.conftest import FakeClock, GraphQLClient, ServerProcess

Submit = Callable[..., Awaitable[Any]]


async def fill(
    service: TaskService, count: int, work_directory: str = "/repo", **fields: Any
) -> list[str]:
    specs = [
        task_spec(work_directory=work_directory, prompt=f"p{i}", **fields) for i in range(count)
    ]
    ids: list[str] = []
    for start in range(0, count, 1000):
        ids += [t.id for t in await service.submit_many(specs[start : start + 1000])]
    return ids


async def claim_until_empty(service: TaskService, worker: str) -> list[str]:
    claimed: list[str] = []
    while tasks := await service.claim("/repo", worker):
        claimed.append(tasks[0].id)
    return claimed


async def test_fifty_claimers_over_five_hundred_tasks_claim_each_exactly_once(
    service: TaskService,
) -> None:
    ids = await fill(service, 500)
    results = await asyncio.gather(*(claim_until_empty(service, f"w{i}") for i in range(50)))
    claimed = [task_id for worker in results for task_id in worker]
    assert len(claimed) == 500
    assert set(claimed) == set(ids)
    stats = await service.statistics()
    assert stats[TaskStatus.WORKING] == 500
    for task_id in ids[:20]:  # exactly one claim in each history
        assert [e.status for e in await service.history(task_id)].count(TaskStatus.WORKING) == 1


async def test_concurrent_batch_claims_never_overlap(service: TaskService) -> None:
    ids = await fill(service, 600)

    async def worker(name: str) -> list[str]:
        got: list[str] = []
        while tasks := await service.claim("/repo", name, limit=7):
            got += [t.id for t in tasks]
        return got

    results = await asyncio.gather(*(worker(f"w{i}") for i in range(30)))
    claimed = [t for r in results for t in r]
    assert sorted(claimed) == sorted(ids)


async def test_sweep_racing_completions_settles_each_task_once(
    service: TaskService, clock: FakeClock
) -> None:
    ids = await fill(service, 200)
    holders = {}
    for i in range(200):
        (task,) = await service.claim("/repo", f"w{i}", lease_seconds=10)
        holders[task.id] = task.worker_id
    clock.advance(11)  # every lease has run out; completions and sweeps now race

    async def complete(task_id: str) -> str:
        try:
            await service.complete(task_id, holders[task_id], {"ok": 1})
            return "completed"
        except Conflict:
            return "lost"

    outcomes = await asyncio.gather(
        *(complete(t) for t in ids), *(service.expire_leases() for _ in range(5))
    )
    completions = outcomes[:200]
    swept = [t.id for batch in outcomes[200:] for t in batch]
    assert len(swept) == len(set(swept))  # no task swept twice
    assert completions.count("completed") + len(swept) == 200
    for task_id in ids:
        task = await service.get(task_id)
        transitions_out = [
            e for e in await service.history(task_id) if e.previous_status is TaskStatus.WORKING
        ]
        assert len(transitions_out) == 1
        if task.status is TaskStatus.COMPLETED:
            assert task_id not in swept
        else:
            assert task.status is TaskStatus.WAITING
            assert task.retry_count == 1


async def test_concurrent_fail_and_cancel_leave_one_outcome(service: TaskService) -> None:
    ids = await fill(service, 100, max_retries=0)
    for i in range(100):
        await service.claim("/repo", f"w{i}")
    tasks = {t: await service.get(t) for t in ids}

    async def attempt(call: Awaitable[Any]) -> bool:
        try:
            await call
            return True
        except Conflict:
            return False

    fails = [attempt(service.fail(t, tasks[t].worker_id or "", "boom")) for t in ids]
    cancels = [attempt(service.cancel(t, "stop")) for t in ids]
    results = await asyncio.gather(*fails, *cancels)
    assert sum(results) == 100  # for each task exactly one of fail / cancel won
    statuses = collections.Counter([(await service.get(t)).status for t in ids])
    assert statuses[TaskStatus.FAILED] + statuses[TaskStatus.CANCELLED] == 100


async def test_concurrent_retries_requeue_once(service: TaskService) -> None:
    (task_id,) = await fill(service, 1, max_retries=0)
    (task,) = await service.claim("/repo", "w")
    await service.fail(task.id, "w", "boom")

    async def retry() -> bool:
        try:
            await service.retry(task_id)
            return True
        except Conflict:
            return False

    assert sum(await asyncio.gather(*(retry() for _ in range(25)))) == 1
    assert len(await service.history(task_id)) == 4


async def test_concurrent_idempotent_submits_make_one_task(service: TaskService) -> None:
    spec = task_spec(work_directory="/repo", prompt="once", idempotency_key="deploy-42")
    tasks = await asyncio.gather(*(service.submit(spec) for _ in range(50)))
    assert len({t.id for t in tasks}) == 1
    assert (await service.statistics()).total == 1


async def test_concurrent_heartbeats_keep_their_own_leases(
    service: TaskService, clock: FakeClock
) -> None:
    await fill(service, 50)
    held = [(await service.claim("/repo", f"w{i}", lease_seconds=10))[0] for i in range(50)]
    clock.advance(8)
    beats = await asyncio.gather(*(service.heartbeat(t.id, t.worker_id or "", 60) for t in held))
    assert all(b.lease_expires_at == clock.now + (b.lease_expires_at - clock.now) for b in beats)
    clock.advance(10)
    assert await service.expire_leases() == []


async def test_fifty_http_claimers_against_a_server_process(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    query = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
    inputs = [{"workDirectory": "/repo", "prompt": f"p{i}"} for i in range(500)]
    ids = {t["id"] for t in (await remote.ok(query, inputs=inputs))["submitTasks"]}
    claim = 'mutation($w: String!) { claimTask(workDirectory: "/repo", workerId: $w) { id } }'
    limits = httpx.Limits(max_connections=50)

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        client = GraphQLClient(http)

        async def worker(name: str) -> list[str]:
            got: list[str] = []
            while (task := (await client.ok(claim, w=name))["claimTask"]) is not None:
                got.append(task["id"])
            return got

        results = await asyncio.gather(*(worker(f"w{i}") for i in range(50)))
    claimed = [t for r in results for t in r]
    assert len(claimed) == 500
    assert set(claimed) == ids


async def test_fifty_one_task_lifecycles_record_each_change_once_in_order(
    service: TaskService,
) -> None:
    """Fifty clients each submit one task, claim one and complete it, all at once: every task is
    completed once, and its history holds its three changes, in order, with gap-free ids."""

    async def lifecycle(number: int) -> str:
        worker = f"w{number}"
        await service.submit(task_spec(work_directory="/life", prompt=f"p{number}"))
        # A claim that finds nothing yet waits for a submit, woken by its commit.
        (task,) = await service.claim("/life", worker, wait_seconds=10)
        done = await service.complete(task.id, worker, {"n": number})
        assert (done.status, done.worker_id) == (TaskStatus.COMPLETED, worker)
        return task.id

    ids = await asyncio.gather(*(lifecycle(n) for n in range(50)))
    assert len(set(ids)) == 50
    assert (await service.statistics())[TaskStatus.COMPLETED] == 50
    positions: list[int] = []
    for task_id in ids:
        history = await service.history(task_id)
        assert [(e.previous_status, e.status) for e in history] == [
            (None, TaskStatus.WAITING),
            (TaskStatus.WAITING, TaskStatus.WORKING),
            (TaskStatus.WORKING, TaskStatus.COMPLETED),
        ]
        submitted, claimed, completed = history
        assert submitted.worker_id is None
        assert claimed.worker_id is not None
        assert completed.worker_id == claimed.worker_id
        assert set(claimed.details) == {"leaseExpiresAt"}
        assert submitted.id < claimed.id < completed.id
        positions += [e.id for e in history]
    assert sorted(positions) == list(range(min(positions), min(positions) + 150))
