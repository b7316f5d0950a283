"""Reading the server's own tables through ADBC into Arrow columns: one read-only snapshot of tasks
and task_history from SQLite or PostgreSQL, with the time window applied in SQL.

The drivers ship inside their wheels (adbc-driver-sqlite, adbc-driver-postgresql), so nothing is
downloaded at run time. Columns come back as Arrow arrays in the `Raw` shape of `analytics.sources`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    return pc.if_else(pc.equal(column, NULL_TEXT), pa.scalar(None, pa.string()), column)


def _text(column: str) -> str:
    return f"ifnull({column}, char(31))"


# --- SQLite ---


def read_sqlite(url: str, since: datetime | None, until: datetime | None) -> Raw:
    import adbc_driver_sqlite.dbapi as sqlite_adbc

    path = Path(sqlite_path(url))
    if not path.exists():
        raise SourceError(f"source: no SQLite database at {path.resolve()}")
    where, params = window_sql("t", micros(since), micros(until), lambda _: "?")
    times = ", ".join(f"ifnull({c}, {NO_TIME_SQL})" for c in TIMES)
    tasks_sql = (
        f"SELECT seq, id, work_directory, substr(prompt, 1, {PROMPT_CHARS}), priority, tags,"
        f" {code_sql('status', STATUSES)}, {_text('worker_id')}, {times}, retry_count,"
        f" max_retries, {_text(f'substr(error_message, 1, {ERROR_CHARS})')}"
        f" FROM tasks t WHERE {where} ORDER BY seq"
    )
    # A scan in id order: about half the CPU of joining each event to its task.
    reason = _text("json_extract(h.details, '$.reason')")
    events_sql = (
        f"SELECT h.id, h.task_id, {code_sql('h.status', STATUSES)},"
        f" {code_sql('h.previous_status', STATUSES)}, {_text('h.worker_id')}, h.at,"
        " CASE WHEN instr(h.details, 'reason') = 0 THEN char(31)"
        f" ELSE {reason} END FROM task_history h"
    )
    events_params: list[Any] = []
    if since is not None or until is not None:
        events_sql += f" WHERE h.task_id IN (SELECT t.id FROM tasks t WHERE {where})"
        events_params = list(params)
        if until is not None:
            events_sql += " AND h.at < ?"
            events_params.append(micros(until))
    events_sql += " ORDER BY h.id"
    try:
        # mode=ro: this connection can never write, whatever runs on it
        with sqlite_adbc.connect(f"file:{path.resolve()}?mode=ro") as conn, conn.cursor() as cur:
            # The driver opens a transaction (autocommit is off): one snapshot for both tables.
            tasks = _table(cur, tasks_sql, params)
            events = _table(cur, events_sql, events_params)
    except sqlite_adbc.Error as exc:
        raise SourceError(
            f"source: cannot read {path}: {exc} (is it a taskorch database?)"
        ) from exc
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


def read_postgres(url: str, since: datetime | None, until: datetime | None) -> Raw:
    where, params = window_sql("t", since, until, lambda n: f"${n}")
    tasks_sql = (
        f"SELECT seq, id::text, work_directory, left(prompt, {PROMPT_CHARS}), priority,"
        f" tags::text, {code_sql('status', STATUSES)}, worker_id, {', '.join(TIMES)},"
        f" retry_count::bigint, max_retries::bigint, left(error_message, {ERROR_CHARS})"
        f" FROM tasks t WHERE {where} ORDER BY seq"
    )
    events_sql = (
        f"SELECT h.id, h.task_id::text, {code_sql('h.status', STATUSES)},"
        f" {code_sql('h.previous_status', STATUSES)}, h.worker_id, h.at,"
        " h.details->>'reason' FROM task_history h"
    )
    events_params: list[Any] = []
    if since is not None or until is not None:
        events_sql += f" WHERE h.task_id IN (SELECT t.id FROM tasks t WHERE {where})"
        events_params = list(params)
        if until is not None:
            events_params.append(until)
            events_sql += f" AND h.at < ${len(events_params)}"
    events_sql += " ORDER BY h.id"
    with _postgres(url) as cur:
        tasks = _table(cur, tasks_sql, params)
        events = _table(cur, events_sql, events_params)
    task_columns = _columns(tasks, TASK_FIELDS)
    for name in TIMES:
        i = TASK_FIELDS.index(name)
        task_columns[i] = _epoch_us(task_columns[i])
    event_columns = _columns(events, EVENT_FIELDS)
    at = EVENT_FIELDS.index("at")
    event_columns[at] = _epoch_us(event_columns[at])
    return Raw(task_columns, event_columns)
