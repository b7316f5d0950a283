"""Benchmark: load and compute the standard metrics over a large SQLite file written directly."""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.store.migrations import SQLITE_MIGRATIONS

DIRECTORIES = ["/srv/api", "/srv/web", "/srv/data-pipeline", "/srv/infra", "/srv/docs"]
TAGS = [["bug"], ["feature"], ["tests"], ["bug", "tests"], ["refactor"], ["docs"], ["flaky"], []]
US = 1_000_000


def build(path: Path, count: int, days: float, seed: int) -> int:
    """Write `count` tasks with a submit / claim / (fail, claim)* / complete-or-fail history."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    for script in SQLITE_MIGRATIONS:
        for statement in script:
            conn.execute(statement)
    start = int((time.time() - days * 86400) * US)
    span = int(days * 86400 * US)
    tags = [json.dumps(t) for t in TAGS]
    events = 0
    conn.execute("BEGIN")
    task_rows, event_rows = [], []
    for n in range(count):
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        directory = DIRECTORIES[n % 5]
        worker = f"agent-{n % 5}-{rng.randint(1, 3)}"
        created = start + rng.randrange(span)
        at = created
        # task_id, work_directory, status, previous_status, worker_id, at, details
        history: list[tuple[str, str, str, str | None, str | None, int, str]] = [
            (task_id, directory, "WAITING", None, None, at, "{}")
        ]
        attempts = 1 + (rng.random() < 0.1) + (rng.random() < 0.02)
        for attempt in range(attempts):
            at += rng.randint(0, 600) * US
            history.append((task_id, directory, "WORKING", "WAITING", worker, at, "{}"))
            started = at
            at += rng.randint(30, 3600) * US
            if attempt < attempts - 1:
                history.append((task_id, directory, "WAITING", "WORKING", worker, at, "{}"))
        status = "FAILED" if rng.random() < 0.03 else "COMPLETED"
        history.append((task_id, directory, status, "WORKING", worker, at, "{}"))
        task_rows.append((
            task_id, directory, "benchmark task", rng.randrange(3), tags[n % len(tags)], status,
            worker, created, started, at, at, attempts - 1,
        ))  # fmt: skip
        event_rows.extend(history)
        if len(task_rows) >= 50_000:
            events += _flush(conn, task_rows, event_rows)
    events += _flush(conn, task_rows, event_rows)
    conn.execute("COMMIT")
    conn.close()
    return events


def _flush(
    conn: sqlite3.Connection, tasks: list[tuple[Any, ...]], events: list[tuple[Any, ...]]
) -> int:
    conn.executemany(
        "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status, worker_id,"
        " created_at, started_at, completed_at, updated_at, retry_count)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        tasks,
    )
    conn.executemany(
        "INSERT INTO task_history (task_id, work_directory, status, previous_status, worker_id,"
        " at, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
        events,
    )
    count = len(events)
    tasks.clear()
    events.clear()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--database", help="existing file to reuse (built when missing)")
    args = parser.parse_args()

    import pandas as pd

    import analytics

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.database) if args.database else Path(tmp) / "bench.db"
        if not path.exists():
            began = time.perf_counter()
            events = build(path, args.tasks, args.days, seed=1)
            print(
                f"built {args.tasks:,} tasks, {events:,} events"
                f" in {time.perf_counter() - began:.1f} s"
            )
        url = f"sqlite:///{path.resolve()}"
        # Wall time, and this process's CPU time: on a shared machine the second is the steadier.
        timings: dict[str, tuple[float, float]] = {}

        began, cpu = time.perf_counter(), time.process_time()
        data = analytics.load(url)
        timings["load (all)"] = (time.perf_counter() - began, time.process_time() - cpu)
        tasks, events_frame = data.tasks, data.events
        since, until = data.window
        steps: dict[str, Callable[[], object]] = {
            "throughput 1h": lambda: analytics.throughput(events_frame, "1h"),
            "latency": lambda: analytics.latency(tasks),
            "latency by directory": lambda: analytics.latency(tasks, by="work_directory"),
            "backlog 1h": lambda: analytics.backlog(events_frame, "1h"),
            "utilisation": lambda: analytics.utilisation(events_frame),
            "failure rates by tag": lambda: analytics.failure_rates(tasks, by="tag"),
            "breakdown by priority": lambda: analytics.breakdown(tasks, "priority"),
            "summary": lambda: analytics.summary(tasks, events_frame, since, until),
        }
        for name, step in steps.items():
            began, cpu = time.perf_counter(), time.process_time()
            step()
            timings[name] = (time.perf_counter() - began, time.process_time() - cpu)
        began, cpu = time.perf_counter(), time.process_time()
        week = analytics.load(url, since=until - pd.Timedelta(days=7))
        timings["load (last 7 days)"] = (time.perf_counter() - began, time.process_time() - cpu)

        print(
            f"{len(tasks):,} tasks, {len(events_frame):,} events"
            f" ({len(week.tasks):,} in the last 7 days)"
        )
        print(f"  {'step':<24} {'wall':>7}   {'cpu':>7}")
        for name, (wall, cpu) in timings.items():
            print(f"  {name:<24} {wall:7.2f} s {cpu:7.2f} s")
        standard = [v for k, v in timings.items() if k != "load (last 7 days)"]
        wall, cpu = sum(w for w, _ in standard), sum(c for _, c in standard)
        print(f"  {'load + all metrics':<24} {wall:7.2f} s {cpu:7.2f} s")
        print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
