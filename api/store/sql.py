"""The SQL catalogue: every statement of both stores, written once with `:name` placeholders, and
the small table of what differs between SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from api.core import domain
from api.core.domain import EventFilter, TaskFilter, TaskStatus
from api.jsontext import dumps, loads

TASK_FIELDS = (
    "seq", "id", "work_directory", "prompt", "priority", "tags", "status", "worker_id",
    "created_at", "started_at", "completed_at", "updated_at", "result", "error_message",
    "retry_count", "max_retries", "metadata", "version", "lease_expires_at", "run_after",
    "idempotency_key", "depends_on", "blocked_by", "require_review", "review_feedback",
    "has_dependents", "progress", "progress_message", "log_line_count",
)  # fmt: skip
EVENT_FIELDS = ("id", "task_id", "work_directory", "status", "previous_status", "worker_id", "at",
                "details")  # fmt: skip
DIRECTORY_FIELDS = ("work_directory", "max_working", "paused", "updated_at")
LOG_COLUMNS = "line, text, at"
KEY_FIELDS = ("name", "scopes", "created_at", "last_used_at", "revoked_at", "rate_limit")
TASK_COLUMNS = ", ".join(TASK_FIELDS)
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)
KEY_COLUMNS = ", ".join(KEY_FIELDS)
DIRECTORY_COLUMNS = ", ".join(DIRECTORY_FIELDS)

WAITING, WORKING = TaskStatus.WAITING.value, TaskStatus.WORKING.value
COMPLETED, IN_REVIEW = TaskStatus.COMPLETED.value, TaskStatus.IN_REVIEW.value
UPDATABLE = ", ".join(f"'{s.value}'" for s in domain.UPDATABLE)
FINISHED = ", ".join(f"'{s.value}'" for s in TaskStatus if s.is_final)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int | None) -> datetime | None:
    return None if value is None else _instant(value)


# The rows of a batch share their instants (created, started, updated at one `now`): decoded once.
@functools.lru_cache(maxsize=4096)
def _instant(value: int) -> datetime:
    return _EPOCH + timedelta(0, 0, value)


def _same(value: Any) -> Any:
    return value


def _iso(value: datetime) -> str:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def _maybe(encode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else encode(value)


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the backends: value encodings, locking, and a few SQL forms."""

    name: str
    time: Callable[[Any], Any]  # a datetime (or None) as stored
    time_in_json: Callable[[Any], Any]  # ... as a value inside a JSON parameter
    instant: Callable[[Any], Any]  # ... and back
    json: Callable[[Any], Any]  # a JSON value as stored
    unjson: Callable[[Any], Any]
    skip_locked: str  # appended to a SELECT whose rows the change takes, leaving held rows
    for_update: str  # appended to a SELECT whose row the change decides on
    claim_turn: str  # a statement making claims of one directory take turns ("": not needed)
    has_tag: str  # a clause: the task's tags hold :tag
    pick: str  # a clause: seq is one of the rows the subquery {} picks
    among: str  # a clause: id is one of the list :ids (any length: one parameter)
    types: dict[str, str]  # DDL column types
    notify_logs: str | None  # a statement telling other processes a task's log grew, or None


