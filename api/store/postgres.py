"""PostgreSQL store on an asyncpg pool: compare-and-set updates, SKIP LOCKED claims, and history ids
that commit in id order so a cross-process event reader never skips one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import TypeVar

import asyncpg

from api.core.domain import TaskEvent
from api.store.base import CommitListener
from api.store.changes import Program, Query
from api.store.common import SqlTaskStore
from api.store.key_store import SqlKeyStore
from api.store.pg_schema import HISTORY_LOCK, insert_history, migrate
from api.store.rows import Row
from api.store.sql import POSTGRES, POSTGRES_SQL, dumps, numbered, positional

T = TypeVar("T")

log = logging.getLogger("taskorch.store")

CHANNEL = "taskorch_events"

POOL_MIN = 1
POOL_MAX = 10

# Parameters: worker, now, lease end, work directory, limit.
CLAIM = numbered(POSTGRES_SQL.claim)[0]


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=dumps, decoder=json.loads, schema="pg_catalog")


CLOSE_SECONDS = 10.0


class PostgresStore(SqlTaskStore):
    sql = POSTGRES_SQL

    def __init__(self, url: str, *, min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._listeners: list[CommitListener] = []
        # Commits of this process pass one at a time through the history lock, so listeners are
        # called in event-id order; the advisory lock already serialises them across processes.
        self._commit_lock = asyncio.Lock()
        self._lock_key = 0
        self.keys = SqlKeyStore(POSTGRES, self._read, self._write)

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
                self._lock_key = await migrate(conn)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def close(self) -> None:
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

    # --- how statements reach the database ---

    async def _read(self, query: Query) -> list[Row]:
        text, args = positional(*query)
        rows: list[Row] = await self.pool.fetch(text, *args)
        return rows

    _write = _read  # one statement outside a transaction block commits on its own

    async def _run(self, program: Program[T]) -> T:
        """Run `program` in one transaction; write the history rows it owes under the history
        lock, announce them with NOTIFY in the same transaction, and tell listeners after the
        commit."""
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
                async with self._commit_lock:
                    events = await insert_history(
                        conn, pending, (HISTORY_LOCK, self._lock_key), CHANNEL
                    )
                    await tx.commit()
                    self._committed(events)
                return value
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(Exception):  # the pool resets the connection anyway
                        await tx.rollback()
                raise
