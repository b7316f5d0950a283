"""What only PostgreSQL does: several stores (replicas) on one database, LISTEN/NOTIFY events that
survive a lost connection, and migrations run by replicas starting together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from api.core import lifecycle
from api.core.domain import Backoff, Completion, EventFilter, TaskEvent, TaskStatus
from api.core.service import TaskService
from api.core.validation import task_spec
from api.events.bus import Subscription
from api.events.postgres import PostgresBus
from api.store.base import SCHEMA_VERSION
from api.store.common import SqlTaskStore
from api.store.pg_schema import WAKE_STAMPER
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


BACKOFF = Backoff()


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


async def test_one_statement_changes_record_what_the_general_programs_record(
    postgres_url: str,
) -> None:
    """Submit, claim, complete and fail run as one statement each on PostgreSQL; the history rows
    they write are the ones the general programs (run in a transaction) write."""
    store = PostgresStore(postgres_url, min_size=1, max_size=1)
    await store.open()
    sent: list[str] = []
    async with store.pool.acquire() as conn:  # the pool's one connection, for its whole life
        conn.add_query_logger(lambda record: sent.append(record.query))
    try:

        async def story(directory: str, run: Any) -> list[tuple[Any, ...]]:
            later = now() + timedelta(seconds=-1)
            (done,) = await run.submit(
                store, [task_spec(work_directory=directory, prompt="a", run_after=later)], now()
            )
            await run.submit(store, [task_spec(work_directory=directory, prompt="b")], now())
            lease = now() + timedelta(seconds=60)
            (first,) = await run.claim(store, directory, "w", 1, lease, now())
            assert first.id == done.id
            (second,) = await run.claim(store, directory, "w", 1, lease, now())
            await run.complete(store, [Completion(first.id, {"ok": True})], "w", now())
            failed = await run.change(
                store,
                second.id,
                lambda t: lifecycle.fail(t, "w", "boom", False, BACKOFF, 1.0, now()),
            )
            assert failed is not None
            assert failed.status is TaskStatus.FAILED
            sent.append("-- end of the story")
            rows = await store.pool.fetch(
                "SELECT status, previous_status, worker_id, details, xid IS NOT NULL AS has_xid"
                " FROM task_history WHERE work_directory = $1 ORDER BY entry",
                directory,
            )
            # Instants differ between the runs: compare which details were given, with values
            # that do not depend on the clock.
            return [
                (r["status"], r["previous_status"], r["worker_id"], r["has_xid"],
                 {k: (v if k in ("error", "reason") else type(v).__name__)
                  for k, v in r["details"].items()})
                for r in rows
            ]  # fmt: skip

        sent.clear()
        fast = await story("/fast", PostgresStore)
        # Wake-ups of the stamper aside, each change is one statement; the failure reads first.
        story_sent = sent[: sent.index("-- end of the story")]
        statements = [s.split(" ", 3)[:3] for s in story_sent if s != WAKE_STAMPER]
        assert statements == [
            ["WITH", "changed", "AS"], ["WITH", "changed", "AS"], ["WITH", "changed", "AS"],
            ["WITH", "changed", "AS"], ["WITH", "changed", "AS"], ["SELECT", "seq,", "id,"],
            ["WITH", "changed", "AS"],
        ]  # fmt: skip
        general = await story("/general", SqlTaskStore)
        assert fast == general
        assert [row[:2] for row in fast] == [
            ("WAITING", None), ("WAITING", None), ("WORKING", "WAITING"), ("WORKING", "WAITING"),
            ("COMPLETED", "WORKING"), ("FAILED", "WORKING"),
        ]  # fmt: skip
    finally:
        await store.close()


async def test_a_completion_that_settles_dependents_takes_the_general_path(
    postgres_url: str,
) -> None:
    async with replica(postgres_url) as (_, _, service):
        parent = await service.submit(task_spec(work_directory="/dep", prompt="parent"))
        child = await service.submit(
            task_spec(work_directory="/dep", prompt="child", depends_on=[parent.id])
        )
        assert child.status is TaskStatus.BLOCKED
        (claimed,) = await service.claim("/dep", "w")
        await service.complete(claimed.id, "w", {"ok": True})
        assert (await service.get(child.id)).status is TaskStatus.WAITING
        history = await service.history(child.id)
        assert [e.status for e in history] == [TaskStatus.BLOCKED, TaskStatus.WAITING]
