"""Reading a database in parts at once: the parts share one snapshot and join back into the frames
one connection would read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

import analytics
from analytics import databases, snapshot
from api.core.service import TaskService
from api.core.validation import task_spec
from tests.conftest import FakeClock


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