SQLITE = Dialect(
    name="sqlite",
    time=_maybe(to_us),
    time_in_json=_maybe(to_us),
    instant=from_us,
    json=dumps,
    unjson=_maybe(loads),
    skip_locked="",  # the writer holds the database for the whole transaction
    for_update="",
    claim_turn="",  # the writer holds the database for the whole transaction
    has_tag="EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = :tag)",
    pick="seq IN ({})",
    among="id IN (SELECT value FROM json_each(:ids))",
    types={
        "seq": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "uuid": "TEXT",
        "json": "TEXT",
        "time": "INTEGER",
        "small": "INTEGER",
        "bool": "INTEGER",
        "float": "REAL",
    },
    # Processes sharing the file are told by the event bus's datagrams instead.
    notify_logs=None,
)
POSTGRES = Dialect(
    name="postgres",
    time=_same,
    time_in_json=_maybe(_iso),  # read back with CAST(... AS timestamptz)
    instant=_same,
    json=_same,  # the connection's jsonb codec encodes
    unjson=_same,
    skip_locked=" FOR UPDATE SKIP LOCKED",
    for_update=" FOR UPDATE",
    # An advisory lock, not FOR UPDATE on the controls' row: locking a row gives the transaction
    # its xid at once, and history positions follow xids, so a claim that locked early but
    # counted after a completion committed would be positioned before that completion. Taken
    # without an xid, the claim's xid comes with its UPDATE, after everything it counted.
    claim_turn=(
        "SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(hashtextextended("
        "current_schema() || ':' || :work_directory, 2052849668))) AS turn"
    ),
    has_tag="tags ? :tag",
    # ANY(ARRAY(...)), not IN (...): the planner then reads the picked rows through the primary
    # key instead of hash-joining a scan of the whole table.
    pick="seq = ANY(ARRAY({}))",
    among="id = ANY(CAST(:ids AS uuid[]))",
    types={
        "seq": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "uuid": "UUID",
        "json": "JSONB",
        "time": "TIMESTAMPTZ",
        "small": "SMALLINT",
        "bool": "BOOLEAN",
        "float": "DOUBLE PRECISION",
    },
    # Delivered at commit, to every replica's event listener; the payload is the task id only.
    notify_logs="SELECT pg_notify('taskorch_logs', :task_id)",
)

_NAME = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """`:name` placeholders -> `$1`, `$2`, ... (one number per name) and the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return _NAME.sub(number, sql), tuple(names)


def positional(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    text, names = numbered(sql)
    return text, [params[name] for name in names]


HELD = f"id = :id AND status = '{WORKING}' AND worker_id = :worker_id"


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The statements whose text differs by dialect, for one dialect."""

    dialect: Dialect
    claim: str  # directories without controls only: the hot path, one statement
    claim_controlled: str  # the same, for any directory, once its controls allow `limit` more
    directory_for_claim: str  # the controls a claim decides on
    task_for_change: str  # the row a lifecycle change decides on
    expired: str
    finished: str
    complete: str
    complete_independent: str  # the same, for a task no task depends on (settling nothing)
    complete_many: str  # the same for :items, a JSON array of [id, result as stored] pairs
    lock_dependencies: str  # the tasks a submit depends on (:ids), locked, in seq order
    lock_dependents: str  # tasks to settle, locked, in seq order: {} the ids
    append_logs: str  # the lines :texts (a JSON array) stored as :first, :first + 1, ...
    submit: str  # the tasks :rows (a JSON array of SUBMITTED arrays) inserted in one statement
    submit_one: str  # one task, a parameter per SUBMITTED column: cheaper for a single row


