"""`taskorch export`: the analytics frames written as Parquet or CSV files by the real command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

import analytics
from api.core.service import TaskService
from tests.conftest import FakeClock
from tests.test_analytics import fill


def taskorch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=120
    )


async def test_export_writes_parquet_that_reads_back_as_the_loaded_frames(
    database_url: str, service: TaskService, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await fill(service, clock)
    out = tmp_path / "out"
    done = await asyncio.to_thread(
        taskorch, "export", "--database", database_url, "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 task(s)" in done.stdout
    loaded = analytics.load(database_url)
    tasks = pd.read_parquet(out / "tasks.parquet")
    events = pd.read_parquet(out / "events.parquet")
    assert set(tasks["id"]) == {ids["done"], ids["failed"], ids["waiting"]}
    assert len(events) == len(loaded.events)
    assert tasks["created_at"].dt.tz is not None
    assert list(tasks.set_index("id").loc[ids["done"], "tags"]) == ["bug", "ci"]
    assert list(tasks.columns) == list(loaded.tasks.columns)
    assert list(tasks["priority"].cat.categories) == ["LOW", "MEDIUM", "HIGH"]


async def test_export_csv_with_a_window(
    database_url: str, service: TaskService, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await fill(service, clock)
    start = pd.Timestamp(ids["start"])
    since = (start + pd.Timedelta(minutes=30)).isoformat()
    out = tmp_path / "csv"
    done = await asyncio.to_thread(
        taskorch, "export", "--database", database_url, "--output", str(out), "--format", "csv",
        "--since", since,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tasks = pd.read_csv(out / "tasks.csv")
    assert tasks["id"].tolist() == [ids["waiting"]]
    assert json.loads(tasks["tags"].iloc[0]) == []
    events = pd.read_csv(out / "events.csv")
    assert set(events["task_id"]) == {ids["waiting"]}
    assert pd.Timestamp(events["at"].iloc[0]).tzinfo is not None


def test_export_refuses_bad_input_naming_the_flag(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    missing = taskorch("export", "--database", url, "--output", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert "no SQLite database" in missing.stderr
    bad = taskorch("export", "--database", url, "--output", str(tmp_path), "--since", "soon")
    assert bad.returncode == 2
    assert "since must be a time" in bad.stderr
    wrong = taskorch("export", "--output", str(tmp_path), "--format", "xlsx")
    assert wrong.returncode == 2
    assert "--format" in wrong.stderr
