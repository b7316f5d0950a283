"""Every change of the task store, written once for both backends as a program of statements.

A program yields (statement, parameters), receives the rows, and returns its value with the history
rows it owes; each backend runs it inside one transaction (the SQLite writer on its thread, the
PostgreSQL store on one connection). Lifecycle outcomes are decided by the domain on the row as
read (locked on PostgreSQL), then applied with a compare-and-set on its version."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from api.core import lifecycle
from api.core.domain import MAX_LOG_LINES_KEPT, Completion, Task, TaskChanges, TaskSpec, TaskStatus
from api.core.lifecycle import Outcome
from api.store import sql
from api.store.base import Decide
from api.store.rows import NotAll, Pending, Row, applied, task_of
from api.store.sql import Catalogue

T = TypeVar("T")

Query = tuple[str, dict[str, Any]]
Program = Generator[Query, list[Row], tuple[T, list[Pending]]]


def submit(c: Catalogue, specs: Sequence[TaskSpec], now: datetime) -> Program[list[Task]]:
    d = c.dialect
    tasks: list[Task] = []
    pending: list[Pending] = []
    for spec in specs:
        rows = yield (
            sql.SUBMIT,
            {
                "id": str(uuid.uuid4()),
                "work_directory": spec.work_directory,
                "prompt": spec.prompt,
                "priority": spec.priority.rank,
                "tags": d.json(list(spec.tags)),
                "now": d.time(now),
                "max_retries": spec.max_retries,
                "metadata": d.json(spec.metadata),
                "run_after": d.time(spec.run_after),
                "idempotency_key": spec.idempotency_key,
            },
        )
        if not rows:  # the idempotency key exists: hand back what is stored
            rows = yield sql.BY_IDEMPOTENCY_KEY, {"key": spec.idempotency_key}
            tasks.append(task_of(d, rows[0]))
            continue
        task = task_of(d, rows[0])
        details = {} if task.run_after is None else {"runAfter": task.run_after}
        pending.append((task, None, lifecycle.history_details(details), None))
        tasks.append(task)
    return tasks, pending


def claim(
    c: Catalogue, work_directory: str, worker_id: str, limit: int, lease_until: datetime,
    now: datetime,
) -> Program[list[Task]]:  # fmt: skip
    d = c.dialect
    rows = yield (
        c.claim,
        {
            "worker_id": worker_id,
            "now": d.time(now),
            "lease": d.time(lease_until),
            "work_directory": work_directory,
            "limit": limit,
        },
    )
    tasks = sorted((task_of(c.dialect, r) for r in rows), key=lambda t: (-t.priority.rank, t.seq))
    details = {"leaseExpiresAt": lease_until.isoformat()}
    return tasks, [(t, TaskStatus.WAITING, details, None) for t in tasks]


def complete(
    c: Catalogue, items: Sequence[Completion], worker_id: str, now: datetime
) -> Program[list[Task]]:
    d = c.dialect
    tasks: list[Task] = []
    for item in items:
        params = {"result": d.json(item.result), "now": d.time(now), "id": item.task_id}
        rows = yield sql.COMPLETE, {**params, "worker_id": worker_id}
        if not rows:
            raise NotAll()
        tasks.append(task_of(d, rows[0]))
    return tasks, [(t, TaskStatus.WORKING, {}, None) for t in tasks]


def heartbeat(
    c: Catalogue, task_id: str, worker_id: str, lease_until: datetime, now: datetime
) -> Query:
    d = c.dialect
    params = {"lease": d.time(lease_until), "now": d.time(now), "id": task_id}
    return sql.HEARTBEAT, {**params, "worker_id": worker_id}


def report_progress(
    c: Catalogue,
    task_id: str,
    worker_id: str,
    progress: float | None,
    message: str | None,
    lease_until: datetime,
    now: datetime,
) -> Query:
    d = c.dialect
    return sql.REPORT_PROGRESS, {
        "progress": progress,
        "message": message,
        "lease": d.time(lease_until),
        "now": d.time(now),
        "id": task_id,
        "worker_id": worker_id,
    }


def append_logs(
    c: Catalogue, task_id: str, worker_id: str, lines: Sequence[str], now: datetime
) -> Program[int | None]:
    """Number the lines after the task's last one and store them in one statement. Numbering
    and storing share the transaction, and the task's row stays locked until it commits, so
    concurrent appends get distinct, gap-free numbers and commit in number order."""
    d = c.dialect
    held = {"id": task_id, "worker_id": worker_id}
    rows = yield sql.COUNT_LOG_LINES, {**held, "count": len(lines)}
    if not rows:
        return None, []
    last = int(rows[0]["log_line_count"])
    first = last - len(lines) + 1
    params = {"task_id": task_id, "first": first, "at": d.time(now), "texts": d.json(list(lines))}
    yield c.append_logs, params
    if last > MAX_LOG_LINES_KEPT:  # keep the newest lines: the oldest go, by number
        yield sql.TRIM_LOGS, {"task_id": task_id, "upto": last - MAX_LOG_LINES_KEPT}
    if d.notify_logs is not None:
        yield d.notify_logs, {"task_id": task_id}
    return last, []


def update(
    c: Catalogue, task_id: str, expected_version: int, changes: TaskChanges, now: datetime
) -> Query:
    d = c.dialect
    return sql.UPDATE, {
        "prompt": changes.prompt,
        "priority": None if changes.priority is None else changes.priority.rank,
        "tags": None if changes.tags is None else d.json(list(changes.tags)),
        "metadata": None if changes.metadata is None else d.json(changes.metadata),
        "max_retries": changes.max_retries,
        "now": d.time(now),
        "id": task_id,
        "version": expected_version,
    }


def apply(c: Catalogue, outcome: Outcome) -> Program[Task | None]:
    """Write a decided outcome if the task is still at the version it was decided on."""
    rows = yield sql.APPLY, applied(c.dialect, outcome.task, outcome.expected_version)
    if not rows:
        return None, []
    task = task_of(c.dialect, rows[0])
    details = lifecycle.history_details(outcome.details)
    return task, [(task, outcome.previous, details, outcome.worker_id)]


def decided(c: Catalogue, task_id: str, decide: Decide) -> Program[Task | None]:
    """Read (and on PostgreSQL lock) the task, let the domain decide, apply the outcome."""
    rows = yield c.task_for_change, {"id": task_id}
    outcome = decide(task_of(c.dialect, rows[0])) if rows else None
    if outcome is None:
        return None, []
    return (yield from apply(c, outcome))


def expire_leases(c: Catalogue, now: datetime, limit: int) -> Program[list[Task]]:
    # Every replica sweeps: PostgreSQL skips rows another sweeper holds, and each outcome is a
    # compare-and-set on the version read, so each expiry is applied exactly once.
    rows = yield c.expired, {"now": c.dialect.time(now), "limit": limit}
    tasks: list[Task] = []
    pending: list[Pending] = []
    for row in rows:
        outcome = lifecycle.expire_lease(task_of(c.dialect, row), now)
        if outcome is None:
            continue
        task, owed = yield from apply(c, outcome)
        if task is not None:
            tasks.append(task)
            pending.extend(owed)
    return tasks, pending


def prune(c: Catalogue, finished_before: datetime, limit: int) -> Program[int]:
    rows = yield c.finished, {"cutoff": c.dialect.time(finished_before), "limit": limit}
    if rows:
        ids = [row["id"] for row in rows]
        params: dict[str, Any] = {}
        yield f"DELETE FROM task_history WHERE {sql.one_of('task_id', 'id', ids, params)}", params
        yield f"DELETE FROM task_logs WHERE {sql.one_of('task_id', 'id', ids, params)}", params
        yield f"DELETE FROM tasks WHERE {sql.one_of('id', 'id', ids, params)}", params
    return len(rows), []
