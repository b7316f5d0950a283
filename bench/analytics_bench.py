"""Benchmark: load and compute the standard metrics over a large SQLite file written directly."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, its own folder would come first on the path, and bench/http.py would hide the
# standard library's http package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.store.migrations import CREATE_VERSIONS, RECORD_VERSION, SQLITE_MIGRATIONS  # noqa: E402
from api.store.sql import SQLITE  # noqa: E402

DIRECTORIES = ["/srv/api", "/srv/web", "/srv/data-pipeline", "/srv/infra", "/srv/docs"]
TAGS = [["bug"], ["feature"], ["tests"], ["bug", "tests"], ["refactor"], ["docs"], ["flaky"], []]
US = 1_000_000


def build(path: Path, count: int, days: float, seed: int) -> int:
    """Write `count` tasks with a submit / claim / (fail, claim)* / complete-or-fail history."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute(CREATE_VERSIONS.format(**SQLITE.types))
    for version, script in enumerate(SQLITE_MIGRATIONS, start=1):
        for statement in script:
            conn.execute(statement)
        # recorded, so a server can open the file
        conn.execute(RECORD_VERSION, {"version": version, "now": int(time.time() * US)})
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


def _migrate_postgres(url: str) -> None:
    """The server's own schema upgrade (asyncpg runs each migration's several statements)."""
    import asyncio

    import asyncpg

    from api.store.pg_schema import migrate

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())


SCHEMA = "analytics_bench"


def _schema_url(url: str, schema: str) -> str:
    return f"{url}?options=-c%20search_path%3D{schema}"


def _holds_tasks(url: str) -> bool:
    """Whether the schema of `url` already holds a copied benchmark (its tasks table has rows)."""
    import adbc_driver_postgresql.dbapi as pg_adbc

    try:
        with pg_adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM (SELECT 1 FROM tasks LIMIT 1) AS one")
            (count,) = cur.fetchall()[0]
    except pg_adbc.Error:
        return False
    return bool(count)


def copy_to_postgres(path: Path, url: str, schema: str) -> str:
    """The SQLite file's tasks and history copied into a fresh PostgreSQL schema (binary COPY
    through ADBC); returns the URL that reads that schema."""
    import adbc_driver_postgresql.dbapi as pg_adbc
    import adbc_driver_sqlite.dbapi as sqlite_adbc

    with pg_adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        cur.execute(f"CREATE SCHEMA {schema}")
    schema_url = _schema_url(url, schema)
    _migrate_postgres(schema_url)
    with pg_adbc.connect(schema_url, autocommit=True) as conn, conn.cursor() as cur:
        with sqlite_adbc.connect(str(path)) as lite, lite.cursor() as read:
            read.execute(
                "SELECT id, work_directory, prompt, priority, tags, status, worker_id, created_at,"
                " started_at, completed_at, updated_at, retry_count FROM tasks ORDER BY seq"
            )
            cur.adbc_ingest("tasks_stage", read.fetch_arrow_table(), mode="create")
            read.execute(
                "SELECT id, task_id, work_directory, status, ifnull(previous_status, ''),"
                " ifnull(worker_id, ''), at, details FROM task_history ORDER BY id"
            )
            cur.adbc_ingest("history_stage", read.fetch_arrow_table(), mode="create")

        def time(column: str) -> str:
            return f"to_timestamp({column} / 1e6)"

        cur.execute(
            "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status, worker_id,"
            " created_at, started_at, completed_at, updated_at, retry_count)"
            " SELECT id::uuid, work_directory, prompt, priority, tags::jsonb, status, worker_id,"
            f" {time('created_at')}, {time('started_at')}, {time('completed_at')},"
            f" {time('updated_at')}, retry_count FROM tasks_stage"
        )
        # Rows copied with their ids: on PostgreSQL a history row's id is its delivery position,
        # which the server's stamper gives only to rows it wrote itself.
        cur.execute(
            "INSERT INTO task_history (id, task_id, work_directory, status, previous_status,"
            " worker_id, at, details) SELECT id, task_id::uuid, work_directory, status,"
            " nullif(\"ifnull(previous_status, '')\", ''), nullif(\"ifnull(worker_id, '')\", ''),"
            f" {time('at')}, details::jsonb FROM history_stage"
        )
        cur.execute("DROP TABLE tasks_stage, history_stage")
        cur.execute("ANALYZE")
    return schema_url


Timings = dict[str, tuple[float, float, float]]
# The targets: (what, limit), checked against the figures of this run.
LOAD_TARGET_S = 5.0
METRICS_TARGET_S = 1.0
SERVER_TARGET_S = 10.0
MEMORY_TARGET_MB = 2048


def timed(timings: Timings, name: str, step: Callable[[], Any]) -> Any:
    # Wall time, this process's CPU time (on a shared machine the steadier of the two), and the
    # cores that everything else on the machine kept busy meanwhile (a database server too).
    from bench.servers import machine_busy_seconds

    began, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_seconds()
    value = step()
    wall, own = time.perf_counter() - began, time.process_time() - cpu
    others = max(0.0, machine_busy_seconds() - busy - own) / wall if wall > 0 else 0.0
    timings[name] = (wall, own, others)
    return value


