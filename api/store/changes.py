"""Every change of the task store, written once for both backends as a program of statements.

A program yields (statement, parameters), receives the rows, and returns its value with the history
rows it owes; each backend runs it inside one transaction (the SQLite writer on its thread, the
PostgreSQL store on one connection). Lifecycle outcomes are decided by the domain on the row as
read (locked on PostgreSQL), then applied with a compare-and-set on its version."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from api.core import lifecycle
from api.core.domain import (
    MAX_LOG_LINES_KEPT,
    Completion,
    DirectoryChanges,
    DirectorySettings,
    Task,
    TaskChanges,
    TaskFilter,
    TaskHandle,
    TaskSpec,
    TaskStatus,
)
from api.core.lifecycle import Outcome
from api.store import sql
from api.store.base import BulkDecide, Decide, RefusedDependency
from api.store.rows import NotAll, Pending, Row, applied, directory_of, task_of
from api.store.sql import Catalogue, Dialect

T = TypeVar("T")

Query = tuple[str, dict[str, Any]]
Program = Generator[Query, list[Row], tuple[T, list[Pending]]]


@dataclass(frozen=True, slots=True)
class Recorded:
    """A change made by one statement that returns the tasks it changed, each of which owes one
    history row naming the same previous status and details (and worker, when given; else the
    task's own). SQLite runs the statement in its writer's transaction and writes the rows after
    it; PostgreSQL can write them in the same statement (`pg_schema.with_history`)."""

    query: Query
    previous: TaskStatus | None
    details: dict[str, Any]
    worker_id: str | None = None

    def owed(self, tasks: Sequence[Task]) -> list[Pending]:
        return [(task, self.previous, self.details, self.worker_id) for task in tasks]


@dataclass(frozen=True, slots=True)
class BulkChunk:
    """What one chunk of a bulk change saw and did."""

    ids: list[str]  # the tasks matched, in submission order
    last_seq: int  # where the next chunk starts
    changed: list[Task]
    busy: list[str]  # matched but held by another transaction at that moment (PostgreSQL)


# Tasks inserted by one statement: enough that a batch of 1,000 takes a few statements, few enough
# that the JSON parameter of a chunk of long prompts stays a few megabytes.
SUBMIT_CHUNK = 250
SUBMIT_CHUNK_CHARS = 2_000_000


def submit(c: Catalogue, specs: Sequence[TaskSpec], now: datetime) -> Program[list[Task]]:
    """Insert the tasks in submission order (one statement for one task, else a chunk of rows per
    statement); a spec whose idempotency key is stored already (or was taken by an earlier spec
    of this batch) gets the stored task."""
    d = c.dialect
    statuses = yield from _lock_dependencies(c, specs)
    ids = [str(uuid.uuid4()) for _ in specs]
    inserted: dict[str, Row] = {}
    if len(specs) == 1:
        values = _submitted(d, specs[0], ids[0], statuses, d.time(now), d.time)
        inserted = yield from _inserted(c.submit_one, dict(zip(sql.SUBMITTED, values, strict=True)))
    else:
        at = d.time_in_json(now)
        chunk: list[list[Any]] = []
        chars = 0
        for number, (spec, task_id) in enumerate(zip(specs, ids, strict=True)):
            chunk.append(_submitted(d, spec, task_id, statuses, at, d.time_in_json))
            chars += len(spec.prompt)
            last = number == len(specs) - 1
            if last or len(chunk) == SUBMIT_CHUNK or chars >= SUBMIT_CHUNK_CHARS:
                inserted.update((yield from _inserted(c.submit, {"rows": d.json(chunk)})))
                chunk, chars = [], 0
    tasks: list[Task] = []
    pending: list[Pending] = []
    for spec, task_id in zip(specs, ids, strict=True):
        row = inserted.get(task_id)
        if row is None:  # the idempotency key exists: hand back what is stored
            rows = yield sql.BY_IDEMPOTENCY_KEY, {"key": spec.idempotency_key}
            tasks.append(task_of(d, rows[0]))
            continue
        task = task_of(d, row)
        if spec.depends_on:
            yield from _record_dependencies(task)
        pending.append((task, None, submitted_details(task.run_after, task.blocked_by), None))
        tasks.append(task)
    return tasks, pending


def submit_with_handle(
    c: Catalogue, spec: TaskSpec, now: datetime, handle: str, owner: str
) -> Program[tuple[Task, TaskHandle]]:
    """Submit one task and store a handle for it in the same transaction: a caller promised a
    handle never leaves a task behind without one."""
    (task,), pending = yield from submit(c, [spec], now)
    yield sql.INSERT_HANDLE, {"handle": handle, "task_id": task.id, "owner": owner,
                              "now": c.dialect.time(now)}  # fmt: skip
    return (task, TaskHandle(handle, task.id, owner, now)), pending


def submitted_details(run_after: datetime | None, blocked_by: Sequence[str]) -> dict[str, Any]:
    """The details of a new task's first history row."""
    details: dict[str, object] = {} if run_after is None else {"runAfter": run_after}
    if blocked_by:
        details["blockedBy"] = list(blocked_by)
    return lifecycle.history_details(details)


def submit_alone(c: Catalogue, spec: TaskSpec, now: datetime) -> Recorded:
    """One task without dependencies as one statement; it returns no row when the idempotency
    key is stored already (the `submit` program then hands back the stored task)."""
    d = c.dialect
    values = _submitted(d, spec, str(uuid.uuid4()), {}, d.time(now), d.time)
    params = dict(zip(sql.SUBMITTED, values, strict=True))
    return Recorded((c.submit_one, params), None, submitted_details(spec.run_after, ()))


def _submitted(
    d: Dialect,
    spec: TaskSpec,
    task_id: str,
    statuses: dict[str, TaskStatus],
    at: Any,
    time: Callable[[Any], Any],
) -> list[Any]:
    """A new task's values, in the order of sql.SUBMITTED; `time` encodes run_after like `at`."""
    status = TaskStatus.WAITING
    blocked_by: tuple[str, ...] = ()
    if spec.depends_on:
        status, blocked_by = lifecycle.submitted_status(spec.depends_on, statuses)
    return [
        task_id, spec.work_directory, spec.prompt, spec.priority.rank, d.json(list(spec.tags)),
        status.value, at, at, spec.max_retries, d.json(spec.metadata), time(spec.run_after),
        spec.idempotency_key, d.json(list(spec.depends_on)), d.json(list(blocked_by)),
        int(spec.require_review),
    ]  # fmt: skip


def _inserted(
    statement: str, params: dict[str, Any]
) -> Generator[Query, list[Row], dict[str, Row]]:
    """The rows stored, by task id (RETURNING gives them in no promised order)."""
    rows = yield statement, params
    return {str(row["id"]): row for row in rows}


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
    free = free_claim(c, work_directory, worker_id, limit, lease_until, now)
    rows = yield free.query
    if rows:
        tasks = claim_order([task_of(c.dialect, r) for r in rows])
        return tasks, free.owed(tasks)
    # Nothing claimable, or the directory has controls: they decide.
    found = yield c.directory_for_claim, {"work_directory": work_directory}
    return (yield from controlled_claim(c, free, found))


def free_claim(
    c: Catalogue, work_directory: str, worker_id: str, limit: int, lease_until: datetime,
    now: datetime,
) -> Recorded:  # fmt: skip
    """The claim of a directory without controls, one statement; a directory with controls
    gets nothing from it (`controlled_claim` decides those)."""
    d = c.dialect
    params = {
        "worker_id": worker_id,
        "now": d.time(now),
        "lease": d.time(lease_until),
        "work_directory": work_directory,
        "limit": limit,
    }
    details = {"leaseExpiresAt": lease_until.isoformat()}
    return Recorded((c.claim, params), TaskStatus.WAITING, details)


def claim_order(tasks: list[Task]) -> list[Task]:
    """Claimed tasks as the claim hands them out (and records them): by priority, then seq."""
    return sorted(tasks, key=lambda t: (-t.priority.rank, t.seq))


def controlled_claim(c: Catalogue, free: Recorded, found: list[Row]) -> Program[list[Task]]:
    """The claim `free` under the directory's controls, `found` (its row, read before any lock;
    no row: none). A directory they do not restrict had nothing claimable, and this yields no
    statement. On PostgreSQL claims of a controlled directory take turns (an advisory lock held
    until commit), and each counts the WORKING tasks in a statement that starts after the
    previous claim committed: the cap holds across replicas. SQLite's single writer serialises
    them anyway."""
    settings = directory_of(c.dialect, found[0]) if found else None
    if settings is None or not settings.restricts:
        return [], []
    params = free.query[1]
    wd = {"work_directory": params["work_directory"]}
    working = 0
    if settings.max_working is not None and not settings.paused:
        if c.dialect.claim_turn:
            yield c.dialect.claim_turn, wd
        counted = yield sql.COUNT_WORKING, wd
        working = int(counted[0]["n"])
    allowed = lifecycle.claim_allowance(settings, working, params["limit"])
    if allowed <= 0:
        return [], []
    rows = yield c.claim_controlled, {**params, "limit": allowed}
    tasks = claim_order([task_of(c.dialect, r) for r in rows])
    return tasks, free.owed(tasks)


def configure(
    c: Catalogue, work_directory: str, changes: DirectoryChanges, now: datetime
) -> Program[DirectorySettings]:
    rows = yield (
        sql.CONFIGURE,
        {
            "work_directory": work_directory,
            "max_working": changes.max_working,
            "set_max_working": changes.set_max_working,
            "paused": changes.paused,
            "now": c.dialect.time(now),
        },
    )
    return directory_of(c.dialect, rows[0]), []


COMPLETE_CHUNK = 250  # items a batch completion changes in one statement


def complete(
    c: Catalogue, items: Sequence[Completion], worker_id: str, now: datetime
) -> Program[list[Task]]:
    """Complete every item held by `worker_id`, or raise NotAll (the caller rolls back)."""
    d = c.dialect
    held = {"now": d.time(now), "worker_id": worker_id}
    if len(items) == 1:  # the hot path: one compare-and-set statement on the primary key
        (item,) = items
        rows = yield c.complete, {**held, "id": item.task_id, "result": d.json(item.result)}
    else:
        rows = []
        for start in range(0, len(items), COMPLETE_CHUNK):
            chunk = [[i.task_id, d.json(i.result)] for i in items[start : start + COMPLETE_CHUNK]]
            rows += yield c.complete_many, {**held, "items": d.json(chunk)}
    # Every item or none: one not held (or named twice) leaves a row fewer than items.
    if len(rows) != len(items):
        raise NotAll()
    by_id = {str(row["id"]): row for row in rows}
    tasks = [task_of(d, by_id[item.task_id]) for item in items]
    pending: list[Pending] = [(t, COMPLETED_FROM, {}, None) for t in tasks]
    # Only a task some other task depends on costs more than the one statement.
    if any(lifecycle.settles_dependents(t) for t in tasks):
        pending.extend((yield from settle(c, tasks)))
    return tasks, pending


COMPLETED_FROM = TaskStatus.WORKING  # the previous status a completion's history row names


def complete_alone(c: Catalogue, item: Completion, worker_id: str, now: datetime) -> Recorded:
    """The completion of one held task that no task depends on, one statement; nothing is
    changed (and the `complete` program decides) when it is not held or others depend on it."""
    d = c.dialect
    params = {"now": d.time(now), "worker_id": worker_id, "id": item.task_id,
              "result": d.json(item.result)}  # fmt: skip
    return Recorded((c.complete_independent, params), COMPLETED_FROM, {})


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


def applying(c: Catalogue, outcome: Outcome) -> Recorded:
    """A decided outcome as one compare-and-set statement on the version it was decided on."""
    params = applied(c.dialect, outcome.task, outcome.expected_version)
    details = lifecycle.history_details(outcome.details)
    return Recorded((sql.APPLY, params), outcome.previous, details, outcome.worker_id)


def apply(c: Catalogue, outcome: Outcome) -> Program[Task | None]:
    """Write a decided outcome if the task is still at the version it was decided on."""
    change = applying(c, outcome)
    rows = yield change.query
    if not rows:
        return None, []
    task = task_of(c.dialect, rows[0])
    owed = change.owed([task])
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


def bulk(
    c: Catalogue, where: TaskFilter, after_seq: int, limit: int, decide: BulkDecide
) -> Program[BulkChunk]:
    """One chunk of a bulk change: up to `limit` tasks matching `where` after `after_seq`, each
    decided on as stored and applied with its history row, in this one transaction. The match is
    checked again on the rows as locked; on PostgreSQL a row another transaction holds at that
    moment is left as `busy`, for the caller to change on its own (waiting for it here, with
    other rows locked, could deadlock with a batch completion)."""
    d = c.dialect
    params: dict[str, Any] = {"after": after_seq, "limit": limit}
    clauses = sql.task_filter(d, where, params)
    seen = yield (
        f"SELECT seq, id FROM tasks{sql.where([*clauses, 'seq > :after'])}"
        " ORDER BY seq LIMIT :limit",
        params,
    )
    if not seen:
        return BulkChunk([], 0, [], []), []
    seqs: dict[str, Any] = {}
    locked = yield (
        f"SELECT {sql.TASK_COLUMNS} FROM tasks WHERE {sql.one_of('seq', 'seq', [r['seq'] for r in seen], seqs)}"
        f"{''.join(f' AND {clause}' for clause in clauses)} ORDER BY seq{d.skip_locked}",
        {**params, **seqs},
    )
    changed, pending = yield from _decide_each(c, locked, decide)
    held = {str(r["id"]) for r in locked}
    busy = [str(r["id"]) for r in seen if str(r["id"]) not in held] if d.skip_locked else []
    ids = [str(r["id"]) for r in seen]
    return BulkChunk(ids, int(seen[-1]["seq"]), changed, busy), pending


def bulk_one(
    c: Catalogue, where: TaskFilter, task_id: str, decide: BulkDecide
) -> Program[Task | None]:
    """A bulk change of one task that was busy: waits for its lock, checks the match again."""
    params: dict[str, Any] = {"id": task_id}
    clauses = sql.task_filter(c.dialect, where, params)
    rows = yield (
        f"SELECT {sql.TASK_COLUMNS} FROM tasks{sql.where(['id = :id', *clauses])}"
        f"{c.dialect.for_update}",
        params,
    )
    changed, pending = yield from _decide_each(c, rows, decide)
    return (changed[0] if changed else None), pending


def _decide_each(
    c: Catalogue, rows: list[Row], decide: BulkDecide
) -> Generator[Query, list[Row], tuple[list[Task], list[Pending]]]:
    tasks = [task_of(c.dialect, row) for row in rows]
    # The rows are locked: their dependencies are read after the lock, in a new statement.
    depending = [t.id for t in tasks if t.depends_on]
    unfinished = (yield from _unfinished(c, depending)) if depending else {}
    return (yield from _apply_each(c, tasks, lambda t: decide(t, unfinished.get(t.id, {}))))


def _apply_each(
    c: Catalogue, tasks: list[Task], decide: Decide
) -> Generator[Query, list[Row], tuple[list[Task], list[Pending]]]:
    """Decide on each task as read and apply what is decided; the tasks changed, with their rows."""
    changed: list[Task] = []
    pending: list[Pending] = []
    for task in tasks:
        outcome = decide(task)
        if outcome is None:
            continue
        applied_task, owed = yield from apply(c, outcome)
        if applied_task is not None:
            changed.append(applied_task)
            pending.extend(owed)
    return changed, pending


def expire_leases(c: Catalogue, now: datetime, limit: int) -> Program[list[Task]]:
    # Every replica sweeps: PostgreSQL skips rows another sweeper holds, and each outcome is a
    # compare-and-set on the version read, so each expiry is applied exactly once.
    rows = yield c.expired, {"now": c.dialect.time(now), "limit": limit}
    expiring = [task_of(c.dialect, row) for row in rows]
    return (yield from _apply_each(c, expiring, lambda t: lifecycle.expire_lease(t, now)))


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
        yield f"DELETE FROM task_logs WHERE {sql.one_of('task_id', 'id', ids, params)}", params
        yield f"DELETE FROM tasks WHERE {sql.one_of('id', 'id', ids, params)}", params
    return len(rows), []
