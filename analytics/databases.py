"""Reading the server's own tables through ADBC into Arrow columns: one read-only snapshot of tasks
and task_history from SQLite or PostgreSQL, with the time window applied in SQL.

The drivers ship inside their wheels (adbc-driver-sqlite, adbc-driver-postgresql), so nothing is
downloaded at run time. Columns come back as Arrow arrays in the `Raw` shape of `analytics.sources`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from analytics.sources import (
    ERROR_CHARS,
    EVENT_FIELDS,
    NO_TIME,
    NO_TIME_SQL,
    PROMPT_CHARS,
    STATUSES,
    TASK_FIELDS,
    Raw,
    SourceError,
    code_sql,
    micros,
    source_kind,
    sqlite_path,
    window_sql,
)

TIMES = ("created_at", "started_at", "completed_at", "updated_at")
# SQLite's driver infers each column's type from its first rows, so a column that starts with
# NULLs would be typed wrong: nullable text arrives with this stand-in and is turned back to null.
NULL_TEXT = "\x1f"


def _table(cursor: Any, sql: str, params: list[Any]) -> pa.Table:
    cursor.execute(sql, params)
    return cursor.fetch_arrow_table()


def _columns(table: pa.Table, names: tuple[str, ...]) -> list[Any]:
    return [table.column(i).combine_chunks() for i in range(len(names))]


def _nulled(column: pa.Array) -> pa.Array:
    if not pa.types.is_string(column.type):  # no rows to infer a type from
        column = column.cast(pa.string())
    return pc.if_else(pc.equal(column, NULL_TEXT), pa.scalar(None, pa.string()), column)


def _text(column: str) -> str:
    return f"ifnull({column}, char(31))"


@dataclass(frozen=True)
class Selection:
    """Which rows to read: SQL conditions on `tasks t` and `task_history h`, with `mark(n)`
    writing the n-th parameter's placeholder of the dialect."""

    tasks: str
    tasks_params: list[Any]
    events: str
    events_params: list[Any]


def window(
    since: datetime | None, until: datetime | None, mark: Callable[[int], str], instant: Any
) -> Selection:
    """Tasks that overlap the window and their events before `until` (every event without one)."""
    where, params = window_sql("t", instant(since), instant(until), mark)
    # On PostgreSQL a history row gets its id (its delivery position) a few milliseconds after its
    # commit; until then it is not delivered anywhere, so it is not read here either.
    if since is None and until is None:
        return Selection(where, params, "h.id IS NOT NULL", [])
    events = f"h.id IS NOT NULL AND h.task_id IN (SELECT t.id FROM tasks t WHERE {where})"
    events_params = list(params)
    if until is not None:
        events_params.append(instant(until))
        events += f" AND h.at < {mark(len(events_params))}"
    return Selection(where, params, events, events_params)


def after(event_id: int, mark: Callable[[int], str]) -> Selection:
    """Events with an id above `event_id`, and the tasks they belong to as they are now."""
    events = f"h.id > {mark(1)}"
    tasks = f"t.id IN (SELECT h.task_id FROM task_history h WHERE {events})"
    return Selection(tasks, [event_id], events, [event_id])


# --- SQLite ---


def _sqlite_mark(_: int) -> str:
    return "?"


def read_sqlite(url: str, since: datetime | None, until: datetime | None) -> Raw:
    return read_sqlite_rows(url, window(since, until, _sqlite_mark, micros))


def read_sqlite_after(url: str, event_id: int) -> Raw:
    return read_sqlite_rows(url, after(event_id, _sqlite_mark))


@contextmanager
def _sqlite(url: str) -> Iterator[Any]:
    """A read-only cursor; the driver opens a transaction (autocommit is off), so every query on
    it reads one snapshot."""
    import adbc_driver_sqlite.dbapi as sqlite_adbc

    path = Path(sqlite_path(url))
    if not path.exists():
        raise SourceError(f"source: no SQLite database at {path.resolve()}")
    try:
        # mode=ro: this connection can never write, whatever runs on it
        with sqlite_adbc.connect(f"file:{path.resolve()}?mode=ro") as conn, conn.cursor() as cur:
            cur.execute("PRAGMA busy_timeout = 10000")
            yield cur
    except sqlite_adbc.Error as exc:
        raise SourceError(
            f"source: cannot read {path}: {exc} (is it a taskorch database?)"
        ) from exc


