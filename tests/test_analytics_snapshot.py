"""Reading a database in parts at once: the parts share one snapshot and join back into the frames
one connection would read."""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import adbc_driver_postgresql.dbapi as pg_adbc
import pandas as pd
import pyarrow as pa
import pytest

import analytics
from analytics import databases, snapshot
from api.core.service import TaskService
from api.core.validation import task_spec
from tests.conftest import FakeClock

# the module (the package's `load` attribute is the function)
load_module = importlib.import_module("analytics.load")


async def fill(service: TaskService, clock: FakeClock, count: int) -> None:
    """`count` tasks, each submitted, claimed and completed or failed: three events apiece."""
    for n in range(count):
        await service.submit(
            task_spec(work_directory=f"/repo{n % 3}", prompt=f"task {n}", max_retries=0)
        )
    for n in range(count):
        clock.advance(1)
        (task,) = await service.claim(f"/repo{n % 3}", f"w{n % 2}")
        if n % 4:
            await service.complete(task.id, f"w{n % 2}", {"n": n})
        else:
            await service.fail(task.id, f"w{n % 2}", "broken")
    # On PostgreSQL an event gets its position a moment after its commit; reading the last
    # change's history waits for it, and every earlier change is positioned before it.
    assert len(await service.history(task.id)) == 3


def test_the_second_connection_reads_the_later_part() -> None:
    # Large enough: two parts of about equal cost, the tasks counting twice per row.
    assert databases.split_point(1, 1_000_000, 100_000) == 1_000_001 - 600_000
    # Too small, or the tasks alone outweigh the history: one connection reads everything.
    assert databases.split_point(1, databases.SPLIT_EVENTS - 1, 10) is None
    assert databases.split_point(1, 1_000_000, 600_000) is None


async def test_history_read_in_two_parts_gives_the_frames_of_one_read(
    database_url: str, service: TaskService, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(service, clock, 40)
    whole = analytics.load(database_url)
    monkeypatch.setattr(databases, "SPLIT_EVENTS", 1)
    monkeypatch.setattr(databases, "TASK_WEIGHT", 1)
    parts = analytics.load(database_url)
    assert len(parts.events) == 40 * 3
    pd.testing.assert_frame_equal(parts.tasks, whole.tasks)
    pd.testing.assert_frame_equal(parts.events, whole.events)
    since = whole.events["at"].iloc[60]
    window = analytics.load(database_url, since=since)
    assert len(window.tasks) < 40
    expected = whole.events[whole.events["task_id"].isin(window.tasks["id"])]
    for name in ("id", "task_id", "status", "previous_status", "worker_id", "at"):
        assert window.events[name].astype(object).tolist() == expected[name].astype(object).tolist()


def _sqlite_file(path: Path) -> sqlite3.Connection:
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE rows (n INTEGER)")
    writer.execute("INSERT INTO rows VALUES (1)")
    return writer


def _count(cursor: object) -> int:
    cursor.execute("SELECT count(*) FROM rows")  # type: ignore[attr-defined]
    return int(cursor.fetchone()[0])  # type: ignore[attr-defined]


def test_a_second_sqlite_connection_joins_only_an_unchanged_snapshot(tmp_path: Path) -> None:
    writer = _sqlite_file(tmp_path / "rows.db")
    uri = f"file:{tmp_path / 'rows.db'}?mode=ro"
    with snapshot.sqlite_session(uri) as session:
        second = session.another()
        assert second is not None
        writer.execute("INSERT INTO rows VALUES (2)")
        assert _count(session.first) == _count(second) == 1
    with snapshot.sqlite_session(uri) as session:
        writer.execute("INSERT INTO rows VALUES (3)")
        # A commit since the first connection's snapshot: no second one on it.
        assert session.another() is None
        assert _count(session.first) == 2
    writer.close()


def test_a_second_postgres_connection_reads_the_first_ones_snapshot(postgres_url: str) -> None:
    with pg_adbc.connect(postgres_url, autocommit=True) as conn, conn.cursor() as writer:
        writer.execute("CREATE TABLE rows (n INTEGER)")
        writer.execute("INSERT INTO rows VALUES (1)")
        with snapshot.postgres_session(postgres_url) as session:
            assert _count(session.first) == 1
            writer.execute("INSERT INTO rows VALUES (2)")
            second = session.another()
            assert second is not None
            assert _count(second) == 1
            writer.execute("INSERT INTO rows VALUES (3)")
            assert _count(session.first) == _count(second) == 1
        assert _count(writer) == 3


async def test_postgres_tasks_and_history_read_at_once_see_one_snapshot(
    database_url: str, service: TaskService, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not database_url.startswith("postgres"):
        pytest.skip("exported snapshots are PostgreSQL's; SQLite has its own test above")
    await fill(service, clock, 5)
    loop = asyncio.get_running_loop()
    written = threading.Event()
    late: list[str] = []

    async def write() -> None:
        task = await service.submit(task_spec(work_directory="/late", prompt="late"))
        assert len(await service.history(task.id)) == 1  # positioned: readable from now on
        late.append(task.id)

    task_frame = load_module._task_frame

    def write_after_the_tasks(columns: list[Any]) -> Any:
        # The tasks are read; a task and its event are committed before the history is read.
        asyncio.run_coroutine_threadsafe(write(), loop).result(30)
        written.set()
        return task_frame(columns)

    table = databases._table

    def history_after_the_write(cursor: Any, sql: str, params: list[Any]) -> Any:
        if "FROM task_history h" in sql:
            assert written.wait(30)
        return table(cursor, sql, params)

    monkeypatch.setattr(load_module, "_task_frame", write_after_the_tasks)
    monkeypatch.setattr(databases, "_table", history_after_the_write)
    data = await asyncio.to_thread(analytics.load, database_url)
    assert late
    assert len(data.tasks) == 5
    assert len(data.events) == 5 * 3  # not the late task's submission
    assert (data.events["task_id"].cat.codes >= 0).all()
    monkeypatch.undo()
    after = await asyncio.to_thread(analytics.load, database_url)
    assert late[0] in set(after.tasks["id"])
    assert len(after.events) == 5 * 3 + 1


def test_text_uuids_become_their_sixteen_bytes_in_either_case() -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    text = pa.chunked_array(
        [pa.array([str(i) for i in ids[:2]]), pa.array([str(i).upper() for i in ids[2:]])]
    )
    assert load_module.uuid_bytes(text).to_pylist() == [i.bytes for i in ids]
    assert load_module.uuid_bytes(text[1:4]).to_pylist() == [i.bytes for i in ids[1:4]]
    # An id of another shape matches no uuid; the others still convert.
    odd = load_module.uuid_bytes(pa.array([str(ids[0]), "not-a-uuid", None]))
    assert odd.to_pylist() == [ids[0].bytes, b"\xff" * 16, b"\xff" * 16]
