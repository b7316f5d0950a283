"""`taskorch demo`: a realistic simulated workload written through the real service."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

import analytics
from api.cli.demo import run_demo


def taskorch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_command_fills_an_empty_database_and_refuses_a_full_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    done = taskorch("demo", "--database", url, "--tasks", "400", "--days", "3")
    assert done.returncode == 0, done.stderr
    assert "simulated 400 tasks" in done.stdout

    data = analytics.load(url)
    tasks, events = data.tasks, data.events
    assert len(tasks) == 400
    assert tasks["work_directory"].nunique() >= 4
    assert events["worker_id"].nunique() >= 8
    assert set(tasks["priority"].unique()) == {"LOW", "MEDIUM", "HIGH"}
    assert tasks["tags"].map(len).min() >= 1
    assert {"COMPLETED", "FAILED"} <= set(tasks["status"].astype(str))
    assert (tasks["attempts"] > 1).any()  # retries
    assert tasks["lease_expiries"].sum() > 0  # a worker died and its lease ran out
    span = tasks["created_at"].max() - tasks["created_at"].min()
    assert span > pd.Timedelta(days=2)
    assert events["at"].max() <= pd.Timestamp.now(tz="UTC")

    again = taskorch("demo", "--database", url, "--tasks", "10")
    assert again.returncode == 2
    assert "already holds 400 tasks" in again.stderr


def test_demo_rejects_a_bad_task_count(tmp_path: Path) -> None:
    done = taskorch("demo", "--database", f"sqlite:///{tmp_path / 'x.db'}", "--tasks", "0")
    assert done.returncode == 2
    assert "--tasks" in done.stderr


async def test_demo_runs_on_every_backend(database_url: str) -> None:
    end = datetime(2030, 1, 8, tzinfo=UTC)
    report = await run_demo(database_url, 60, days=1, end=end, seed=7)
    assert sum(report.counts.values()) == 60
    data = analytics.load(database_url)
    assert len(data.tasks) == 60
    assert data.events["at"].max() <= pd.Timestamp(end)
    assert data.events["at"].min() >= pd.Timestamp(end) - pd.Timedelta(days=1)


async def test_demo_ends_with_no_task_left_working_and_reports_round_progress(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    lines: list[str] = []
    end = datetime(2030, 1, 8, tzinfo=UTC)
    report = await run_demo(url, 3000, days=0.1, end=end, seed=3, progress=lines.append)
    assert [line.split(" of ")[0] for line in lines] == ["1,000", "2,000", "3,000"], lines
    assert report.counts["WORKING"] == 0, report.counts
    assert report.counts["WAITING"] > 0  # the queue was busy: what was left runs tomorrow
    data = analytics.load(url)
    runs = analytics.attempts(data.events)
    assert (runs["outcome"] != "WORKING").all()  # every claim ended: completed, failed, released
    assert (runs["reason"] == "released").any()
