"""Task dependencies and review gates, through the service, on every store: blocking, unblocking,
the cascade of a failure, retries, reviews, their races, and the migration that added them."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from api.core.domain import Completion, EventFilter, TaskStatus
from api.core.errors import Conflict, ValidationError
from api.core.service import TaskService
from api.core.validation import task_spec
from api.database_url import sqlite_path
from api.settings import Settings
from api.store import open_store
from api.store.base import SCHEMA_VERSION
from api.store.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from tests.conftest import FakeClock
from tests.test_postgres import replica

Submit = Callable[..., Awaitable[Any]]
B, W, C = TaskStatus.BLOCKED, TaskStatus.WAITING, TaskStatus.COMPLETED


async def finish(service: TaskService, task_id: str, worker: str = "w", result: Any = None) -> Any:
    """Claim the task (it must be the next one of its directory) and complete it."""
    task = await service.get(task_id)
    (claimed,) = await service.claim(task.work_directory, worker)
    assert claimed.id == task_id
    return await service.complete(task_id, worker, result)


async def fail_finally(service: TaskService, task_id: str) -> None:
    task = await service.get(task_id)
    (claimed,) = await service.claim(task.work_directory, "w")
    assert claimed.id == task_id
    await service.fail(task_id, "w", "boom", retry=False)


async def statuses(service: TaskService, task_id: str) -> list[TaskStatus]:
    return [e.status for e in await service.history(task_id)]


# --- dependencies ---


async def test_a_task_waits_blocked_until_every_dependency_completes(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    b = await submit_task(work_directory="/b")
    d = await submit_task(depends_on=[a.id, b.id, a.id])  # a repeat counts once
    assert (d.status, d.depends_on, d.blocked_by) == (B, (a.id, b.id), (a.id, b.id))
    assert await service.claim("/repo", "w") == []
    await finish(service, a.id)
    d = await service.get(d.id)
    assert (d.status, d.blocked_by) == (B, (b.id,))
    await finish(service, b.id)
    d = await service.get(d.id)
    assert (d.status, d.blocked_by, d.depends_on) == (W, (), (a.id, b.id))
    history = await service.history(d.id)
    assert [(e.status, e.previous_status) for e in history] == [(B, None), (W, B)]
    assert history[1].details == {"reason": "unblocked"}
    (claimed,) = await service.claim("/repo", "w")
    assert claimed.id == d.id


async def test_a_completed_dependency_counts_as_done_at_submit(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    await finish(service, a.id)
    d = await submit_task(depends_on=[a.id])
    assert (d.status, d.blocked_by) == (W, ())


async def test_unknown_or_failed_dependencies_are_refused_and_nothing_is_stored(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    missing = str(uuid.uuid4())
    with pytest.raises(ValidationError) as caught:
        await submit_task(depends_on=[a.id, missing])
    assert caught.value.field == "depends_on[1]"
    assert missing in caught.value.message
    await service.cancel(a.id)
    specs = [
        task_spec(work_directory="/x", prompt="ok"),
        task_spec(work_directory="/x", prompt="bad", depends_on=[a.id]),
    ]
    with pytest.raises(ValidationError) as caught:
        await service.submit_many(specs)
    assert caught.value.field == "inputs[1].depends_on[0]"
    assert "CANCELLED" in caught.value.message
    with pytest.raises(ValidationError) as caught:
        await submit_task(depends_on=["not-an-id"])
    assert caught.value.field == "depends_on[0]"
    with pytest.raises(ValidationError) as caught:
        await submit_task(depends_on=[str(uuid.uuid4()) for _ in range(101)])
    assert caught.value.field == "depends_on"
    assert (await service.statistics()).total == 1  # only `a`


async def test_a_final_failure_cancels_the_dependents_transitively(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    a = await submit_task(work_directory="/a", max_retries=1)
    b = await submit_task(work_directory="/b", depends_on=[a.id])
    c = await submit_task(work_directory="/c", depends_on=[b.id])
    await service.claim("/a", "w")
    retried = await service.fail(a.id, "w", "boom")  # retries left: back to WAITING, no cascade
    assert retried.status is W
    assert (await service.get(b.id)).status is B
    clock.advance(10)  # past the backoff
    await fail_finally(service, a.id)
    for dependent, dependency in ((b, a), (c, b)):
        task = await service.get(dependent.id)
        assert task.status is TaskStatus.CANCELLED
        last = (await service.history(dependent.id))[-1]
        assert (last.previous_status, last.details) == (
            B,
            {"reason": "dependency_failed", "dependency": dependency.id},
        )


async def test_cancelling_a_dependency_cancels_its_dependents(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    b = await submit_task(depends_on=[a.id])
    await service.cancel(a.id, "not needed")
    assert (await service.get(b.id)).status is TaskStatus.CANCELLED


async def test_retrying_a_dependent_rechecks_its_dependencies(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    other = await submit_task(work_directory="/o")
    d = await submit_task(depends_on=[a.id, other.id])
    await service.cancel(a.id)
    assert (await service.get(d.id)).status is TaskStatus.CANCELLED
    with pytest.raises(Conflict) as caught:
        await service.retry(d.id)
    assert a.id in caught.value.message
    assert caught.value.details == {"dependency": a.id}
    await service.retry(a.id)
    d = await service.retry(d.id)  # a and other still unfinished
    assert (d.status, d.blocked_by) == (B, (a.id, other.id))
    await finish(service, a.id)
    await finish(service, other.id)
    assert (await service.get(d.id)).status is W


async def test_retrying_a_dependent_whose_dependencies_completed_queues_it(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    d = await submit_task(depends_on=[a.id])
    await service.cancel(d.id)  # a BLOCKED task can be cancelled
    await finish(service, a.id)
    assert (await service.get(d.id)).status is TaskStatus.CANCELLED
    assert (await service.retry(d.id)).status is W


async def test_pruning_keeps_a_failed_dependency_while_its_dependent_is_stored(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    a = await submit_task(work_directory="/a")
    done = await submit_task(work_directory="/done")
    d = await submit_task(depends_on=[a.id, done.id])
    await finish(service, done.id)
    await service.cancel(a.id)  # d is cancelled with it
    clock.advance(40 * 86400)
    cutoff = clock.now - timedelta(days=30)
    # One task per prune, as between the batches of a large prune, where a retry may come in.
    while await service.find(d.id) is not None:
        assert await service.find(a.id) is not None
        with pytest.raises(Conflict) as caught:  # a still says why d cannot run
            await service.retry(d.id)
        assert caught.value.details == {"dependency": a.id}
        assert await service.store.prune(cutoff, 1) == 1
    while await service.store.prune(cutoff, 1):  # a may go once nothing depends on it
        pass
    assert [await service.find(t.id) for t in (a, done, d)] == [None, None, None]


async def test_a_blocked_task_can_be_updated(service: TaskService, submit_task: Submit) -> None:
    from api.core.validation import task_changes

    a = await submit_task(work_directory="/a")
    d = await submit_task(depends_on=[a.id])
    changed = await service.update(d.id, d.version, task_changes(prompt="other"))
    assert (changed.status, changed.prompt) == (B, "other")


# --- reviews ---


async def test_review_holds_completion_until_approved(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a", require_review=True)
    d = await submit_task(depends_on=[a.id])
    done = await finish(service, a.id, result={"summary": "x"})
    assert (done.status, done.result, done.completed_at) == (
        TaskStatus.IN_REVIEW,
        {"summary": "x"},
        None,
    )
    assert (await service.get(d.id)).status is B  # IN_REVIEW is not done yet
    with pytest.raises(Conflict):
        await service.approve(d.id)
    approved = await service.approve(a.id, "looks good")
    assert (approved.status, approved.result) == (C, {"summary": "x"})
    assert approved.completed_at is not None
    last = (await service.history(a.id))[-1]
    assert (last.previous_status, last.details) == (
        TaskStatus.IN_REVIEW,
        {"reason": "approved", "note": "looks good"},
    )
    assert (await service.get(d.id)).status is W
    with pytest.raises(Conflict):
        await service.approve(a.id)


async def test_reject_sends_the_task_back_with_feedback_until_retries_are_spent(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a", require_review=True, max_retries=1)
    d = await submit_task(depends_on=[a.id])
    await finish(service, a.id)
    again = await service.reject(a.id, "add a test")
    assert (again.status, again.review_feedback, again.retry_count) == (W, "add a test", 1)
    last = (await service.history(a.id))[-1]
    assert last.details["reason"] == "rejected"
    assert last.details["feedback"] == "add a test"
    await finish(service, a.id)
    spent = await service.reject(a.id, "still no test")
    assert (spent.status, spent.review_feedback) == (TaskStatus.FAILED, "still no test")
    assert (await service.get(d.id)).status is TaskStatus.CANCELLED
    with pytest.raises(Conflict):
        await service.reject(a.id, "again")


async def test_reject_without_retry_fails_at_once(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a", require_review=True)
    await finish(service, a.id)
    failed = await service.reject(a.id, "wrong approach", retry=False)
    assert (failed.status, failed.retry_count) == (TaskStatus.FAILED, 0)
    with pytest.raises(ValidationError) as caught:
        await service.reject(a.id, "  ")
    assert caught.value.field == "feedback"


async def test_batch_completion_respects_each_tasks_review(
    service: TaskService, submit_task: Submit
) -> None:
    plain = await submit_task()
    reviewed = await submit_task(require_review=True)
    await service.claim("/repo", "w", limit=2)
    done = await service.complete_many("w", [Completion(plain.id, 1), Completion(reviewed.id, 2)])
    assert [t.status for t in done] == [C, TaskStatus.IN_REVIEW]
    stats = await service.statistics()
    assert (stats[TaskStatus.IN_REVIEW], stats.summary()["in_review"]) == (1, 1)


async def test_cancelling_a_task_in_review(service: TaskService, submit_task: Submit) -> None:
    a = await submit_task(require_review=True)
    await finish(service, a.id)
    assert (await service.cancel(a.id)).status is TaskStatus.CANCELLED


# --- concurrency ---


async def test_fifty_dependents_unblock_once_each_and_are_claimed_once_by_waiting_claimers(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    specs = [
        task_spec(work_directory="/deps", prompt=f"d{i}", depends_on=[a.id]) for i in range(50)
    ]
    dependents = [t.id for t in await service.submit_many(specs)]

    async def claimer(name: str) -> list[str]:
        got: list[str] = []
        while tasks := await service.claim("/deps", name, wait_seconds=3 if not got else 0.5):
            got.append(tasks[0].id)
        return got

    claimers = [asyncio.ensure_future(claimer(f"c{i}")) for i in range(60)]
    await asyncio.sleep(0.2)  # they are all waiting now
    await finish(service, a.id)
    claimed = [task_id for got in await asyncio.gather(*claimers) for task_id in got]
    assert sorted(claimed) == sorted(dependents)
    for task_id in dependents:
        assert (await statuses(service, task_id)) == [B, W, TaskStatus.WORKING]


async def test_dependencies_completed_concurrently_unblock_their_dependent_once(
    service: TaskService,
) -> None:
    for _ in range(3):
        directories = [f"/dep{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
        deps = [
            (await service.submit(task_spec(work_directory=d, prompt="p"))).id for d in directories
        ]
        joint = [
            (
                await service.submit(
                    task_spec(work_directory="/joint", prompt="j", depends_on=deps)
                )
            ).id
            for _ in range(5)
        ]
        for directory in directories:
            await service.claim(directory, f"w{directory}")
        await asyncio.gather(
            *(service.complete(t, f"w{d}") for t, d in zip(deps, directories, strict=True))
        )
        for task_id in joint:
            task = await service.get(task_id)
            assert (task.status, task.blocked_by) == (W, ())
            assert await statuses(service, task_id) == [B, W]
        claimed = await service.claim("/joint", "j", limit=10)
        assert sorted(t.id for t in claimed) == sorted(joint)


async def test_approve_racing_reject_lets_exactly_one_win(
    service: TaskService, submit_task: Submit
) -> None:
    ids = [(await submit_task(require_review=True)).id for _ in range(20)]
    await service.claim("/repo", "w", limit=20)
    await service.complete_many("w", [Completion(task_id, None) for task_id in ids])
    for task_id in ids:
        results = await asyncio.gather(
            service.approve(task_id), service.reject(task_id, "no"), return_exceptions=True
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1
        assert len(lost) == 1
        assert isinstance(lost[0], Conflict)
        assert (await statuses(service, task_id))[-1] is won[0].status


async def test_a_failure_racing_new_dependents_never_leaves_one_blocked(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    await service.claim("/a", "w")
    submits = [
        service.submit(task_spec(work_directory="/d", prompt="d", depends_on=[a.id]))
        for _ in range(20)
    ]
    results = await asyncio.gather(
        *submits, service.fail(a.id, "w", "boom", retry=False), return_exceptions=True
    )
    for result in results[:-1]:
        if isinstance(result, BaseException):
            assert isinstance(result, ValidationError)  # submitted after the failure
        else:
            assert (await service.get(result.id)).status is TaskStatus.CANCELLED


# --- the migration ---


async def test_a_schema_2_database_keeps_its_tasks_and_history(
    database_url: str, clock: FakeClock
) -> None:
    task_id = str(uuid.uuid4())
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(database_url))
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
        )
        for version, script in enumerate(SQLITE_MIGRATIONS[:2], start=1):
            for statement in script:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
        conn.execute(
            "INSERT INTO tasks (seq, id, work_directory, prompt, priority, status, created_at,"
            " updated_at, result) VALUES (7, ?, '/old', 'old prompt', 2, 'COMPLETED', 1, 2, '{\"a\": 1}')",
            (task_id,),
        )
        for event_id, status in ((3, "WAITING"), (5, "COMPLETED")):
            conn.execute(
                "INSERT INTO task_history (id, task_id, work_directory, status, at)"
                " VALUES (?, ?, '/old', ?, 1)",
                (event_id, task_id, status),
            )
        conn.commit()
        conn.close()
    else:
        pg = await asyncpg.connect(database_url)
        try:
            await pg.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_at TIMESTAMPTZ NOT NULL)"
            )
            for version, script in enumerate(POSTGRES_MIGRATIONS[:2], start=1):
                for statement in script:
                    await pg.execute(statement)
                await pg.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
            await pg.execute(
                "INSERT INTO tasks (id, work_directory, prompt, priority, status, created_at,"
                " updated_at, result) VALUES ($1, '/old', 'old prompt', 2,"
                " 'COMPLETED', now(), now(), '{\"a\": 1}')",
                uuid.UUID(task_id),
            )
            for event_id, status in ((3, "WAITING"), (5, "COMPLETED")):
                await pg.execute(
                    "INSERT INTO task_history (id, task_id, work_directory, status, at)"
                    " OVERRIDING SYSTEM VALUE VALUES ($1, $2, '/old', $3, now())",
                    event_id,
                    uuid.UUID(task_id),
                    status,
                )
        finally:
            await pg.close()
    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    try:
        old = await store.get(task_id)
        assert old is not None
        assert (old.status, old.prompt, old.result, old.depends_on) == (
            C,
            "old prompt",
            {"a": 1},
            (),
        )
        assert [(e.id, e.status) for e in await store.history(task_id)] == [(3, W), (5, C)]
        (new,) = await store.submit(
            [task_spec(work_directory="/new", prompt="p", depends_on=[task_id])], clock()
        )
        assert new.status is W
        assert new.seq > old.seq
        (blocked,) = await store.submit(
            [task_spec(work_directory="/new", prompt="p", depends_on=[new.id])], clock()
        )
        assert blocked.status is B
        assert next(e.id for e in await store.history(blocked.id)) > 5
        assert await store.schema_version() == SCHEMA_VERSION
        # the later tables exist too
        _, handle = await store.submit_with_handle(
            task_spec(work_directory="/new", prompt="p"), clock(), "h" * 32, "anonymous"
        )
        assert await store.handles.find_handle(handle.handle) == handle
    finally:
        await store.close()


async def test_a_subscriber_sees_the_dependent_unblock(
    service: TaskService, submit_task: Submit
) -> None:
    a = await submit_task(work_directory="/a")
    d = await submit_task(depends_on=[a.id])
    subscription = service.bus.subscribe(EventFilter(task_id=d.id), 10)
    try:
        await finish(service, a.id)
        async with asyncio.timeout(10):
            event = await subscription.next()
        assert (event.status, event.previous_status, event.details) == (
            W, B, {"reason": "unblocked"},
        )  # fmt: skip
    finally:
        subscription.close()


async def test_dependencies_completed_on_two_replicas_unblock_each_dependent_once(
    postgres_url: str,
) -> None:
    async with replica(postgres_url) as (_, _, one), replica(postgres_url) as (_, _, two):
        for _ in range(3):
            tag = uuid.uuid4().hex[:8]
            directories = [f"/r{i}-{tag}" for i in range(10)]
            deps = [
                (await one.submit(task_spec(work_directory=d, prompt="p"))).id for d in directories
            ]
            joint = [
                (
                    await two.submit(
                        task_spec(work_directory=f"/j-{tag}", prompt="j", depends_on=deps)
                    )
                ).id
                for _ in range(5)
            ]
            sides = [one if i % 2 else two for i in range(len(deps))]
            for side, directory in zip(sides, directories, strict=True):
                await side.claim(directory, "w")
            await asyncio.gather(
                *(side.complete(t, "w") for side, t in zip(sides, deps, strict=True))
            )
            for task_id in joint:
                assert (await one.get(task_id)).status is W
                assert [e.status for e in await one.history(task_id)] == [B, W]
