"""The SQLite writer's group commit: changes queued together commit in one transaction, the history
they owe is written in one statement at the end, numbered in the order of the changes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.core.domain import Completion, TaskEvent, TaskSpec, TaskStatus
from api.store.base import RefusedDependency
from api.store.sqlite import SqliteStore

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path / 'writer.db'}", durability="full")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class Held:
    """Keeps the writer thread busy, so every change queued meanwhile lands in the next commit."""

    def __init__(self, store: SqliteStore) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.job: asyncio.Future[None] | None = None
        self._store = store

    def _hold(self, conn: sqlite3.Connection) -> tuple[None, list[Any]]:
        self.started.set()
        self.release.wait(10)
        return None, []

    async def __aenter__(self) -> Held:
        self.job = asyncio.ensure_future(self._store._writer.run(self._hold))
        await asyncio.to_thread(self.started.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.job is not None
        await self.job


def spec(prompt: str, **fields: Any) -> TaskSpec:
    return TaskSpec(work_directory="/repo", prompt=prompt, **fields)


def committed(store: SqliteStore) -> list[TaskEvent]:
    events: list[TaskEvent] = []

    def listener(batch: Sequence[TaskEvent]) -> None:
        events.extend(batch)

    store.listen(listener)
    return events


async def queued(*changes: Any) -> list[Any]:
    """Start each change in order (each reaches the writer's queue before the next starts)."""
    started = []
    for change in changes:
        started.append(asyncio.ensure_future(change))
        await asyncio.sleep(0)
    return started


async def test_changes_committed_together_number_their_history_in_change_order(
    store: SqliteStore,
) -> None:
    events = committed(store)
    async with Held(store):
        pending = await queued(
            store.submit([spec("one"), spec("two")], NOW),
            store.submit([spec("three")], NOW),
            store.submit([spec(f"batch {n}") for n in range(50)], NOW),
        )
    submitted = [task for batch in await asyncio.gather(*pending) for task in batch]
    assert [e.task_id for e in events] == [t.id for t in submitted]
    first = events[0].id
    assert [e.id for e in events] == list(range(first, first + len(submitted)))
    # What listeners were told is what the table holds.
    for task, event in zip(submitted, events, strict=True):
        assert await store.history(task.id) == [event]
        assert event.status is TaskStatus.WAITING
        assert event.previous_status is None
        assert event.at == task.updated_at


async def test_a_failed_change_leaves_no_history_and_its_neighbours_keep_theirs(
    store: SqliteStore,
) -> None:
    events = committed(store)
    (held,) = await store.submit([spec("held")], NOW)
    await store.claim("/repo", "w1", 1, NOW + timedelta(minutes=5), NOW)
    events.clear()
    async with Held(store):
        pending = await queued(
            store.submit([spec("before")], NOW),
            store.submit([spec("refused", depends_on=(held.id, "missing"))], NOW),
            store.complete([Completion(held.id, {"ok": True})], "not-the-holder", NOW),
            store.complete([Completion(held.id, {"ok": True})], "w1", NOW),
        )
    before, refused, refused_completion, completion = await asyncio.gather(
        *pending, return_exceptions=True
    )
    assert isinstance(refused, RefusedDependency)
    assert refused_completion is None
    assert isinstance(before, list)
    assert isinstance(completion, list)
    assert [(e.task_id, e.status) for e in events] == [
        (before[0].id, TaskStatus.WAITING),
        (held.id, TaskStatus.COMPLETED),
    ]
    assert events[1].id == events[0].id + 1
    assert [e.status for e in await store.history(held.id)] == [
        TaskStatus.WAITING,
        TaskStatus.WORKING,
        TaskStatus.COMPLETED,
    ]


async def test_prune_in_the_same_commit_deletes_the_history_owed_before_it(
    store: SqliteStore,
) -> None:
    """The completion's history row is owed until the commit ends; prune, queued right behind it,
    must find it written, or the row would outlive its task."""
    long_ago = NOW - timedelta(days=30)
    (task,) = await store.submit([spec("old")], long_ago)
    await store.claim("/repo", "w1", 1, long_ago + timedelta(minutes=5), long_ago)
    async with Held(store):
        pending = await queued(
            store.complete([Completion(task.id, None)], "w1", long_ago),
            store.prune(NOW - timedelta(days=1), 100),
        )
    completed, pruned = await asyncio.gather(*pending)
    assert completed is not None
    assert pruned == 1
    assert await store.get(task.id) is None
    assert await store.history(task.id) == []


async def test_a_commit_waits_its_turn_behind_another_process_writer(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Processes sharing the file take turns at the lock file beside it, so one process's writer
    is handed the file as soon as the other's commit ends instead of polling SQLite's lock."""
    turn = os.open(f"{store.path}-turn", os.O_RDWR)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)  # as another process's writer holds it for a commit
        submit = asyncio.ensure_future(store.submit([spec("waits")], datetime.now(UTC)))
        await asyncio.sleep(0.3)
        assert not submit.done()
        fcntl.flock(turn, fcntl.LOCK_UN)
        async with asyncio.timeout(5):
            (task,) = await submit
        assert task.status is TaskStatus.WAITING
        # The writer holds the turn only while it commits: it is given back before callers hear.
        fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(turn, fcntl.LOCK_UN)
    finally:
        os.close(turn)


async def test_a_turn_file_that_cannot_be_opened_fails_the_open(tmp_path: Path) -> None:
    path = tmp_path / "writer.db"
    os.mkdir(f"{path}-turn")  # a directory where the turn file belongs
    store = SqliteStore(f"sqlite:///{path}")
    with pytest.raises(IsADirectoryError):
        await store.open()
