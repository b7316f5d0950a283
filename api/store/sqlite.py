"""SQLite store: WAL, one group-committing writer thread (writer.py), aiosqlite readers."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from api.core.domain import TaskEvent
from api.database_url import sqlite_path
from api.store import changes as programs
from api.store import migrations
from api.store.base import CommitListener
from api.store.changes import Program, Query
from api.store.common import SqlTaskStore
from api.store.handle_store import SqlHandleStore
from api.store.key_store import SqlKeyStore
from api.store.rows import Pending, Row, event_of, history_row
from api.store.sql import LAST_ROWID, RECORD, SCHEMA_VERSION_NOW, SQLITE, SQLITE_SQL, to_us
from api.store.writer import Writer

T = TypeVar("T")

READERS = 2


def dict_rows() -> Callable[[sqlite3.Cursor, tuple[Any, ...]], dict[str, Any]]:
    """A row factory giving each row as a dict. sqlite3.Row finds a column by comparing its name
    with each column's in turn, case-insensitively: for the 29 columns of a task that was about
    half the cost of reading one. The column names are taken once per statement (a cursor keeps
    one description for all the rows of one execute); one factory per connection."""
    last: list[Any] = [None, ()]

    def factory(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
        description = cursor.description
        if description is not last[0]:
            last[0], last[1] = description, tuple(column[0] for column in description)
        return dict(zip(last[1], values))  # noqa: B905  # one length: the same description

    return factory


def run_program(conn: sqlite3.Connection, program: Program[T]) -> tuple[T, list[Pending]]:
    """Run a change program on the writer's connection; the writer writes the history it owes."""
    rows: list[Row] | None = None
    try:
        while True:
            statement, params = program.send(rows)  # type: ignore[arg-type]
            rows = conn.execute(statement, params).fetchall()
    except StopIteration as stop:
        value, pending = stop.value
    return value, pending


def record_history(conn: sqlite3.Connection, owed: Sequence[Pending]) -> list[TaskEvent]:
    """Insert the history rows of a whole commit in one statement. The writer holds the database's
    write lock for the transaction, so the rows take consecutive ids, in order, ending at the
    connection's last inserted rowid."""
    rows = [history_row(SQLITE, p) for p in owed]
    inserted = conn.executemany(RECORD, rows).rowcount
    if inserted != len(rows):
        raise sqlite3.DatabaseError(f"{inserted} of {len(rows)} history rows were stored")
    first = conn.execute(LAST_ROWID).fetchone()["id"] - len(rows) + 1
    for number, row in enumerate(rows, first):
        row["id"] = number
    return [event_of(SQLITE, row) for row in rows]


def migrate(conn: sqlite3.Connection) -> tuple[None, list[Pending]]:
    conn.execute(migrations.CREATE_VERSIONS.format(time="INTEGER"))
    current = conn.execute(SCHEMA_VERSION_NOW).fetchone()["version"]
    for version, script in migrations.pending(SQLITE, current):
        for statement in script:
            conn.execute(statement)
        conn.execute(
            migrations.RECORD_VERSION, {"version": version, "now": to_us(datetime.now(UTC))}
        )
    return None, []


class SqliteStore(SqlTaskStore):
    sql = SQLITE_SQL

    def __init__(self, url: str, *, durability: str = "full", readers: int = READERS) -> None:
        self.path = sqlite_path(url)
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        self._listeners: list[CommitListener] = []
        self._writer = Writer(
            self._connect_writer, record_history, self._committed, turn_path=f"{self.path}-turn"
        )
        self._reader_count = readers
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = itertools.cycle(range(readers))
        # Key checks run on every request: on this connection, in the event loop's own thread,
        # since for an indexed read of a tiny table the hop to a reader thread costs far more.
        self._loop_reader: sqlite3.Connection | None = None
        self.keys = SqlKeyStore(SQLITE, self._key_read, self._write)
        self.handles = SqlHandleStore(SQLITE, self._read, self._write)

    # --- lifecycle ---

    def _connect_writer(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = dict_rows()
        conn.execute("PRAGMA busy_timeout = 10000")  # other server processes on the same file
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def open(self) -> None:
        self._writer.start()
        await self._writer.run(migrate)
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            reader.row_factory = dict_rows()  # type: ignore[assignment]  # any callable works
            await reader.execute("PRAGMA busy_timeout = 10000")
            await reader.execute("PRAGMA query_only = 1")
            self._readers.append(reader)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = dict_rows()
        conn.execute("PRAGMA busy_timeout = 0")  # never block the loop; fall back instead
        conn.execute("PRAGMA query_only = 1")
        self._loop_reader = conn

    async def close(self) -> None:
        if self._loop_reader is not None:
            self._loop_reader.close()
            self._loop_reader = None
        for reader in self._readers:
            await reader.close()
        self._readers.clear()
        await self._writer.stop()

    def listen(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def _committed(self, events: Sequence[TaskEvent]) -> None:
        for listener in self._listeners:
            listener(events)

    # --- how statements reach the database ---

    async def _read(self, query: Query) -> list[Row]:
        if not self._readers:
            raise RuntimeError("the store is not open")
        reader = self._readers[next(self._next_reader)]
        async with reader.execute(*query) as cursor:
            return list(await cursor.fetchall())

    async def _key_read(self, query: Query) -> list[Row]:
        if self._loop_reader is not None:
            try:
                return self._loop_reader.execute(*query).fetchall()
            except sqlite3.OperationalError:  # locked (a restore, a checkpoint): ask a reader
                pass
        return await self._read(query)

    async def _write(self, query: Query) -> list[Row]:
        return await self._writer.run(lambda conn: (conn.execute(*query).fetchall(), ()))

    async def _run(self, program: Program[T]) -> T:
        return await self._writer.run(lambda conn: run_program(conn, program))

    async def prune(self, finished_before: datetime, limit: int) -> int:
        # It deletes history: the rows owed by changes committed with it are written before it runs.
        program = programs.prune(self.sql, finished_before, limit)
        return await self._writer.run(lambda conn: run_program(conn, program), reads_history=True)