def catalogue(d: Dialect) -> Catalogue:
    picked = (
        f"SELECT seq FROM tasks WHERE status = '{WAITING}' AND work_directory = :work_directory"
        " AND (run_after IS NULL OR run_after <= :now){guard} ORDER BY priority DESC, seq"
        f" LIMIT :limit{d.skip_locked}"
    )
    claim = (
        f"UPDATE tasks SET status = '{WORKING}', worker_id = :worker_id, started_at = :now,"
        " updated_at = :now, lease_expires_at = :lease, version = version + 1,"
        " progress = NULL, progress_message = NULL"
        f" WHERE {d.pick.format(picked)} RETURNING {TASK_COLUMNS}"
    )
    return Catalogue(
        dialect=d,
        # An uncorrelated subquery: both databases evaluate it once per statement, so a directory
        # with no controls pays one primary-key probe; one with controls gets nothing here and
        # takes the controlled path.
        claim=claim.replace("{guard}", f" AND NOT EXISTS ({RESTRICTED})"),
        claim_controlled=claim.replace("{guard}", ""),
        directory_for_claim=(
            f"SELECT {DIRECTORY_COLUMNS} FROM work_directories"
            " WHERE work_directory = :work_directory"
        ),
        task_for_change=f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id{d.for_update}",
        expired=(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = '{WORKING}'"
            " AND lease_expires_at < :now ORDER BY lease_expires_at, seq LIMIT :limit"
            f"{d.skip_locked}"
        ),
        # A failed or cancelled task stays while a task depending on it is stored: a dependency
        # that is gone counts as completed, so pruning it would let a retried dependent run.
        finished=(
            f"SELECT id FROM tasks WHERE status IN ({FINISHED}) AND completed_at < :cutoff"
            f" AND (status = '{COMPLETED}' OR NOT EXISTS (SELECT 1 FROM task_dependencies dep"
            " WHERE dep.depends_on = tasks.id))"
            f" LIMIT :limit{d.skip_locked}"
        ),
        # A task that requires a review waits IN_REVIEW, not yet completed. The cast types :now
        # in the CASE (PostgreSQL would take it for text there).
        complete=_COMPLETE.format(result=":result", time=d.types["time"], items="", held=HELD),
        complete_independent=_COMPLETE.format(
            result=":result", time=d.types["time"], items="", held=f"{HELD} AND has_dependents = 0"
        ),
        complete_many=_COMPLETE.format(
            result=_COMPLETED_RESULT[d.name],
            time=d.types["time"],
            items=_COMPLETED_ITEMS[d.name],
            held=_COMPLETED_HELD[d.name],
        ),
        # Locked in one order (seq) by every transaction, so two never wait on each other.
        lock_dependencies=f"SELECT id, status FROM tasks WHERE {d.among} ORDER BY seq{d.for_update}",
        lock_dependents=f"SELECT {TASK_COLUMNS} FROM tasks WHERE {{}} ORDER BY seq{d.for_update}",
        append_logs=_APPEND_LOGS[d.name],
        submit=(
            f"INSERT INTO tasks ({', '.join(SUBMITTED)}) {_SUBMITTED_ROWS[d.name]}"
            f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {TASK_COLUMNS}"
        ),
        submit_one=(
            f"INSERT INTO tasks ({', '.join(SUBMITTED)})"
            f" VALUES ({', '.join(f':{column}' for column in SUBMITTED)})"
            f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {TASK_COLUMNS}"
        ),
    )


_COMPLETE = (
    f"UPDATE tasks SET status = CASE WHEN require_review = 1 THEN '{IN_REVIEW}'"
    f" ELSE '{COMPLETED}' END, result = {{result}}, updated_at = :now, completed_at = CASE"
    " WHEN require_review = 1 THEN NULL ELSE CAST(:now AS {time}) END,"
    " lease_expires_at = NULL, version = tasks.version + 1{items} WHERE {held}"
    f" RETURNING {TASK_COLUMNS}"
)
# A batch completion is one statement per chunk, joined to its items. PostgreSQL stores a None
# result as NULL, as the one-task statement does (its parameter is NULL, not JSON null).
_COMPLETED_ITEMS = {
    SQLITE.name: " FROM json_each(:items) AS v",
    POSTGRES.name: " FROM jsonb_array_elements(CAST(:items AS jsonb)) AS v(r)",
}
# SQLite's planner would otherwise walk the status index of every WORKING task and scan the items
# for each; `+status` keeps it to the items, each looked up by id.
_COMPLETED_HELD = {
    SQLITE.name: f"tasks.id = v.value ->> 0 AND +status = '{WORKING}' AND worker_id = :worker_id",
    POSTGRES.name: f"tasks.id = CAST(v.r ->> 0 AS uuid) AND status = '{WORKING}'"
    " AND worker_id = :worker_id",
}
_COMPLETED_RESULT = {SQLITE.name: "v.value ->> 1", POSTGRES.name: "NULLIF(v.r -> 1, 'null')"}

