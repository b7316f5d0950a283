"""PostgreSQL store on an asyncpg pool: compare-and-set updates, SKIP LOCKED claims, and history
rows written without a lock, whose ids (delivery positions) the elected stamper gives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

from api.core import lifecycle
from api.core.domain import Completion, Task, TaskEvent, TaskSpec
from api.jsontext import dumps, loads
from api.store import changes as programs
from api.store import sql
from api.store.base import CommitListener, Decide
from api.store.changes import Program, Query, Recorded
from api.store.common import SqlTaskStore
from api.store.handle_store import SqlHandleStore
from api.store.key_store import SqlKeyStore
from api.store.pg_schema import WAKE_STAMPER, insert_history, migrate, with_history
from api.store.rows import Row, event_of, pending_event, task_of
from api.store.sql import POSTGRES, POSTGRES_SQL, numbered, positional
from api.store.stamper import Stamper

T = TypeVar("T")

log = logging.getLogger("taskorch.store")

CHANNEL = "taskorch_events"  # the stamper announces the last position it gave
HISTORY_CHANNEL = "taskorch_history"  # writers wake the stamper

POOL_MIN = 1
POOL_MAX = 10

# Parameters: worker, now, lease end, work directory, limit.
CLAIM = numbered(POSTGRES_SQL.claim)[0]


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=dumps, decoder=loads, schema="pg_catalog")


async def keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection given back, once asyncpg has rolled back a transaction
    left open: nothing more. The store leaves no session state on a pooled connection (its
    advisory locks are transaction-scoped; it never LISTENs, SETs or DECLAREs there), so the
    default reset (unlock all, CLOSE ALL, UNLISTEN *, RESET ALL) would cost every acquire one
    more round trip and four statements for nothing."""


CLOSE_SECONDS = 10.0
# A task's history read right after a change waits this long, at most, for the change's position.
HISTORY_WAIT = 2.0