def verdicts(timings: Timings, peak_mb: float) -> list[str]:
    """Each target with this run's figure (wall time) and whether it is met."""
    checks: list[tuple[str, float, float, str]] = []
    for prefix in ("sqlite", "postgres"):
        load = timings.get(f"{prefix} load (all)")
        if load is not None:
            checks.append((f"{prefix} load (all)", load[0], LOAD_TARGET_S, "s"))
        standard = [v[0] for k, v in timings.items() if k.startswith(prefix) and "load" not in k]
        if standard:
            checks.append((f"{prefix} all metrics", sum(standard), METRICS_TARGET_S, "s"))
    if "server load (all)" in timings:
        checks.append(("server load (all)", timings["server load (all)"][0], SERVER_TARGET_S, "s"))
    checks.append(("peak memory", peak_mb, MEMORY_TARGET_MB, "MB"))
    return [
        f"  {name:<34} {value:9.2f} {unit:<2} target <= {limit:g} {unit}:"
        f" {'met' if value <= limit else f'missed by {value - limit:.2f} {unit}'}"
        for name, value, limit, unit in checks
    ]


def metrics(url: str, timings: Timings, prefix: str) -> str:
    """Load everything, compute the standard metrics, load the last week; a line of counts."""
    import pandas as pd

    import analytics

    data = timed(timings, f"{prefix} load (all)", lambda: analytics.load(url))
    tasks, events = data.tasks, data.events
    since, until = data.window
    steps: dict[str, Callable[[], object]] = {
        "throughput 1h": lambda: analytics.throughput(events, "1h"),
        "latency": lambda: analytics.latency(tasks),
        "latency by directory": lambda: analytics.latency(tasks, by="work_directory"),
        "backlog 1h": lambda: analytics.backlog(events, "1h"),
        "utilisation": lambda: analytics.utilisation(events),
        "failure rates by tag": lambda: analytics.failure_rates(tasks, by="tag"),
        "breakdown by priority": lambda: analytics.breakdown(tasks, "priority"),
        "summary": lambda: analytics.summary(tasks, events, since, until),
    }
    for name, step in steps.items():
        timed(timings, f"{prefix} {name}", step)
    week = timed(
        timings,
        f"{prefix} load (last 7 days)",
        lambda: analytics.load(url, since=until - pd.Timedelta(days=7)),
    )
    return (
        f"{prefix}: {len(tasks):,} tasks, {len(events):,} events"
        f" ({len(week.tasks):,} in the last 7 days)"
    )


def server_load(path: Path, count: int, days: float, workdir: Path, timings: Timings) -> str:
    """Load `count` tasks from a running server over GraphQL."""
    import analytics
    from bench.servers import taskorch_server

    small = workdir / "server.db"
    if not small.exists():
        build(small, count, days, seed=2)
    server = taskorch_server(f"sqlite:///{small}", "normal", workdir)
    server.start()
    try:
        server.wait_ready()
        data = timed(timings, "server load (all)", lambda: analytics.load(server.url))
    finally:
        server.stop()
    return f"server: {len(data.tasks):,} tasks, {len(data.events):,} events"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--database", help="existing file to reuse (built when missing)")
    parser.add_argument(
        "--postgres", help="also copy the data into this PostgreSQL database and load from it"
    )
    parser.add_argument(
        "--reuse-postgres",
        action="store_true",
        help="load the PostgreSQL schema an earlier run copied, instead of copying again",
    )
    parser.add_argument(
        "--server-tasks", type=int, default=0, help="also load this many tasks from a server"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every step this many times and report each step's median (by wall time)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.database) if args.database else Path(tmp) / "bench.db"
        if not path.exists():
            began = time.perf_counter()
            events = build(path, args.tasks, args.days, seed=1)
            print(
                f"built {args.tasks:,} tasks, {events:,} events"
                f" in {time.perf_counter() - began:.1f} s"
            )
        url = None
        if args.postgres:
            url = _schema_url(args.postgres, SCHEMA)
            if not (args.reuse_postgres and _holds_tasks(url)):
                began = time.perf_counter()
                url = copy_to_postgres(path, args.postgres, SCHEMA)
                print(f"copied into PostgreSQL in {time.perf_counter() - began:.1f} s")
        runs: list[Timings] = []
        for _ in range(max(1, args.repeat)):
            timings: Timings = {}
            lines = [metrics(f"sqlite:///{path.resolve()}", timings, "sqlite")]
            if url is not None:
                lines.append(metrics(url, timings, "postgres"))
            if args.server_tasks:
                lines.append(server_load(path, args.server_tasks, args.days, Path(tmp), timings))
            runs.append(timings)
        timings = {name: statistics.median_low([run[name] for run in runs]) for name in runs[0]}

        print("\n".join(lines))
        if len(runs) > 1:
            print(f"medians of {len(runs)} runs (by wall time):")
        print(f"  {'step':<34} {'wall':>7}   {'cpu':>7}   {'others':>6}        walls of every run")
        for name, (wall, cpu, others) in timings.items():
            walls = ", ".join(f"{run[name][0]:.2f}" for run in runs) if len(runs) > 1 else ""
            print(f"  {name:<34} {wall:7.2f} s {cpu:7.2f} s {others:6.2f} cores  {walls}")
        for prefix in ("sqlite", "postgres"):
            standard = [v for k, v in timings.items() if k.startswith(prefix) and "load" not in k]
            if standard:
                print(
                    f"  {prefix + ' all metrics':<34} {sum(v[0] for v in standard):7.2f} s"
                    f" {sum(v[1] for v in standard):7.2f} s"
                )
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak memory of this process: {peak_mb:,.0f} MB")
        print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print("targets (wall time):")
        print("\n".join(verdicts(timings, peak_mb)))


if __name__ == "__main__":
    main()