# A directory whose controls a claim must look at: paused, or capped.
RESTRICTED = (
    "SELECT 1 FROM work_directories WHERE work_directory = :work_directory"
    " AND (paused OR max_working IS NOT NULL)"
)


# One statement whatever the number of lines, so its text (and plan) is cached once.
_APPEND_LOGS = {
    SQLITE.name: "INSERT INTO task_logs (task_id, line, at, text) SELECT :task_id,"
    " :first + CAST(key AS INTEGER), :at, value FROM json_each(:texts)",
    POSTGRES.name: "INSERT INTO task_logs (task_id, line, at, text) SELECT CAST(:task_id AS uuid),"
    " CAST(:first AS integer) + CAST(t.ord AS integer) - 1, CAST(:at AS timestamptz), t.text"
    " FROM jsonb_array_elements_text(CAST(:texts AS jsonb)) WITH ORDINALITY AS t(text, ord)",
}


# A batch submit inserts a chunk of its tasks per statement (changes.SUBMIT_CHUNK) as one JSON
# array of rows (a row per task, a value per SUBMITTED column), so the statement's text (and plan)
# is the same whatever the chunk's size; a single task uses `submit_one`. The rows go
# in in array order, so seq follows the order of submission. The WHERE is SQLite's: ON CONFLICT
# after a bare SELECT would be read as a join constraint.
SUBMITTED = ("id", "work_directory", "prompt", "priority", "tags", "status", "created_at",
             "updated_at", "max_retries", "metadata", "run_after", "idempotency_key",
             "depends_on", "blocked_by", "require_review")  # fmt: skip
# SQLite stores every value as given (JSON columns as their JSON text); PostgreSQL casts.
_POSTGRES_VALUE = {
    "id": "CAST(r ->> {} AS uuid)", "priority": "CAST(r ->> {} AS smallint)",
    "tags": "r -> {}", "created_at": "CAST(r ->> {} AS timestamptz)",
    "updated_at": "CAST(r ->> {} AS timestamptz)", "max_retries": "CAST(r ->> {} AS integer)",
    "metadata": "r -> {}", "run_after": "CAST(r ->> {} AS timestamptz)",
    "depends_on": "r -> {}", "blocked_by": "r -> {}",
    "require_review": "CAST(r ->> {} AS smallint)",
}  # fmt: skip
_SUBMITTED_ROWS = {
    SQLITE.name: "SELECT "
    + ", ".join(f"value ->> {i}" for i in range(len(SUBMITTED)))
    + " FROM json_each(:rows) WHERE true ORDER BY key",
    POSTGRES.name: "SELECT "
    + ", ".join(_POSTGRES_VALUE.get(c, "r ->> {}").format(i) for i, c in enumerate(SUBMITTED))
    + " FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS t(r, n) ORDER BY n",
}

SQLITE_SQL = catalogue(SQLITE)
POSTGRES_SQL = catalogue(POSTGRES)

