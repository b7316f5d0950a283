"""Store, bus, service and background jobs: opened in order, closed in reverse, by every process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime

from api.core.domain import Backoff
from api.core.service import TaskService, utc_now
from api.events.bus import EventBus, LocalBus
from api.ops.retention import prune_periodically
from api.settings import Settings
from api.store import open_store
from api.store.base import TaskStore

log = logging.getLogger("taskorch.runtime")


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a process serves from: the server's lifespan, stdio MCP and the one-off commands."""

    settings: Settings
    store: TaskStore
    bus: EventBus
    service: TaskService


@contextlib.asynccontextmanager
async def runtime(
    settings: Settings,
    *,
    serving: bool = True,
    clock: Callable[[], datetime] = utc_now,
    jitter: Callable[[], float] = random.random,
) -> AsyncIterator[Runtime]:
    """Open the store (bringing its schema up to date), start the bus and build the service; when
    `serving` (the server, stdio MCP), also hear other processes' commits and run the lease sweep
    and retention.

    One-off commands (prune, demo) pass `serving=False`: they have no subscribers or waiting claims
    to wake, so their bus carries this process's commits only (reading every commit back from the
    history table took a 3,000-task PostgreSQL demo from ~40-60 s to ~86 s), and a sweep or prune
    racing the command's own work would change what it reports. Other processes still hear of
    their commits: PostgreSQL notifies at commit, and SQLite peers reread the history table every
    second."""
    store = open_store(settings)
    bus = open_bus(settings, store) if serving else own_commits(store)
    service = TaskService(
        store,
        bus,
        clock=clock,
        backoff=Backoff(settings.backoff_base, settings.backoff_cap),
        subscriber_buffer=settings.subscriber_buffer,
        jitter=jitter,
    )
    await store.open()
    try:
        await bus.start()
        try:
            background = background_jobs(settings, service) if serving else []
            try:
                yield Runtime(settings, store, bus, service)
            finally:
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            await bus.stop()
            await service.drain()
    finally:
        await store.close()


def open_bus(settings: Settings, store: TaskStore) -> EventBus:
    """The event bus for this store. Both tell every server process of every commit, so other
    replicas (PostgreSQL) or other processes on the same file (SQLite) see one ordered stream."""
    if settings.backend == "postgres":
        from api.events.postgres import PostgresBus

        # Not a commit listener as well: every event arrives through the history table, once.
        return PostgresBus(settings.database_url, store)
    from api.events.sqlite import SqliteBus

    return SqliteBus(store, settings.sqlite_path)


def own_commits(store: TaskStore) -> EventBus:
    """A bus that carries only the commits of this process."""
    bus = LocalBus()
    store.listen(bus.dispatch)
    return bus


def background_jobs(settings: Settings, service: TaskService) -> list[asyncio.Task[None]]:
    jobs = [asyncio.create_task(sweep_leases(service, settings.lease_sweep_interval))]
    if settings.retention_period is not None:
        jobs.append(asyncio.create_task(prune_periodically(service, settings.retention_period)))
    return jobs


async def sweep_leases(service: TaskService, interval: float) -> None:
    """Requeue expired leases every `interval` seconds; every replica may run this at once."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await service.expire_leases()
            if expired:
                log.info("requeued %d task(s) whose lease expired", len(expired))
        except Exception:
            log.exception("lease sweep failed; retrying in %.1fs", interval)
