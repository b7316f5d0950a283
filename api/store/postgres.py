"""PostgreSQL store on an asyncpg pool: compare-and-set updates, SKIP LOCKED claims, and history
rows written without a lock, whose ids (delivery positions) the elected stamper gives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import TypeVar

import asyncpg

from api.core.domain import TaskEvent
from api.store import sql
from api.store.base import CommitListener
from api.store.changes import Program, Query
from api.store.common import SqlTaskStore
from api.store.handle_store import SqlHandleStore
from api.store.key_store import SqlKeyStore
from api.store.pg_schema import WAKE_STAMPER, insert_history, migrate
from api.store.rows import Row, event_of
from api.store.sql import POSTGRES, POSTGRES_SQL, dumps, numbered, positional
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
    await conn.set_type_codec("jsonb", encoder=dumps, decoder=json.loads, schema="pg_catalog")


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
        wake the stamper and tell listeners."""
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                rows: list[Row] | None = None
                try:
                    while True:
                        text, args = positional(*program.send(rows))  # type: ignore[arg-type]
                        rows = await conn.fetch(text, *args)
                except StopIteration as stop:
                    value: T = stop.value[0]
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