GET = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id"
BY_IDEMPOTENCY_KEY = f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = :key"
HISTORY = f"SELECT {EVENT_COLUMNS} FROM task_history WHERE task_id = :task_id ORDER BY id"
LAST_EVENT_ID = "SELECT coalesce(max(id), 0) AS id FROM task_history"
SCHEMA_VERSION_NOW = "SELECT coalesce(max(version), 0) AS version FROM schema_migrations"
NEXT_RUN_AFTER = (
    f"SELECT min(run_after) AS run_after FROM tasks WHERE status = '{WAITING}'"
    " AND work_directory = :work_directory AND run_after > :now"
)
ADD_DEPENDENCY = (
    "INSERT INTO task_dependencies (task_id, depends_on) VALUES (:task_id, :depends_on)"
)
# Tells the hot path (complete, fail) that this task's end settles other tasks; set once.
MARK_DEPENDED_ON = "UPDATE tasks SET has_dependents = 1 WHERE {} AND has_dependents = 0"
DEPENDENTS = "SELECT task_id, depends_on FROM task_dependencies WHERE {}"
# Read after the dependents are locked, in a statement of its own: on PostgreSQL it then sees
# every completion committed before the lock was granted (READ COMMITTED takes a new snapshot
# per statement), so of two transactions completing a task's last two dependencies, the second
# one to lock it sees both done.
UNFINISHED_DEPENDENCIES = (
    "SELECT d.task_id, d.depends_on, t.status FROM task_dependencies d"
    f" JOIN tasks t ON t.id = d.depends_on WHERE {{}} AND t.status <> '{COMPLETED}'"
)
SET_BLOCKED_BY = "UPDATE tasks SET blocked_by = :blocked_by WHERE seq = :seq"
# complete and heartbeat stay one compare-and-set statement each: they are the hot path, and
# what they decide (the holder still holds the task) is the WHERE clause alone.
HEARTBEAT = (
    "UPDATE tasks SET lease_expires_at = :lease, updated_at = :now, version = version + 1"
    f" WHERE {HELD} RETURNING {TASK_COLUMNS}"
)
# Progress is not a status change: no history row; like a heartbeat it extends the lease.
REPORT_PROGRESS = (
    "UPDATE tasks SET progress = coalesce(:progress, progress),"
    " progress_message = coalesce(:message, progress_message), lease_expires_at = :lease,"
    f" updated_at = :now, version = version + 1 WHERE {HELD} RETURNING {TASK_COLUMNS}"
)
# Takes the next line numbers; the row lock it holds until commit orders concurrent appends.
COUNT_LOG_LINES = (
    f"UPDATE tasks SET log_line_count = log_line_count + :count WHERE {HELD}"
    " RETURNING log_line_count"
)
TRIM_LOGS = "DELETE FROM task_logs WHERE task_id = :task_id AND line <= :upto"
LOGS_AFTER = (
    f"SELECT {LOG_COLUMNS} FROM task_logs WHERE task_id = :task_id AND line > :after"
    " ORDER BY line LIMIT :limit"
)
UPDATE = (
    "UPDATE tasks SET prompt = coalesce(:prompt, prompt), priority = coalesce(:priority, priority),"
    " tags = coalesce(:tags, tags), metadata = coalesce(:metadata, metadata),"
    " max_retries = coalesce(:max_retries, max_retries), updated_at = :now,"
    f" version = version + 1 WHERE id = :id AND status IN ({UPDATABLE}) AND version = :version"
    f" RETURNING {TASK_COLUMNS}"
)
# Writes a decided outcome; the version check makes it a compare-and-set on what was decided on.
APPLIED_FIELDS = ("status", "retry_count", "worker_id", "started_at", "completed_at", "run_after",
                  "error_message", "lease_expires_at", "updated_at", "version", "result",
                  "blocked_by", "review_feedback")  # fmt: skip