def query(url: str, sqlite_sql: str, postgres_sql: str, params: list[Any]) -> pa.Table:
    """One read-only query, in the dialect of the source; SQLite times are microseconds."""
    if source_kind(url) == "sqlite":
        with _sqlite(url) as cur:
            return _table(cur, sqlite_sql, params)
    with _postgres(url) as cur:
        return _table(cur, postgres_sql, params)


def read_sqlite_rows(url: str, rows: Selection) -> Raw:
    times = ", ".join(f"ifnull({c}, {NO_TIME_SQL})" for c in TIMES)
    tasks_sql = (
        f"SELECT seq, id, work_directory, substr(prompt, 1, {PROMPT_CHARS}), priority, tags,"
        f" {code_sql('status', STATUSES)}, {_text('worker_id')}, {times}, retry_count,"
        f" max_retries, {_text(f'substr(error_message, 1, {ERROR_CHARS})')}"
        f" FROM tasks t WHERE {rows.tasks} ORDER BY seq"
    )
    # A scan in id order: about half the CPU of joining each event to its task.
    reason = _text("json_extract(h.details, '$.reason')")
    events_sql = (
        f"SELECT h.id, h.task_id, {code_sql('h.status', STATUSES)},"
        f" {code_sql('h.previous_status', STATUSES)}, {_text('h.worker_id')}, h.at,"
        " CASE WHEN instr(h.details, 'reason') = 0 THEN char(31)"
        f" ELSE {reason} END FROM task_history h WHERE {rows.events} ORDER BY h.id"
    )
    with _sqlite(url) as cur:  # one snapshot for both tables
        tasks = _table(cur, tasks_sql, rows.tasks_params)
        events = _table(cur, events_sql, rows.events_params)
    task_columns = _columns(tasks, TASK_FIELDS)
    for i in (TASK_FIELDS.index("worker_id"), TASK_FIELDS.index("error_message")):
        task_columns[i] = _nulled(task_columns[i])
    event_columns = _columns(events, EVENT_FIELDS)
    for i in (EVENT_FIELDS.index("worker_id"), EVENT_FIELDS.index("reason")):
        event_columns[i] = _nulled(event_columns[i])
    return Raw(task_columns, event_columns)


# --- PostgreSQL ---


@contextmanager
def _postgres(url: str) -> Iterator[Any]:
    """A cursor inside one read-only repeatable-read transaction: one snapshot for every query."""
    import adbc_driver_postgresql.dbapi as pg_adbc

    try:
        with pg_adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield cur
            finally:
                cur.execute("ROLLBACK")
    except pg_adbc.Error as exc:
        raise SourceError(f"source: cannot read the PostgreSQL database: {exc}") from exc


def _epoch_us(column: pa.Array) -> pa.Array:
    return pc.fill_null(column.cast(pa.int64()), NO_TIME)


def _pg_mark(n: int) -> str:
    return f"${n}"


def _same(value: Any) -> Any:
    return value


def read_postgres(url: str, since: datetime | None, until: datetime | None) -> Raw:
    return read_postgres_rows(url, window(since, until, _pg_mark, _same))


def read_postgres_after(url: str, event_id: int) -> Raw:
    return read_postgres_rows(url, after(event_id, _pg_mark))


def read_postgres_rows(url: str, rows: Selection) -> Raw:
    tasks_sql = (
        f"SELECT seq, id::text, work_directory, left(prompt, {PROMPT_CHARS}), priority,"
        f" tags::text, {code_sql('status', STATUSES)}, worker_id, {', '.join(TIMES)},"
        f" retry_count::bigint, max_retries::bigint, left(error_message, {ERROR_CHARS})"
        f" FROM tasks t WHERE {rows.tasks} ORDER BY seq"
    )
    events_sql = (
        f"SELECT h.id, h.task_id::text, {code_sql('h.status', STATUSES)},"
        f" {code_sql('h.previous_status', STATUSES)}, h.worker_id, h.at,"
        f" h.details->>'reason' FROM task_history h WHERE {rows.events} ORDER BY h.id"
    )
    with _postgres(url) as cur:
        tasks = _table(cur, tasks_sql, rows.tasks_params)
        events = _table(cur, events_sql, rows.events_params)
    task_columns = _columns(tasks, TASK_FIELDS)
    for name in TIMES:
        i = TASK_FIELDS.index(name)
        task_columns[i] = _epoch_us(task_columns[i])
    event_columns = _columns(events, EVENT_FIELDS)
    at = EVENT_FIELDS.index("at")
    event_columns[at] = _epoch_us(event_columns[at])
    return Raw(task_columns, event_columns)