class PostgresStore(SqlTaskStore):
    sql = POSTGRES_SQL

    def __init__(self, url: str, *, min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._listeners: list[CommitListener] = []
        self._stamper: Stamper | None = None
        self._waking: asyncio.Task[None] | None = None
        self._wake_again = False
        self.keys = SqlKeyStore(POSTGRES, self._read, self._write)
        self.handles = SqlHandleStore(POSTGRES, self._read, self._write)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    # --- lifecycle ---

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            init=init_connection,
            reset=keep_session,
            # A generic plan cached while the table was small keeps scanning the whole table after
            # it grew; custom plans see the table's current size. Planning these costs ~0.1 ms.
            server_settings={"plan_cache_mode": "force_custom_plan"},
        )
        try:
            async with self._pool.acquire() as conn:
                key = await migrate(conn)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        # Every process is a stamper candidate, so positions are given while any one is running.
        self._stamper = Stamper(self.url, key, wake_channel=HISTORY_CHANNEL, event_channel=CHANNEL)
        self._stamper.start()

    @property
    def stamper(self) -> Stamper:
        if self._stamper is None:
            raise RuntimeError("the store is not open")
        return self._stamper

    async def close(self) -> None:
        waking, self._waking = self._waking, None
        if waking is not None:
            waking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waking
        if self._stamper is not None:
            stamper, self._stamper = self._stamper, None
            await stamper.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # A graceful close waits for every connection to come back; one still held by a
            # request that shutdown abandoned would make it wait forever, so it is bounded.
            try:
                async with asyncio.timeout(CLOSE_SECONDS):
                    await pool.close()
            except TimeoutError:
                log.warning("connections still in use after %.0fs; closing them", CLOSE_SECONDS)
                pool.terminate()

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def _committed(self, events: Sequence[TaskEvent]) -> None:
        # The change is committed: a failing listener must not turn it into an error for the caller.
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("commit listener failed")

    def _wake_stamper(self) -> None:
        """Tell the stamper rows committed: directly when it runs here, else with one NOTIFY in
        flight at a time per process, which covers every commit made while it was sent."""
        if self._stamper is not None and self._stamper.holding:
            self._stamper.wake()
        elif self._waking is not None:
            self._wake_again = True
        else:
            self._waking = asyncio.create_task(self._notify_stamper())

    async def _notify_stamper(self) -> None:
        try:
            while True:
                self._wake_again = False
                await self.pool.execute(WAKE_STAMPER, HISTORY_CHANNEL)
                if not self._wake_again:
                    return
        except Exception as exc:  # the stamper's own poll stamps the rows a little later
            log.warning("could not wake the history stamper: %s", exc)
        finally:
            self._waking = None

    # --- how statements reach the database ---

    async def _read(self, query: Query) -> list[Row]:
        text, args = positional(*query)
        rows: list[Row] = await self.pool.fetch(text, *args)
        return rows

    _write = _read  # one statement outside a transaction block commits on its own

    async def history(self, task_id: str) -> list[TaskEvent]:
        """The task's positioned events; a change committed a moment ago is waited for briefly,
        so a caller reads its own change."""
        deadline = asyncio.get_running_loop().time() + HISTORY_WAIT
        while True:
            stamped = self.stamper.stamped
            rows = await self._read((sql.HISTORY, {"task_id": task_id}))
            positioned = [r for r in rows if r["id"] is not None]
            left = deadline - asyncio.get_running_loop().time()
            if len(positioned) == len(rows) or left <= 0:
                return [event_of(POSTGRES, r) for r in positioned]
            # The stamper may run in another process: its stamps are not seen here, so poll too.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.005)):
                    await stamped.wait()

    async def _run(self, program: Program[T]) -> T:
        """Run `program` in one transaction and write the history rows it owes; after the commit,
        wake the stamper and tell listeners. A program that decides without a statement takes
        no connection."""
        try:
            query = next(program)
        except StopIteration as stop:
            value: T = stop.value[0]
            return value
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                try:
                    while True:
                        text, args = positional(*query)
                        query = program.send(await conn.fetch(text, *args))
                except StopIteration as stop:
                    value = stop.value[0]
                    pending = stop.value[1]
                if not pending:
                    await tx.commit()
                    return value
                events = await insert_history(conn, pending)
                await tx.commit()
                self._wake_stamper()
                self._committed(events)
                return value
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(Exception):  # the pool resets the connection anyway
                        await tx.rollback()
                raise

    async def _record(self, change: Recorded) -> list[Task]:
        """Run a one-statement change with its history rows in the same statement, committed on
        its own (pg_schema.with_history); the tasks changed, in claim order (none: nothing was)."""
        statement, params = change.query
        text, args = positional(
            with_history(statement),
            {
                **params,
                "history_previous": None if change.previous is None else change.previous.value,
                "history_worker": change.worker_id,
                "history_details": change.details,
            },
        )
        rows = await self.pool.fetch(text, *args)
        if not rows:
            return []
        tasks = programs.claim_order([task_of(POSTGRES, row) for row in rows])
        self._wake_stamper()
        self._committed([pending_event(POSTGRES, p) for p in change.owed(tasks)])
        return tasks

    # --- the hot changes: one statement each where it is the whole change; else the program ---

    async def submit(self, specs: Sequence[TaskSpec], now: datetime) -> list[Task]:
        if len(specs) == 1 and not specs[0].depends_on:
            tasks = await self._record(programs.submit_alone(self.sql, specs[0], now))
            if tasks:
                return tasks
            # The idempotency key is stored already: the program hands back the stored task.
        return await super().submit(specs, now)

    async def claim(
        self, work_directory: str, worker_id: str, limit: int, lease_until: datetime, now: datetime
    ) -> list[Task]:
        free = programs.free_claim(self.sql, work_directory, worker_id, limit, lease_until, now)
        tasks = await self._record(free)
        if tasks:
            return tasks
        # Nothing claimable, or the directory has controls. They are read outside the claim's
        # transaction: inside it they would be read unlocked too, in a snapshot of their own
        # (READ COMMITTED), so a directory without controls costs no transaction.
        found = await self._read((self.sql.directory_for_claim, {"work_directory": work_directory}))
        return await self._run(programs.controlled_claim(self.sql, free, found))

    async def complete(
        self, items: Sequence[Completion], worker_id: str, now: datetime
    ) -> list[Task] | None:
        if len(items) == 1:
            tasks = await self._record(programs.complete_alone(self.sql, items[0], worker_id, now))
            if tasks:
                return tasks
            # Not held (the program says why), or its end settles other tasks: the program does.
        return await super().complete(items, worker_id, now)

    async def change(self, task_id: str, decide: Decide) -> Task | None:
        """Decide on the task as last committed and apply it with a compare-and-set on that
        version, in one statement; the program, which locks the row first, decides when that
        does not apply: no outcome, a version that moved meanwhile, or dependents to settle."""
        rows = await self._read((sql.GET, {"id": task_id}))
        outcome = decide(task_of(POSTGRES, rows[0])) if rows else None
        if outcome is not None and not lifecycle.settles_dependents(outcome.task):
            changed = await self._record(programs.applying(self.sql, outcome))
            if changed:
                return changed[0]
        return await super().change(task_id, decide)
