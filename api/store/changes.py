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
from api.core.domain import Completion, Task, TaskChanges, TaskSpec, TaskStatus
from api.core.lifecycle import Outcome
from api.store import sql
from api.store.base import Decide, RefusedDependency
from api.store.rows import NotAll, Pending, Row, applied, task_of
from api.store.sql import Catalogue

T = TypeVar("T")

Query = tuple[str, dict[str, Any]]
Program = Generator[Query, list[Row], tuple[T, list[Pending]]]


def submit(c: Catalogue, specs: Sequence[TaskSpec], now: datetime) -> Program[list[Task]]:
    d = c.dialect
    tasks: list[Task] = []
    pending: list[Pending] = []
    statuses = yield from _lock_dependencies(c, specs)
    for spec in specs:
        status = TaskStatus.WAITING
        blocked_by: tuple[str, ...] = ()
        if spec.depends_on:
            status, blocked_by = lifecycle.submitted_status(spec.depends_on, statuses)
        rows = yield (
            sql.SUBMIT,
            {
                "id": str(uuid.uuid4()),
                "work_directory": spec.work_directory,
                "prompt": spec.prompt,
                "priority": spec.priority.rank,
                "tags": d.json(list(spec.tags)),
                "status": status.value,
                "now": d.time(now),
                "max_retries": spec.max_retries,
                "metadata": d.json(spec.metadata),
                "run_after": d.time(spec.run_after),
                "idempotency_key": spec.idempotency_key,
                "depends_on": d.json(list(spec.depends_on)),
                "blocked_by": d.json(list(blocked_by)),
                "require_review": int(spec.require_review),
            },
        )
        if not rows:  # the idempotency key exists: hand back what is stored
            rows = yield sql.BY_IDEMPOTENCY_KEY, {"key": spec.idempotency_key}
            tasks.append(task_of(d, rows[0]))
            continue
        task = task_of(d, rows[0])
        if spec.depends_on:
            yield from _record_dependencies(task)
        details: dict[str, object] = {} if task.run_after is None else {"runAfter": task.run_after}
        if task.blocked_by:
            details["blockedBy"] = list(task.blocked_by)
        pending.append((task, None, lifecycle.history_details(details), None))
        tasks.append(task)
    return tasks, pending


def _lock_dependencies(
    c: Catalogue, specs: Sequence[TaskSpec]
) -> Generator[Query, list[Row], dict[str, TaskStatus]]:
    """Lock every task the new ones depend on, in one statement (in seq order, so this never
    waits in a cycle with a change that locks dependents), and refuse a missing or failed one. A
    failure or completion of a dependency then waits for this commit, and sees the new tasks."""
    wanted = list(dict.fromkeys(d for spec in specs for d in spec.depends_on))
    if not wanted:
        return {}
    # The list as one parameter: a JSON array on SQLite, an array on PostgreSQL.
    rows = yield c.lock_dependencies, {"ids": c.dialect.json(wanted)}
    statuses = {str(row["id"]): TaskStatus(row["status"]) for row in rows}
    for number, spec in enumerate(specs):
        for index, task_id in enumerate(spec.depends_on):
            if lifecycle.refuses_dependency(statuses.get(task_id)):
                raise RefusedDependency(number, index, task_id, statuses.get(task_id))
    return statuses


def _record_dependencies(task: Task) -> Generator[Query, list[Row], None]:
    for dependency in task.depends_on:
        yield sql.ADD_DEPENDENCY, {"task_id": task.id, "depends_on": dependency}
    params: dict[str, Any] = {}
    yield sql.MARK_DEPENDED_ON.format(sql.one_of("id", "dep", task.depends_on, params)), params


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
        rows = yield c.complete, {**params, "worker_id": worker_id}
        if not rows:
            raise NotAll()
        tasks.append(task_of(d, rows[0]))
    pending: list[Pending] = [(t, TaskStatus.WORKING, {}, None) for t in tasks]
    # Only a task some other task depends on costs more than the one statement.
    if any(lifecycle.settles_dependents(t) for t in tasks):
        pending.extend((yield from settle(c, tasks)))
    return tasks, pending


def heartbeat(
    c: Catalogue, task_id: str, worker_id: str, lease_until: datetime, now: datetime
) -> Query:
    d = c.dialect
    params = {"lease": d.time(lease_until), "now": d.time(now), "id": task_id}
    return sql.HEARTBEAT, {**params, "worker_id": worker_id}


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
    owed: list[Pending] = [(task, outcome.previous, details, outcome.worker_id)]
    if lifecycle.settles_dependents(task):
        owed.extend((yield from settle(c, [task])))
    return task, owed


