"""Every transition of the state machine, against every store, through the service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.core import lifecycle
from api.core.domain import MAX_PROMPT, Backoff, Completion, TaskFilter, TaskPriority, TaskStatus
from api.core.errors import Conflict, NotFound, ValidationError
from api.core.lifecycle import HistoryReason, Outcome
from api.core.service import TaskService
from api.core.validation import task_changes, task_spec
from api.settings import Settings
from api.store import changes, open_store
from api.store.base import Decide, TaskStore
from tests.conftest import FakeClock

Submit = Callable[..., Awaitable[Any]]


async def claim_one(
    service: TaskService, work_directory: str = "/repo", worker: str = "w1", **kw: Any
) -> Any:
    tasks = await service.claim(work_directory, worker, **kw)
    return tasks[0] if tasks else None


async def test_submit_creates_waiting_task_with_defaults_and_history(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task(prompt="write tests", tags=["ci", "py:3.11"], metadata={"ticket": 7})
    assert task.status is TaskStatus.WAITING
    assert task.priority is TaskPriority.MEDIUM
    assert task.max_retries == 3
    assert task.retry_count == 0
    assert task.version == 1
    assert task.tags == ("ci", "py:3.11")
    assert task.metadata == {"ticket": 7}
    assert task.created_at.tzinfo is not None
    assert task.updated_at == task.created_at
    (event,) = await service.history(task.id)
    assert event.previous_status is None
    assert event.status is TaskStatus.WAITING
    assert (await service.get(task.id)) == task


async def test_claim_sets_worker_lease_and_start(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task()
    claimed = await claim_one(service, lease_seconds=60)
    assert claimed.id == task.id
    assert claimed.status is TaskStatus.WORKING
    assert claimed.worker_id == "w1"
    assert claimed.started_at == clock.now
    assert (claimed.lease_expires_at - clock.now).total_seconds() == 60
    assert claimed.version == task.version + 1
    assert await claim_one(service) is None  # nothing left


async def test_claim_default_lease_is_300_seconds(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    await submit_task()
    claimed = await claim_one(service)
    assert (claimed.lease_expires_at - clock.now).total_seconds() == 300


async def test_claim_order_is_priority_then_first_in_first_out(
    service: TaskService, submit_task: Submit
) -> None:
    low = await submit_task(priority="LOW")
    medium1 = await submit_task()
    high = await submit_task(priority="HIGH")
    medium2 = await submit_task()
    order = [(await claim_one(service)).id for _ in range(4)]
    assert order == [high.id, medium1.id, medium2.id, low.id]


async def test_claim_only_sees_its_work_directory(
    service: TaskService, submit_task: Submit
) -> None:
    other = await submit_task(work_directory="/other")
    assert await claim_one(service, "/repo") is None
    assert (await claim_one(service, "/other")).id == other.id


async def test_work_directory_is_normalised(service: TaskService, submit_task: Submit) -> None:
    task = await submit_task(work_directory="/repo//sub/./dir/")
    assert task.work_directory == "/repo/sub/dir"
    assert (await claim_one(service, "/repo/sub/dir/")).id == task.id


async def test_claim_respects_run_after(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    from datetime import timedelta

    await submit_task(run_after=clock.now + timedelta(seconds=30))
    assert await claim_one(service) is None
    clock.advance(31)
    assert await claim_one(service) is not None


async def test_complete_by_holder_records_result(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task()
    await claim_one(service)
    clock.advance(5)
    done = await service.complete(task.id, "w1", {"answer": 42})
    assert done.status is TaskStatus.COMPLETED
    assert done.result == {"answer": 42}
    assert done.completed_at == clock.now
    assert done.lease_expires_at is None
    statuses = [(e.previous_status, e.status) for e in await service.history(task.id)]
    assert statuses == [
        (None, TaskStatus.WAITING),
        (TaskStatus.WAITING, TaskStatus.WORKING),
        (TaskStatus.WORKING, TaskStatus.COMPLETED),
    ]


async def test_only_the_holder_may_heartbeat_complete_or_fail(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task()
    await claim_one(service, worker="owner")
    with pytest.raises(Conflict, match="held by another worker"):
        await service.complete(task.id, "intruder", None)
    with pytest.raises(Conflict):
        await service.fail(task.id, "intruder", "boom")
    with pytest.raises(Conflict):
        await service.heartbeat(task.id, "intruder", None)
    assert (await service.get(task.id)).worker_id == "owner"


async def test_completed_is_final(service: TaskService, submit_task: Submit) -> None:
    task = await submit_task()
    await claim_one(service)
    await service.complete(task.id, "w1")
    for attempt in (
        service.complete(task.id, "w1"),
        service.cancel(task.id),
        service.retry(task.id),
        service.fail(task.id, "w1", "late"),
    ):
        with pytest.raises(Conflict):
            await attempt


async def test_heartbeat_extends_lease(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task()
    claimed = await claim_one(service, lease_seconds=10)
    clock.advance(8)
    beat = await service.heartbeat(task.id, "w1", 10)
    assert beat.lease_expires_at > claimed.lease_expires_at
    assert beat.version == claimed.version + 1
    clock.advance(8)
    assert await service.expire_leases() == []  # still alive thanks to the heartbeat


async def test_fail_requeues_with_backoff_until_max_retries(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task(max_retries=2)
    delays = []
    for attempt in (1, 2):
        await claim_one(service)
        failed = await service.fail(task.id, "w1", f"boom {attempt}")
        assert failed.status is TaskStatus.WAITING
        assert failed.retry_count == attempt
        assert failed.worker_id is None
        assert failed.error_message == f"boom {attempt}"
        delays.append((failed.run_after - clock.now).total_seconds())
        assert await claim_one(service) is None  # not before its backoff
        clock.advance(delays[-1])
    assert delays == [1.0, 2.0]  # jitter fixed at 1.0: base * 2**(n-1)
    await claim_one(service)
    final = await service.fail(task.id, "w1", "boom 3")
    assert final.status is TaskStatus.FAILED
    assert final.retry_count == 2
    assert final.completed_at == clock.now


async def test_backoff_is_capped(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task(max_retries=100)
    for _ in range(12):
        await claim_one(service)
        failed = await service.fail(task.id, "w1", "boom")
        clock.advance((failed.run_after - clock.now).total_seconds())
    assert (failed.run_after - failed.updated_at).total_seconds() == 300


async def test_fail_without_retry_is_final(service: TaskService, submit_task: Submit) -> None:
    task = await submit_task()
    await claim_one(service)
    failed = await service.fail(task.id, "w1", "bad prompt", retry=False)
    assert failed.status is TaskStatus.FAILED
    assert failed.retry_count == 0


async def test_lease_expiry_requeues_and_counts_an_attempt(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    task = await submit_task(max_retries=1)
    await claim_one(service, lease_seconds=30)
    clock.advance(31)
    (expired,) = await service.expire_leases()
    assert expired.status is TaskStatus.WAITING
    assert expired.retry_count == 1
    assert expired.worker_id is None
    assert "lease expired" in expired.error_message
    event = (await service.history(task.id))[-1]
    assert event.details["reason"] == "lease_expired"
    assert event.worker_id == "w1"
    with pytest.raises(Conflict):
        await service.complete(task.id, "w1")  # the dead worker lost it
    await claim_one(service, worker="w2", lease_seconds=30)
    clock.advance(31)
    (final,) = await service.expire_leases()
    assert final.status is TaskStatus.FAILED


async def test_lease_sweep_is_idempotent(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    await submit_task()
    await claim_one(service, lease_seconds=1)
    clock.advance(2)
    assert len(await service.expire_leases()) == 1
    assert await service.expire_leases() == []


async def test_cancel_waiting_and_working(service: TaskService, submit_task: Submit) -> None:
    waiting = await submit_task()
    working = await submit_task()
    await claim_one(service)  # takes `waiting` (older)
    cancelled = await service.cancel(working.id, "not needed")
    assert cancelled.status is TaskStatus.CANCELLED
    event = (await service.history(working.id))[-1]
    assert event.previous_status is TaskStatus.WAITING
    assert event.details == {"reason": "not needed"}
    cancelled = await service.cancel(waiting.id)
    assert (await service.history(waiting.id))[-1].previous_status is TaskStatus.WORKING
    with pytest.raises(Conflict):
        await service.complete(waiting.id, "w1")


async def test_retry_requeues_failed_and_cancelled(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task(max_retries=0)
    await claim_one(service)
    await service.fail(task.id, "w1", "boom")
    again = await service.retry(task.id)
    assert again.status is TaskStatus.WAITING
    assert again.retry_count == 0
    await service.cancel(task.id)
    assert (await service.retry(task.id)).status is TaskStatus.WAITING
    with pytest.raises(Conflict, match="only FAILED or CANCELLED"):
        await service.retry(task.id)


async def test_release_gives_the_task_back_without_an_attempt(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task()
    await claim_one(service)
    released = await service.release(task.id, "w1")
    assert released.status is TaskStatus.WAITING
    assert released.retry_count == 0
    assert (await claim_one(service, worker="w2")).id == task.id


async def test_update_needs_waiting_and_matching_version(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task()
    updated = await service.update(
        task.id, task.version, task_changes(prompt="new", priority="HIGH")
    )
    assert updated.prompt == "new"
    assert updated.priority is TaskPriority.HIGH
    assert updated.version == task.version + 1
    assert updated.tags == task.tags
    with pytest.raises(Conflict, match="version"):
        await service.update(task.id, task.version, task_changes(prompt="stale"))
    await claim_one(service)
    with pytest.raises(Conflict, match="only WAITING"):
        await service.update(task.id, updated.version + 1, task_changes(prompt="late"))
    assert (await service.get(task.id)).prompt == "new"


async def test_idempotency_key_returns_the_existing_task(
    service: TaskService, submit_task: Submit
) -> None:
    first = await submit_task(idempotency_key="job-1")
    second = await submit_task(idempotency_key="job-1", prompt="different")
    assert second.id == first.id
    assert second.prompt == first.prompt
    page = await service.list_tasks(TaskFilter())
    assert page.total == 1
    assert len(await service.history(first.id)) == 1


async def test_submit_many_is_all_or_nothing(service: TaskService) -> None:
    specs = [task_spec(work_directory="/repo", prompt=f"p{i}") for i in range(5)]
    tasks = await service.submit_many(specs)
    assert [t.prompt for t in tasks] == [f"p{i}" for i in range(5)]
    with pytest.raises(ValidationError):
        await service.submit_many([])


async def test_submit_many_stores_every_field_in_submission_order_across_statements(
    service: TaskService, clock: FakeClock
) -> None:
    """A batch is inserted a chunk per statement (by count, and by prompt length): every task
    keeps its fields, seq follows the order of the batch, and each gets its history row."""
    later = clock.now + timedelta(hours=1)
    long = range(3, 3 + changes.SUBMIT_CHUNK_CHARS // MAX_PROMPT + 1)  # a chunk ends early
    specs = [
        task_spec(
            work_directory="/repo",
            prompt=f"{i}".ljust(MAX_PROMPT, "x") if i in long else f"p{i}",
            priority=("HIGH", "LOW", "MEDIUM")[i % 3],
            tags=[f"t{i}", "batch"],
            metadata={"n": i, "nested": {"z": [1, "é"], "a": None}},
            max_retries=i % 7,
            run_after=later if i % 2 else None,
            require_review=i % 5 == 0,
        )
        for i in range(changes.SUBMIT_CHUNK * 2 + 7)
    ]
    tasks = await service.submit_many(specs)
    assert [t.seq for t in tasks] == sorted(t.seq for t in tasks)
    for i, (spec, task) in enumerate(zip(specs, tasks, strict=True)):
        stored = await service.get(task.id)
        assert stored == task
        assert (task.prompt, task.priority, task.tags) == (spec.prompt, spec.priority, spec.tags)
        assert (task.metadata, task.max_retries) == (spec.metadata, spec.max_retries)
        assert (task.run_after, task.require_review) == (spec.run_after, spec.require_review)
        assert task.created_at == task.updated_at == clock.now
        assert task.status is TaskStatus.WAITING
        assert task.version == 1
        (event,) = await service.history(task.id)
        assert event.status is TaskStatus.WAITING
        assert event.details == ({"runAfter": later.isoformat()} if i % 2 else {})


async def test_submit_many_with_a_key_twice_stores_the_first_and_answers_it_twice(
    service: TaskService,
) -> None:
    existing = await service.submit(
        task_spec(work_directory="/repo", prompt="old", idempotency_key="k0")
    )
    specs = [
        task_spec(work_directory="/repo", prompt="first", idempotency_key="k1"),
        task_spec(work_directory="/repo", prompt="again", idempotency_key="k0"),
        task_spec(work_directory="/repo", prompt="plain"),
        task_spec(work_directory="/repo", prompt="second", idempotency_key="k1"),
    ]
    first, again, plain, second = await service.submit_many(specs)
    assert again == existing
    assert second == first
    assert first.prompt == "first"
    assert first.seq < plain.seq
    page = await service.list_tasks(TaskFilter())
    assert page.total == 3
    assert [len(await service.history(t.id)) for t in (existing, first, plain)] == [1, 1, 1]


async def test_complete_many_across_statements_answers_in_item_order_or_changes_nothing(
    service: TaskService, store: TaskStore, clock: FakeClock
) -> None:
    count = changes.COMPLETE_CHUNK + 3
    specs = [task_spec(work_directory="/repo", prompt=f"p{i}") for i in range(count)]
    submitted = await service.submit_many(specs)
    await service.claim("/repo", "w", limit=count)
    results: list[Any] = [{"n": i, "text": "é"} for i in range(count)]
    results[1], results[2] = None, [1, 2.5, "three"]
    items = [Completion(t.id, r) for t, r in reversed(list(zip(submitted, results, strict=True)))]
    (other,) = await service.submit_many([task_spec(work_directory="/other", prompt="theirs")])
    await service.claim("/other", "someone-else")
    # One item the worker does not hold, in the last chunk: nothing is completed.
    with pytest.raises(Conflict):
        await service.complete_many("w", [*items, Completion(other.id, None)])
    assert {(await service.get(t.id)).status for t in submitted} == {TaskStatus.WORKING}
    events_before = await store.last_event_id()

    done = await service.complete_many("w", items)
    assert [t.id for t in done] == [item.task_id for item in items]
    for item, task in zip(items, done, strict=True):
        assert task.result == item.result
        assert task.status is TaskStatus.COMPLETED
        assert task.completed_at == clock.now
        assert await service.get(task.id) == task
    history = [e for t in done for e in await service.history(t.id)]
    completions = sorted((e for e in history if e.id > events_before), key=lambda e: e.id)
    assert [e.task_id for e in completions] == [item.task_id for item in items]


async def test_unknown_task_is_not_found(service: TaskService) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(NotFound):
        await service.get(missing)
    with pytest.raises(NotFound):
        await service.complete(missing, "w1")
    with pytest.raises(ValidationError) as caught:
        await service.get("not-a-uuid")
    assert caught.value.field == "id"


async def test_list_filters_and_paginates(service: TaskService, submit_task: Submit) -> None:
    for i in range(7):
        await submit_task(tags=["odd"] if i % 2 else ["even"], priority="HIGH" if i < 2 else "LOW")
    await submit_task(work_directory="/elsewhere")
    seen = []
    after = None
    while True:
        page = await service.list_tasks(TaskFilter(work_directory="/repo"), first=3, after=after)
        assert page.total == 7
        seen.extend(page.tasks)
        if not page.has_next:
            break
        from api.core.service import encode_cursor

        after = encode_cursor(page.tasks[-1].seq)
    assert len({t.id for t in seen}) == 7
    assert (await service.list_tasks(TaskFilter(tag="odd"))).total == 3
    assert (await service.list_tasks(TaskFilter(priority=TaskPriority.HIGH))).total == 2
    assert (await service.list_tasks(TaskFilter(statuses=(TaskStatus.WORKING,)))).total == 0


async def test_statistics_count_by_status(service: TaskService, submit_task: Submit) -> None:
    for _ in range(3):
        await submit_task()
    await submit_task(work_directory="/b")
    await claim_one(service)
    stats = await service.statistics()
    assert (stats.total, stats[TaskStatus.WAITING], stats[TaskStatus.WORKING]) == (4, 3, 1)
    assert (await service.statistics("/b")).total == 1


async def test_event_ids_increase_in_commit_order(
    service: TaskService, submit_task: Submit
) -> None:
    task = await submit_task()
    await claim_one(service)
    await service.complete(task.id, "w1")
    ids = [e.id for e in await service.history(task.id)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


async def test_prune_deletes_only_old_finished_tasks(
    service: TaskService, submit_task: Submit, clock: FakeClock
) -> None:
    from datetime import timedelta

    old = await submit_task()
    keep = await submit_task()
    await claim_one(service)
    await service.complete(old.id, "w1")
    clock.advance(40 * 86400)
    assert await service.prune(timedelta(days=30)) == 1
    assert await service.find(old.id) is None
    assert await service.history(old.id) == []
    assert (await service.get(keep.id)).status is TaskStatus.WAITING


async def test_api_keys_are_stored_by_hash_and_revocable(store: Any, clock: FakeClock) -> None:
    key = await store.keys.create_key("ci", "hash-1", ["read", "work"], clock.now)
    assert key.name == "ci"
    assert key.scopes == ("read", "work")
    assert key.revoked_at is None
    assert await store.keys.create_key("ci", "hash-2", ["read"], clock.now) is None  # name taken
    assert await store.keys.count_active_keys() == 1
    await store.keys.touch_key("hash-1", clock.now)
    assert (await store.keys.find_key("hash-1")).last_used_at == clock.now
    assert (await store.keys.revoke_key("ci", clock.now)).revoked_at == clock.now
    assert await store.keys.revoke_key("ci", clock.now) is None
    assert await store.keys.count_active_keys() == 0
    assert (await store.keys.create_key("ci", "hash-3", ["admin"], clock.now)) is not None
    assert [k.name for k in await store.keys.list_keys()] == ["ci", "ci"]


# --- the stores give the domain's answer: every change, from every reachable state ---

PROPERTY = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip
BACKOFF = Backoff(base_seconds=0.5, cap_seconds=7.0)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("heartbeat"), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("complete"), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("fail"), st.sampled_from(["w1", "w2"]), st.booleans(), st.floats(0, 1)),
        st.tuples(st.just("release"), st.sampled_from(["w1", "w2"])),
        st.tuples(st.just("cancel"), st.sampled_from([None, "not needed"])),
        st.tuples(st.just("retry")),
        st.tuples(st.just("expire")),
    ),
    min_size=1,
    max_size=10,
)


def _decider(kind: str, args: list[Any], now: datetime) -> Decide:
    if kind == "fail":
        return lambda t: lifecycle.fail(t, args[0], "boom", args[1], BACKOFF, args[2], now)
    if kind == "release":
        return lambda t: lifecycle.release(t, args[0], now)
    if kind == "cancel":
        return lambda t: lifecycle.cancel(t, args[0], now)
    return lambda t: lifecycle.retry(t, now)


async def _agree(store: TaskStore, max_retries: int, plan: list[Any], pauses: list[int]) -> None:
    """Run `plan` on the store and on the domain alone, from the same submitted task."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    spec = task_spec(work_directory=f"/p/{uuid.uuid4().hex}", prompt="p", max_retries=max_retries)
    (model,) = await store.submit([spec], now)
    for step, pause in zip(plan, pauses, strict=False):
        now += timedelta(seconds=pause)
        kind, *args = step
        lease = now + timedelta(seconds=60)
        outcome: Outcome | None = None
        if kind == "claim":
            expected = lifecycle.claim(model, args[0], lease, now)
            got = await store.claim(model.work_directory, args[0], 1, lease, now)
            stored = got[0] if got else None
        elif kind == "heartbeat":
            expected = lifecycle.heartbeat(model, args[0], lease, now)
            stored = await store.heartbeat(model.id, args[0], lease, now)
        elif kind == "complete":
            expected = lifecycle.complete(model, args[0], {"ok": 1}, now)
            done = await store.complete([Completion(model.id, {"ok": 1})], args[0], now)
            stored = done[0] if done else None
        elif kind == "expire":
            outcome = lifecycle.expire_lease(model, now)
            expected = None if outcome is None else outcome.task
            swept = [t for t in await store.expire_leases(now, 1000) if t.id == model.id]
            stored = swept[0] if swept else None
        else:
            decide = _decider(kind, args, now)
            outcome = decide(model)
            expected = None if outcome is None else outcome.task
            stored = await store.change(model.id, decide)
        assert stored == expected, (kind, args)
        assert await store.get(model.id) == (expected or model)
        if outcome is not None:
            last = (await store.history(model.id))[-1]
            assert last.details == lifecycle.history_details(outcome.details)
            assert (last.previous_status, last.worker_id) == (outcome.previous, outcome.worker_id)
            reason = last.details.get("reason")
            assert kind == "cancel" or reason is None or reason in set(HistoryReason)
        model = expected or model


def test_every_change_on_the_store_gives_the_domains_answer(database_url: str) -> None:
    with asyncio.Runner() as runner:
        store = open_store(Settings(database_url=database_url, durability="normal"))
        runner.run(store.open())
        try:

            @PROPERTY
            @given(
                st.integers(0, 3),
                steps,
                st.lists(st.sampled_from([0, 1, 30, 61, 400]), min_size=10, max_size=10),
            )
            def agrees(max_retries: int, plan: list[Any], pauses: list[int]) -> None:
                runner.run(_agree(store, max_retries, plan, pauses))

            agrees()
        finally:
            runner.run(store.close())


async def test_a_task_page_is_counted_unless_the_caller_leaves_the_total_out(
    service: TaskService, submit_task: Submit
) -> None:
    for _ in range(3):
        await submit_task()
    counted = await service.list_tasks(TaskFilter(), first=2)
    uncounted = await service.list_tasks(TaskFilter(), first=2, count=False)
    assert (counted.total, uncounted.total) == (3, None)
    assert [t.id for t in uncounted.tasks] == [t.id for t in counted.tasks]
    assert (uncounted.has_next, counted.has_next) == (True, True)