APPLY = (
    f"UPDATE tasks SET {', '.join(f'{name} = :{name}' for name in APPLIED_FIELDS)}"
    f" WHERE seq = :seq AND version = :expected_version RETURNING {TASK_COLUMNS}"
)
# SQLite writes a commit's history rows with this one statement (executemany), and numbers their
# events from LAST_ROWID: no row is read back.
RECORD = (
    "INSERT INTO task_history (task_id, work_directory, status, previous_status, worker_id, at,"
    " details) VALUES (:task_id, :work_directory, :status, :previous_status, :worker_id, :at,"
    " :details)"
)
LAST_ROWID = "SELECT last_insert_rowid() AS id"
# Counted after the directory's controls are locked, in a statement of its own, so it sees every
# claim committed before the lock was granted.
COUNT_WORKING = (
    f"SELECT count(*) AS n FROM tasks WHERE status = '{WORKING}'"
    " AND work_directory = :work_directory"
)
CONFIGURE = (
    "INSERT INTO work_directories (work_directory, max_working, paused, updated_at) VALUES"
    " (:work_directory, :max_working, coalesce(:paused, FALSE), :now) ON CONFLICT (work_directory)"
    " DO UPDATE SET max_working = CASE WHEN :set_max_working THEN :max_working"
    " ELSE work_directories.max_working END,"
    " paused = coalesce(:paused, work_directories.paused), updated_at = :now"
    f" RETURNING {DIRECTORY_COLUMNS}"
)
DIRECTORY = (
    f"SELECT {DIRECTORY_COLUMNS} FROM work_directories WHERE work_directory = :work_directory"
)
DIRECTORIES = f"SELECT {DIRECTORY_COLUMNS} FROM work_directories"
COUNTS_BY_DIRECTORY = (
    "SELECT work_directory, status, count(*) AS n FROM tasks{where} GROUP BY work_directory, status"
)
INSERT_KEY = (
    "INSERT INTO api_keys (name, key_hash, scopes, created_at, rate_limit) VALUES (:name,"
    f" :key_hash, :scopes, :now, :rate_limit) ON CONFLICT DO NOTHING RETURNING {KEY_COLUMNS}"
)
FIND_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = :key_hash"
LIST_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"
REVOKE_KEY = (
    "UPDATE api_keys SET revoked_at = :now WHERE name = :name AND revoked_at IS NULL"
    f" RETURNING {KEY_COLUMNS}"
)
TOUCH_KEY = "UPDATE api_keys SET last_used_at = :now WHERE key_hash = :key_hash RETURNING name"
ACTIVE_KEYS = "SELECT count(*) AS count FROM api_keys WHERE revoked_at IS NULL"

INSERT_HANDLE = (
    "INSERT INTO task_handles (handle, task_id, owner, created_at)"
    " VALUES (:handle, :task_id, :owner, :now) RETURNING handle"
)
FIND_HANDLE = "SELECT handle, task_id, owner, created_at FROM task_handles WHERE handle = :handle"


def one_of(column: str, name: str, values: Sequence[Any], params: dict[str, Any]) -> str:
    """`column IN (:name0, :name1, ...)`, adding the values to `params`."""
    marks = []
    for index, value in enumerate(values):
        params[f"{name}{index}"] = value
        marks.append(f":{name}{index}")
    return f"{column} IN ({', '.join(marks)})"


def where(clauses: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def task_filter(d: Dialect, filter: TaskFilter, params: dict[str, Any]) -> list[str]:
    clauses: list[str] = []
    if filter.statuses:
        clauses.append(one_of("status", "status", [s.value for s in filter.statuses], params))
    if filter.work_directory is not None:
        clauses.append("work_directory = :work_directory")
        params["work_directory"] = filter.work_directory
    if filter.priority is not None:
        clauses.append("priority = :priority")
        params["priority"] = filter.priority.rank
    if filter.tag is not None:
        clauses.append(d.has_tag)
        params["tag"] = filter.tag
    if filter.created_before is not None:
        clauses.append("created_at < :created_before")
        params["created_before"] = d.time(filter.created_before)
    if filter.created_after is not None:
        clauses.append("created_at > :created_after")
        params["created_after"] = d.time(filter.created_after)
    return clauses


def event_filter(filter: EventFilter, params: dict[str, Any]) -> list[str]:
    clauses = ["id > :after"]
    if filter.task_id is not None:
        clauses.append("task_id = :task_id")
        params["task_id"] = filter.task_id
    if filter.work_directory is not None:
        clauses.append("work_directory = :work_directory")
        params["work_directory"] = filter.work_directory
    if filter.statuses:
        clauses.append(one_of("status", "status", [s.value for s in filter.statuses], params))
    return clauses
