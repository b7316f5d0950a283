"""PostgreSQL event positions without a writers' lock: every replica delivers the same gap-free
id sequence while writers run concurrently, listeners are cut off and the stamper changes hands;
a rolled-back change is never announced; the migration keeps the ids already given."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from api.core.domain import Completion, EventFilter, TaskEvent, TaskStatus
from api.core.validation import task_spec
from api.events.bus import Subscription
from api.events.postgres import PostgresBus
from api.store.migrations import POSTGRES_MIGRATIONS
from api.store.postgres import PostgresStore
from tests.conftest import eventually

Replica = tuple[PostgresStore, PostgresBus]


def now() -> datetime:
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Replica]:
    store = PostgresStore(url, max_size=6)
    await store.open()
    bus = PostgresBus(url, store, reconnect_delay=0.05)
    await bus.start()
    try:
        yield store, bus
    finally:
        await bus.stop()
        await store.close()


async def receive(subscription: Subscription, count: int) -> list[TaskEvent]:
    return [await asyncio.wait_for(subscription.next(), 30) for _ in range(count)]


async def holds_lock(store: PostgresStore) -> bool:
    return store.stamper.holding


async def lifecycles(store: PostgresStore, directory: str, count: int) -> None:
    """Submit, claim and complete `count` tasks one by one: three events each."""
    for i in range(count):
        (task,) = await store.submit([task_spec(work_directory=directory, prompt=f"p{i}")], now())
        (claimed,) = await store.claim(directory, directory, 1, now() + timedelta(minutes=5), now())
        assert claimed.id == task.id
        assert await store.complete([Completion(task.id, {"i": i})], directory, now())


def assert_gapless_and_ordered_per_task(events: list[TaskEvent]) -> None:
    assert [e.id for e in events] == list(range(events[0].id, events[0].id + len(events)))
    statuses: dict[str, list[TaskStatus]] = {}
    for event in events:
        statuses.setdefault(event.task_id, []).append(event.status)
    lifecycle = [TaskStatus.WAITING, TaskStatus.WORKING, TaskStatus.COMPLETED]
    assert all(seen == lifecycle for seen in statuses.values())


async def test_replicas_deliver_one_gapless_sequence_through_lost_listeners_and_stamper(
    postgres_url: str,
) -> None:
    writers, per_writer = 24, 8
    total = writers * per_writer * 3
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(opened(postgres_url))
        await eventually(lambda: holds_lock(first[0]))
        replicas = [await stack.enter_async_context(opened(postgres_url)) for _ in range(3)]
        subscriptions = [bus.subscribe(EventFilter(), total + 10) for _, bus in replicas]
        admin = await asyncpg.connect(postgres_url)
        try:

            async def disrupt() -> None:
                for round in range(6):
                    await asyncio.sleep(0.15)
                    _, bus = random.choice(replicas)
                    if bus.listener_pid is not None:
                        await admin.fetchval("SELECT pg_terminate_backend($1)", bus.listener_pid)
                    if round == 2:  # the stamper's replica goes away mid-run
                        await stack_close(first)

            async def stack_close(replica: Replica) -> None:
                store, bus = replica
                await bus.stop()
                await store.close()

            await asyncio.gather(
                disrupt(),
                *(lifecycles(replicas[w % 3][0], f"/pos/{w}", per_writer) for w in range(writers)),
            )
            await eventually(lambda: any_holds(replicas))
            # The new stamper's connection is cut as well: the lock passes on once more.
            holder = next(store for store, _ in replicas if store.stamper.holding)
            await admin.fetchval("SELECT pg_terminate_backend($1)", holder.stamper.pid)
            await lifecycles(replicas[0][0], "/pos/after", 2)
            sequences = [await receive(s, total + 6) for s in subscriptions]
        finally:
            await admin.close()
        ids = [[e.id for e in events] for events in sequences]
        assert ids[0] == ids[1] == ids[2]
        assert ids[0] == list(range(1, total + 7))
        for events in sequences:
            assert_gapless_and_ordered_per_task(events)
        stored = await replicas[1][0].events_after(0, EventFilter(), total + 100)
        assert [e.id for e in stored] == ids[0]


async def any_holds(replicas: list[Replica]) -> bool:
    return any(store.stamper.holding for store, _ in replicas)


async def test_rolled_back_change_is_never_announced_and_holds_back_nothing_after_it(
    postgres_url: str,
) -> None:
    async with opened(postgres_url) as (store, bus):
        subscription = bus.subscribe(EventFilter(), 100)
        await store.submit([task_spec(work_directory="/rb", prompt="before")], now())
        (before,) = await receive(subscription, 1)
        conn = await asyncpg.connect(postgres_url)
        try:
            tx = conn.transaction()
            await tx.start()
            # A change in flight: its row exists for nobody else, and it has the older xid.
            await conn.execute(
                "INSERT INTO task_history (task_id, work_directory, status, at)"
                " VALUES (gen_random_uuid(), '/rb', 'WAITING', now())"
            )
            later = [task_spec(work_directory="/rb", prompt=f"later{i}") for i in range(3)]
            for spec in later:
                await store.submit([spec], now())
            await asyncio.sleep(0.3)
            # Positions follow xids: nothing committed after the open change may overtake it.
            assert await store.events_after(before.id, EventFilter(), 10) == []
            await tx.rollback()
        finally:
            await conn.close()
        events = await receive(subscription, 3)
        assert [e.id for e in events] == [before.id + 1, before.id + 2, before.id + 3]
        assert [e.status for e in events] == [TaskStatus.WAITING] * 3
        resumed = await store.events_after(before.id + 1, EventFilter(), 10)
        assert [e.id for e in resumed] == [before.id + 2, before.id + 3]
        assert await store.last_event_id() == before.id + 3


async def test_migration_keeps_history_rows_and_their_ids(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL)"
        )
        for version, script in enumerate(POSTGRES_MIGRATIONS[:2], start=1):
            for statement in script:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
        # The rows as the previous schema wrote them: ids from the identity column, some gone.
        for status in ("WAITING", "WORKING", "COMPLETED", "WAITING"):
            await conn.execute(
                "INSERT INTO task_history (task_id, work_directory, status, at)"
                " VALUES ('00000000-0000-0000-0000-000000000001', '/old', $1, now())",
                status,
            )
        await conn.execute("DELETE FROM task_history WHERE id = 2")
    finally:
        await conn.close()
    async with opened(postgres_url) as (store, bus):
        old = await store.events_after(0, EventFilter(), 10)
        assert [(e.id, e.status) for e in old] == [
            (1, TaskStatus.WAITING),
            (3, TaskStatus.COMPLETED),
            (4, TaskStatus.WAITING),
        ]
        history = await store.history("00000000-0000-0000-0000-000000000001")
        assert [e.id for e in history] == [1, 3, 4]
        subscription = bus.subscribe(EventFilter(), 10)
        (task,) = await store.submit([task_spec(work_directory="/new", prompt="p")], now())
        (event,) = await receive(subscription, 1)
        assert (event.id, event.task_id) == (5, task.id)
        assert [e.id for e in await store.history(task.id)] == [5]
