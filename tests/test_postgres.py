"""What only PostgreSQL does: several stores (replicas) on one database, LISTEN/NOTIFY events that
survive a lost connection, and migrations run by replicas starting together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from api.core.domain import EventFilter, TaskEvent, TaskStatus
from api.core.service import TaskService
from api.core.validation import task_spec
from api.events.bus import Subscription
from api.events.postgres import PostgresBus
from api.store.base import SCHEMA_VERSION
from api.store.postgres import CLAIM, PostgresStore
from tests.conftest import eventually


@contextlib.asynccontextmanager
async def replica(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresBus, TaskService]]:
    """What one `taskorch serve` holds: its own pool, listener and service."""
    store = PostgresStore(url)
    await store.open()
    bus = PostgresBus(url, store, reconnect_delay=0.5)
    await bus.start()
    try:
        yield store, bus, TaskService(store, bus)
    finally:
        await bus.stop()
        await store.close()


def now() -> datetime:
    return datetime.now(UTC)


async def receive(subscription: Subscription, count: int) -> list[TaskEvent]:
    return [await asyncio.wait_for(subscription.next(), 10) for _ in range(count)]


async def test_claimers_on_two_replicas_claim_each_task_exactly_once(postgres_url: str) -> None:
    async with replica(postgres_url) as (a, _, _), replica(postgres_url) as (b, _, _):
        specs = [task_spec(work_directory="/race", prompt=f"p{i}") for i in range(600)]
        await a.submit(specs[:300], now())
        await b.submit(specs[300:], now())
        claimed: list[str] = []

        async def claimer(store: PostgresStore, worker: str, limit: int) -> None:
            while True:
                tasks = await store.claim(
                    "/race", worker, limit, now() + timedelta(minutes=5), now()
                )
                if not tasks:
                    return
                assert all(t.worker_id == worker for t in tasks)
                claimed.extend(t.id for t in tasks)

        await asyncio.gather(
            *(claimer(a, f"a{i}", 1 + i % 3) for i in range(20)),
            *(claimer(b, f"b{i}", 1 + i % 3) for i in range(20)),
        )
        assert len(claimed) == 600
        assert len(set(claimed)) == 600
        counts = await a.count_by_status("/race")
        assert counts == {TaskStatus.WORKING: 600}
        working = EventFilter(statuses=(TaskStatus.WORKING,))

        async def all_stamped() -> bool:
            # events are readable once the stamper gave them their position, just after commit
            return len(await a.events_after(0, working, 10_000)) >= 600

        await eventually(all_stamped)
        claims = await a.events_after(0, working, 10_000)
        assert sorted(e.task_id for e in claims) == sorted(claimed)


async def test_events_committed_on_two_replicas_arrive_in_id_order(postgres_url: str) -> None:
    async with replica(postgres_url) as (a, bus_a, _), replica(postgres_url) as (b, _, _):
        subscription = bus_a.subscribe(EventFilter(), 1000)

        async def submitter(store: PostgresStore, name: str) -> None:
            for i in range(40):
                await store.submit([task_spec(work_directory="/order", prompt=f"{name}{i}")], now())

        await asyncio.gather(
            *(submitter(s, f"{k}{n}") for k, s in (("a", a), ("b", b)) for n in range(3))
        )
        events = await receive(subscription, 240)
        stored = await a.events_after(0, EventFilter(), 1000)
        assert [e.id for e in events] == [e.id for e in stored]
        subscription.close()


async def test_lost_listener_reconnects_and_fills_the_gap(postgres_url: str) -> None:
    async with replica(postgres_url) as (store, bus, _):
        subscription = bus.subscribe(EventFilter(), 1000)
        await store.submit([task_spec(work_directory="/gap", prompt="before")], now())
        (first,) = await receive(subscription, 1)
        old_pid = bus.listener_pid
        admin = await asyncpg.connect(postgres_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", old_pid)

            async def lost() -> bool:
                return not bus.connected

            await eventually(lost)
            # Announced to nobody: these exist only in the history table until the bus is back.
            for i in range(5):
                await store.submit([task_spec(work_directory="/gap", prompt=f"gap{i}")], now())
            await store.claim("/gap", "w", 2, now() + timedelta(minutes=1), now())
        finally:
            await admin.close()
        missed = await receive(subscription, 7)
        stored = await store.events_after(first.id, EventFilter(), 100)
        assert [e.id for e in missed] == [e.id for e in stored]
        assert [e.status for e in missed] == [TaskStatus.WAITING] * 5 + [TaskStatus.WORKING] * 2
        assert bus.connected
        assert bus.listener_pid != old_pid
        subscription.close()


async def test_waiting_claim_is_woken_by_a_submit_on_another_replica(postgres_url: str) -> None:
    async with replica(postgres_url) as (_, _, producer), replica(postgres_url) as (_, bus, worker):
        waiting = asyncio.ensure_future(worker.claim("/wake", "w1", wait_seconds=30))

        async def registered() -> bool:
            return "/wake" in bus._waiters

        await eventually(registered)
        task = await producer.submit(task_spec(work_directory="/wake", prompt="go"))
        # Far sooner than the 30 s the claim may wait: the submit on the other replica woke it.
        (claimed,) = await asyncio.wait_for(waiting, 10)
        assert claimed.id == task.id
        assert claimed.worker_id == "w1"


async def test_migrations_are_safe_when_replicas_start_together(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 4
        rows = await stores[0].pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    again = PostgresStore(postgres_url)
    await again.open()  # opening an up-to-date schema changes nothing
    assert await again.schema_version() == SCHEMA_VERSION
    await again.close()


async def test_lease_sweeps_on_every_replica_expire_each_lease_once(postgres_url: str) -> None:
    async with replica(postgres_url) as (a, _, _), replica(postgres_url) as (b, _, _):
        start = now()
        await a.submit(
            [task_spec(work_directory="/sweep", prompt=f"p{i}") for i in range(300)], start
        )
        await a.claim("/sweep", "dead", 300, start + timedelta(seconds=1), start)
        later = start + timedelta(seconds=5)
        results = await asyncio.gather(
            *(s.expire_leases(later, 50) for s in (a, b) for _ in range(8))
        )
        swept = [t.id for batch in results for t in batch]
        swept += [t.id for t in await a.expire_leases(later, 1000)]
        assert len(swept) == 300
        assert len(set(swept)) == 300

        async def all_announced() -> bool:
            # Events are read once the stamper gave them their positions, a moment after commit.
            waiting = EventFilter(statuses=(TaskStatus.WAITING,))
            expiries = await a.events_after(0, waiting, 10_000)
            return sum(e.details.get("reason") == "lease_expired" for e in expiries) == 300

        await eventually(all_announced)


async def test_the_url_search_path_puts_every_table_in_that_schema(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        schema = await store.pool.fetchval("SELECT current_schema()")
        assert schema.startswith("t_")  # the schema tests.pg made for this test, not public
        tables = await store.pool.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        assert {r["table_name"] for r in tables} == {
            "schema_migrations", "tasks", "task_history", "api_keys", "task_dependencies",
            "task_handles", "work_directories", "task_logs",
        }  # fmt: skip
    finally:
        await store.close()


async def test_claim_reads_the_claim_index_after_the_table_grew_from_empty(
    postgres_url: str,
) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    probe = "EXECUTE claim_probe('w', now(), now(), '/d0', 100)"
    try:
        async with store.pool.acquire() as conn:
            # A server-side prepared claim, run while the table is empty often enough for
            # PostgreSQL to consider caching a generic plan (a whole-table scan at that size).
            await conn.execute(f"PREPARE claim_probe AS {CLAIM}")
            for _ in range(8):
                await conn.execute(probe)
            for d in range(5):
                specs = [task_spec(work_directory=f"/d{d}", prompt="p") for _ in range(1000)]
                await store.submit(specs, now())
            rows = await conn.fetch(f"EXPLAIN {probe}")  # no ANALYZE has run since
            plan = "\n".join(row[0] for row in rows)
            await conn.execute("DEALLOCATE claim_probe")
        assert "Index Scan using tasks_claim" in plan, plan
        assert "Seq Scan" not in plan, plan
    finally:
        await store.close()


async def test_the_bus_stops_even_when_a_wake_up_races_the_stop(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        for _ in range(50):
            bus = PostgresBus(postgres_url, store)
            await bus.start()
            await asyncio.sleep(0)
            bus._wake.set()  # a notification arriving just as the server stops
            async with asyncio.timeout(5):
                await bus.stop()
    finally:
        await store.close()
