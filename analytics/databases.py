"""Reading the server's own tables through ADBC into Arrow columns: one read-only snapshot of tasks
and task_history from SQLite or PostgreSQL, with the time window applied in SQL.

The drivers ship inside their wheels (adbc-driver-sqlite, adbc-driver-postgresql), so nothing is
downloaded at run time. Columns come back as Arrow arrays in the `Raw` shape of `analytics.sources`.

Two connections read at once, on one snapshot (see `analytics.snapshot`): on SQLite the history
in two id ranges, on PostgreSQL the tasks on one and the history on the other. The drivers
release the GIL while they step through rows, so the two run on two cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analytics import snapshot
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

T = TypeVar("T")

TIMES = ("created_at", "started_at", "completed_at", "updated_at")
# SQLite's driver infers each column's type from its first rows, so a column that starts with
# NULLs would be typed wrong: nullable text arrives with this stand-in and is turned back to null.
NULL_TEXT = "\x1f"
# Below this many history rows one connection reads everything: opening a second and splitting
# the work costs more than it saves.
SPLIT_EVENTS = 200_000
# Reading one task row costs about as much as reading two history rows (either database).
TASK_WEIGHT = 2


def _table(cursor: Any, sql: str, params: list[Any]) -> pa.Table:
    cursor.execute(sql, params)
    return cursor.fetch_arrow_table()


def _columns(table: pa.Table, names: tuple[str, ...]) -> list[Any]:
    # The columns in the driver's batches, as they are: joining the chunks would copy every
    # value once more, and whatever reads them next (numpy, the hash kernels) takes chunks.
    return list(table.columns[: len(names)])


# An event's status and previous status as one integer, status * 8 + previous + 1 (codes from -1,
# none, to 6): every column read costs about as much again per row, whatever it holds, so the two
# codes travel as one and are split in numpy.
STATUS_PAIR = (
    f"({code_sql('h.status', STATUSES)}) * 8 + ({code_sql('h.previous_status', STATUSES)}) + 1"
)


def _event_columns(table: pa.Table) -> list[Any]:
    """The EVENT_FIELDS columns of an events query that read the status pair as one column."""
    columns = table.columns
    pair = np.asarray(columns[2].cast(pa.int64()).to_numpy(zero_copy_only=False))
    status, previous = pa.array(pair >> 3), pa.array((pair & 7) - 1)
    return [*columns[:2], status, previous, *columns[3:]]


@dataclass(frozen=True)
class Reads:
    """The two queries of a load in one dialect; `events` takes an extra condition on h.id (its
    part of the history) and the parameters that condition adds."""

    tasks: str
    tasks_params: list[Any]
    events: Callable[[str], str]
    events_params: list[Any]
    mark: Callable[[int], str]
    # SQL giving (first event id, last event id, task rows): cheap bounds to split the work by
    bounds: str


def _events_part(reads: Reads, lo: int | None, hi: int | None) -> tuple[str, list[Any]]:
    params = list(reads.events_params)
    clauses = []
    for value, sign in ((lo, ">="), (hi, "<")):
        if value is not None:
            params.append(value)
            clauses.append(f" AND h.id {sign} {reads.mark(len(params))}")
    return reads.events("".join(clauses)), params


def split_point(first: int, last: int, tasks: int) -> int | None:
    """The history id where the second connection's part starts, so that both connections read
    about the same: the first reads the tasks and the history below it. None: one reads all."""
    events = last - first + 1
    if events < SPLIT_EVENTS:
        return None
    second = (TASK_WEIGHT * tasks + events) // 2
    if second >= events:
        return None  # the tasks alone outweigh the history
    return last + 1 - second


def read_tables(session: snapshot.Session, reads: Reads) -> tuple[pa.Table, pa.Table]:
    """Tasks and history in one snapshot: a large history in two id ranges read at once by two
    connections, joined back in id order."""
    first = session.first
    low, high, tasks = (column[0].as_py() for column in _table(first, reads.bounds, []).columns)
    middle = None if low is None else split_point(int(low), int(high), int(tasks or 0))
    second = None if middle is None else session.another()
    if middle is None or second is None:
        events_sql, events_params = _events_part(reads, None, None)
        tasks = _table(first, reads.tasks, reads.tasks_params)
        return tasks, _table(first, events_sql, events_params)
    early_sql, early_params = _events_part(reads, None, middle)
    late_sql, late_params = _events_part(reads, middle, None)

    def early() -> tuple[pa.Table, pa.Table]:
        return _table(first, reads.tasks, reads.tasks_params), _table(
            first, early_sql, early_params
        )

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="analytics-read") as pool:
        late = pool.submit(_table, second, late_sql, late_params)
        tasks, before = pool.submit(early).result()
        after = late.result()
    return tasks, _joined([before, after])


def _joined(parts: list[pa.Table]) -> pa.Table:
    # SQLite's driver types an empty result by guesswork, so the parts with rows set the schema.
    full = [part for part in parts if part.num_rows] or parts[:1]
    return pa.concat_tables([part.cast(full[0].schema) for part in full])


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


def _sqlite_file(url: str) -> Path:
    path = Path(sqlite_path(url))
    if not path.exists():
        raise SourceError(f"source: no SQLite database at {path.resolve()}")
    return path.resolve()


@contextmanager
def _sqlite(url: str) -> Iterator[snapshot.Session]:
    """A read-only session: every query on it, on every cursor, reads one snapshot."""
    import adbc_driver_sqlite.dbapi as sqlite_adbc

    path = _sqlite_file(url)
    try:
        # mode=ro: these connections can never write, whatever runs on them
        with snapshot.sqlite_session(f"file:{path}?mode=ro") as session:
            yield session
    except sqlite_adbc.Error as exc:
        raise SourceError(
            f"source: cannot read {path}: {exc} (is it a taskorch database?)"
        ) from exc


def query(url: str, sqlite_sql: str, postgres_sql: str, params: list[Any]) -> pa.Table:
    """One read-only query, in the dialect of the source; SQLite times are microseconds."""
    if source_kind(url) == "sqlite":
        with _sqlite(url) as session:
            return _table(session.first, sqlite_sql, params)
    with _postgres(url) as session:
        return _table(session.first, postgres_sql, params)


def _sqlite_reads(rows: Selection) -> Reads:
    times = ", ".join(f"ifnull({c}, {NO_TIME_SQL})" for c in TIMES)
    tasks_sql = (
        f"SELECT seq, id, work_directory, substr(prompt, 1, {PROMPT_CHARS}), priority, tags,"
        f" {code_sql('status', STATUSES)}, {_text('worker_id')}, {times}, retry_count,"
        f" max_retries, {_text(f'substr(error_message, 1, {ERROR_CHARS})')}"
        f" FROM tasks t WHERE {rows.tasks} ORDER BY seq"
    )
    # A scan in id order: about half the CPU of joining each event to its task.
    reason = _text("json_extract(h.details, '$.reason')")

    def events_sql(part: str) -> str:
        return (
            f"SELECT h.id, h.task_id, {STATUS_PAIR}, {_text('h.worker_id')}, h.at,"
            " CASE WHEN instr(h.details, 'reason') = 0 THEN char(31)"
            f" ELSE {reason} END FROM task_history h WHERE {rows.events}{part} ORDER BY h.id"
        )

    return Reads(
        tasks_sql,
        rows.tasks_params,
        events_sql,
        rows.events_params,
        _sqlite_mark,
        "SELECT (SELECT min(id) FROM task_history), (SELECT max(id) FROM task_history),"
        " (SELECT max(seq) - min(seq) + 1 FROM tasks)",
    )


def read_sqlite_rows(url: str, rows: Selection) -> Raw:
    with _sqlite(url) as session:
        tasks, events = read_tables(session, _sqlite_reads(rows))
    task_columns = _columns(tasks, TASK_FIELDS)
    for i in (TASK_FIELDS.index("worker_id"), TASK_FIELDS.index("error_message")):
        task_columns[i] = _nulled(task_columns[i])
    event_columns = _event_columns(events)
    for i in (EVENT_FIELDS.index("worker_id"), EVENT_FIELDS.index("reason")):
        event_columns[i] = _nulled(event_columns[i])
    return Raw(task_columns, event_columns)


# --- PostgreSQL ---


@contextmanager
def _postgres(url: str) -> Iterator[snapshot.Session]:
    """A read-only repeatable-read session: every query on it, on every cursor, reads one
    snapshot."""
    import adbc_driver_postgresql.dbapi as pg_adbc

    try:
        with snapshot.postgres_session(url) as session:
            yield session
    except pg_adbc.Error as exc:
        raise SourceError(f"source: cannot read the PostgreSQL database: {exc}") from exc


def _epoch_us(column: pa.Array) -> pa.Array:
    return pc.fill_null(column.cast(pa.int64()), NO_TIME)


def postgres_mark(n: int) -> str:
    return f"${n}"


def _same(value: Any) -> Any:
    return value


postgres_instant = _same  # the driver binds datetimes as they are


def read_postgres(url: str, since: datetime | None, until: datetime | None) -> Raw:
    return read_postgres_rows(url, window(since, until, postgres_mark, postgres_instant))


def read_postgres_after(url: str, event_id: int) -> Raw:
    return read_postgres_rows(url, after(event_id, postgres_mark))


def read_postgres_rows(url: str, rows: Selection) -> Raw:
    tasks, events = read_postgres_prepared(url, rows, _same)
    return Raw(tasks, events)


def read_postgres_prepared(
    url: str, rows: Selection, prepare: Callable[[list[Any]], T]
) -> tuple[T, list[Any]]:
    """`prepare` of the task columns, and the history's columns, from one snapshot. The history
    streams on a second connection (on the first one's exported snapshot) while the first reads
    the tasks and `prepare` runs on them: the driver decodes rows without the GIL, so reading the
    history, reading the tasks and building from them share both cores."""
    tasks_sql = (
        f"SELECT seq, id::text, work_directory, left(prompt, {PROMPT_CHARS}), priority,"
        f" tags::text, {code_sql('status', STATUSES)}, worker_id, {', '.join(TIMES)},"
        f" retry_count::bigint, max_retries::bigint, left(error_message, {ERROR_CHARS})"
        f" FROM tasks t WHERE {rows.tasks} ORDER BY seq"
    )
    events_sql = (
        # Task ids as 16-byte uuids, not text: half the bytes to send, and matched to the tasks
        # by the same 16 bytes, which hash in less than half the time of their text.
        f"SELECT h.id, h.task_id, {STATUS_PAIR}, h.worker_id, h.at,"
        f" h.details->>'reason' FROM task_history h WHERE {rows.events} ORDER BY h.id"
    )

    def tasks_part(cursor: Any) -> T:
        columns = _columns(_table(cursor, tasks_sql, rows.tasks_params), TASK_FIELDS)
        for name in TIMES:
            i = TASK_FIELDS.index(name)
            columns[i] = _epoch_us(columns[i])
        return prepare(columns)

    with _postgres(url) as session:
        second = session.another()
        if second is None:
            prepared = tasks_part(session.first)
            events = _table(session.first, events_sql, rows.events_params)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="analytics-read") as pool:
                history = pool.submit(_table, second, events_sql, rows.events_params)
                prepared = tasks_part(session.first)
                events = history.result()
    event_columns = _event_columns(events)
    at = EVENT_FIELDS.index("at")
    event_columns[at] = _epoch_us(event_columns[at])
    return prepared, event_columns