def decided(c: Catalogue, task_id: str, decide: Decide) -> Program[Task | None]:
    """Read (and on PostgreSQL lock) the task, let the domain decide, apply the outcome."""
    rows = yield c.task_for_change, {"id": task_id}
    outcome = decide(task_of(c.dialect, rows[0])) if rows else None
    if outcome is None:
        return None, []
    return (yield from apply(c, outcome))


def retry(c: Catalogue, task_id: str, now: datetime) -> Program[Task | None]:
    """Retry a task; one with dependencies is decided on them as they are once it is locked."""
    rows = yield c.task_for_change, {"id": task_id}
    if not rows:
        return None, []
    task = task_of(c.dialect, rows[0])
    unfinished: dict[str, TaskStatus] = {}
    if task.depends_on:
        unfinished = (yield from _unfinished(c, [task.id])).get(task.id, {})
    outcome = lifecycle.retry(task, now, unfinished)
    if outcome is None:
        return None, []
    return (yield from apply(c, outcome))


def _unfinished(
    c: Catalogue, task_ids: Sequence[str]
) -> Generator[Query, list[Row], dict[str, dict[str, TaskStatus]]]:
    """Each task's dependencies that are not COMPLETED, with their status."""
    params: dict[str, Any] = {}
    rows = yield (
        sql.UNFINISHED_DEPENDENCIES.format(sql.one_of("d.task_id", "t", task_ids, params)),
        params,
    )
    found: dict[str, dict[str, TaskStatus]] = {}
    for row in rows:
        found.setdefault(str(row["task_id"]), {})[str(row["depends_on"])] = TaskStatus(
            row["status"]
        )
    return found


def settle(c: Catalogue, ended: Sequence[Task]) -> Generator[Query, list[Row], list[Pending]]:
    """The dependents of tasks that just ended: a completion unblocks those whose dependencies
    all completed; a failure or cancellation cancels them, and theirs after them."""
    d = c.dialect
    owed: list[Pending] = []
    frontier = [t for t in ended if lifecycle.settles_dependents(t)]
    while frontier:
        by_id = {t.id: t for t in frontier}
        params: dict[str, Any] = {}
        links = yield (
            sql.DEPENDENTS.format(sql.one_of("depends_on", "dep", list(by_id), params)),
            params,
        )
        via: dict[str, list[str]] = {}
        for link in links:
            via.setdefault(str(link["task_id"]), []).append(str(link["depends_on"]))
        frontier = []
        if not via:
            break
        params = {}
        rows = yield c.lock_dependents.format(sql.one_of("id", "dep", list(via), params)), params
        dependents = [task_of(d, row) for row in rows]
        unfinished = yield from _unfinished(c, [t.id for t in dependents])
        for dependent in dependents:
            failed = next((i for i in via[dependent.id] if by_id[i].status.is_unsuccessful), None)
            now = by_id[via[dependent.id][0]].updated_at
            if failed is not None:
                outcome = lifecycle.dependency_failed(dependent, failed, now)
            else:
                outcome = lifecycle.unblock(dependent, unfinished.get(dependent.id, {}), now)
            if outcome is not None:
                rows = yield sql.APPLY, applied(d, outcome.task, outcome.expected_version)
                changed = task_of(d, rows[0])  # locked above: the version cannot have moved
                details = lifecycle.history_details(outcome.details)
                owed.append((changed, outcome.previous, details, outcome.worker_id))
                if lifecycle.settles_dependents(changed):
                    frontier.append(changed)
                continue
            blocked_by = lifecycle.still_blocked_by(dependent, unfinished.get(dependent.id, {}))
            if blocked_by != dependent.blocked_by:
                yield sql.SET_BLOCKED_BY, {"blocked_by": d.json(list(blocked_by)),
                                           "seq": dependent.seq}  # fmt: skip
    return owed


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
        yield f"DELETE FROM task_handles WHERE {sql.one_of('task_id', 'id', ids, params)}", params
        yield (
            f"DELETE FROM task_dependencies WHERE {sql.one_of('task_id', 'id', ids, params)}",
            params,
        )
        yield f"DELETE FROM tasks WHERE {sql.one_of('id', 'id', ids, params)}", params
    return len(rows), []
