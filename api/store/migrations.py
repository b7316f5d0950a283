"""Versioned schema migrations: the tables written once, typed per dialect; version N is the Nth
entry, applied once. `pending` is the one rule of which to apply; each backend runs them."""

from __future__ import annotations

from api.store.base import SCHEMA_VERSION
from api.store.sql import FINISHED, POSTGRES, SQLITE, Dialect

_STATUSES = "'WAITING', 'WORKING', 'COMPLETED', 'FAILED', 'CANCELLED'"
_STATUSES_5 = f"{_STATUSES}, 'BLOCKED', 'IN_REVIEW'"

# A statement is SQL for both dialects, or (dialect name, SQL) for that dialect only.
Statement = str | tuple[str, str]

_TASK_COLUMNS_4 = (
    "seq, id, work_directory, prompt, priority, tags, status, worker_id, created_at, started_at,"
    " completed_at, updated_at, result, error_message, retry_count, max_retries, metadata,"
    " version, lease_expires_at, run_after, idempotency_key"
)
_HISTORY_COLUMNS = "id, task_id, work_directory, status, previous_status, worker_id, at, details"
# The indexes of version 1, made again when SQLite rebuilds a table.
_TASK_INDEXES = [
    # The claim reads this index in order: waiting tasks of one directory, best priority, oldest.
    "CREATE INDEX tasks_claim ON tasks (work_directory, priority DESC, seq)"
    " WHERE status = 'WAITING'",
    "CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 'WORKING'",
    "CREATE INDEX tasks_status ON tasks (status, work_directory)",
    "CREATE INDEX tasks_directory ON tasks (work_directory, seq)",
    f"CREATE INDEX tasks_finished ON tasks (completed_at) WHERE status IN ({FINISHED})",
]
_HISTORY_INDEXES = [
    "CREATE INDEX task_history_task ON task_history (task_id, id)",
    "CREATE INDEX task_history_at ON task_history (at)",
]


def _sqlite_rebuild(table: str, create: str, columns: str, indexes: list[str]) -> list[Statement]:
    """SQLite cannot alter a CHECK constraint: build the table anew, copy every row (ids and
    seq as they are), keep its AUTOINCREMENT counter, swap it in and index it again."""
    new = f"{table}_new"
    created = create.format(table=new).replace("{", "{{").replace("}", "}}")  # formatted again
    return [
        (SQLITE.name, created),
        (SQLITE.name, f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {table}"),
        (SQLITE.name, f"DELETE FROM sqlite_sequence WHERE name = '{new}'"),
        (SQLITE.name, f"UPDATE sqlite_sequence SET name = '{new}' WHERE name = '{table}'"),
        (SQLITE.name, f"DROP TABLE {table}"),
        (SQLITE.name, f"ALTER TABLE {new} RENAME TO {table}"),
        *((SQLITE.name, index) for index in indexes),
    ]


def _pg_widen(table: str, column: str) -> Statement:
    constraint = f"{table}_{column}_check"
    return (
        POSTGRES.name,
        f"ALTER TABLE {table} DROP CONSTRAINT {constraint}, ADD CONSTRAINT {constraint}"
        f" CHECK ({column} IN ({_STATUSES_5}))",
    )


_TASKS_5 = f"""
    CREATE TABLE {{table}} (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        work_directory TEXT NOT NULL,
        prompt TEXT NOT NULL,
        priority INTEGER NOT NULL CHECK (priority IN (0, 1, 2)),
        tags TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL CHECK (status IN ({_STATUSES_5})),
        worker_id TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        completed_at INTEGER,
        updated_at INTEGER NOT NULL,
        result TEXT,
        error_message TEXT,
        retry_count INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL DEFAULT 3,
        metadata TEXT NOT NULL DEFAULT '{{{{}}}}',
        version INTEGER NOT NULL DEFAULT 1,
        lease_expires_at INTEGER,
        run_after INTEGER,
        idempotency_key TEXT UNIQUE,
        depends_on TEXT NOT NULL DEFAULT '[]',
        blocked_by TEXT NOT NULL DEFAULT '[]',
        require_review INTEGER NOT NULL DEFAULT 0,
        review_feedback TEXT,
        has_dependents INTEGER NOT NULL DEFAULT 0
    )
"""
_HISTORY_5 = f"""
    CREATE TABLE {{table}} (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        work_directory TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({_STATUSES_5})),
        previous_status TEXT CHECK (previous_status IN ({_STATUSES_5})),
        worker_id TEXT,
        at INTEGER NOT NULL,
        details TEXT NOT NULL DEFAULT '{{{{}}}}'
    )
"""

# {seq}, {uuid}, {json}, {time} and {small} are the dialect's column types.
_MIGRATIONS: list[list[Statement]] = [
    [
        f"""
        CREATE TABLE tasks (
            seq {{seq}},
            id {{uuid}} NOT NULL UNIQUE,
            work_directory TEXT NOT NULL,
            prompt TEXT NOT NULL,
            priority {{small}} NOT NULL CHECK (priority IN (0, 1, 2)),
            tags {{json}} NOT NULL DEFAULT '[]',
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            worker_id TEXT,
            created_at {{time}} NOT NULL,
            started_at {{time}},
            completed_at {{time}},
            updated_at {{time}} NOT NULL,
            result {{json}},
            error_message TEXT,
            retry_count INTEGER NOT NULL DEFAULT 0,
            max_retries INTEGER NOT NULL DEFAULT 3,
            metadata {{json}} NOT NULL DEFAULT '{{{{}}}}',
            version INTEGER NOT NULL DEFAULT 1,
            lease_expires_at {{time}},
            run_after {{time}},
            idempotency_key TEXT UNIQUE
        )
        """,
        *_TASK_INDEXES,
        "{tag_index}",
        f"""
        CREATE TABLE task_history (
            id {{seq}},
            task_id {{uuid}} NOT NULL,
            work_directory TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            previous_status TEXT CHECK (previous_status IN ({_STATUSES})),
            worker_id TEXT,
            at {{time}} NOT NULL,
            details {{json}} NOT NULL DEFAULT '{{{{}}}}'
        )
        """,
        *_HISTORY_INDEXES,
    ],
    [
        """
        CREATE TABLE api_keys (
            id {seq},
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            created_at {time} NOT NULL,
            last_used_at {time},
            revoked_at {time}
        )
        """,
        # A name may be reused once its key is revoked.
        "CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL",
    ],
    # A key's own requests a minute; NULL (every key made before) keeps the server's default.
    ["ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER"],
    ["{history_positions}"],
    # Dependencies and review gates: statuses BLOCKED and IN_REVIEW, the columns they need, and
    # which task depends on which (read both ways: a task's dependencies, a task's dependents).
    [
        *_sqlite_rebuild("tasks", _TASKS_5, _TASK_COLUMNS_4, _TASK_INDEXES),
        *_sqlite_rebuild("task_history", _HISTORY_5, _HISTORY_COLUMNS, _HISTORY_INDEXES),
        _pg_widen("tasks", "status"),
        _pg_widen("task_history", "status"),
        _pg_widen("task_history", "previous_status"),
        *(
            (POSTGRES.name, f"ALTER TABLE tasks ADD COLUMN {column}")
            for column in (
                "depends_on JSONB NOT NULL DEFAULT '[]'",
                "blocked_by JSONB NOT NULL DEFAULT '[]'",
                "require_review SMALLINT NOT NULL DEFAULT 0",
                "review_feedback TEXT",
                "has_dependents SMALLINT NOT NULL DEFAULT 0",
            )
        ),
        """
        CREATE TABLE task_dependencies (
            task_id {uuid} NOT NULL,
            depends_on {uuid} NOT NULL,
            PRIMARY KEY (task_id, depends_on)
        )
        """,
        "CREATE INDEX task_dependencies_dependents ON task_dependencies (depends_on, task_id)",
    ],
    # MCP task handles: an unguessable name for a task, bound to the key that created it.
    [
        """
        CREATE TABLE task_handles (
            handle TEXT PRIMARY KEY,
            task_id {uuid} NOT NULL,
            owner TEXT NOT NULL,
            created_at {time} NOT NULL
        )
        """,
        "CREATE INDEX task_handles_task ON task_handles (task_id)",
    ],
    # Work-directory controls; a directory without a row has no cap and is not paused.
    [
        """
        CREATE TABLE work_directories (
            work_directory TEXT PRIMARY KEY,
            max_working INTEGER CHECK (max_working IS NULL OR max_working >= 1),
            paused {bool} NOT NULL DEFAULT FALSE,
            updated_at {time} NOT NULL
        )
        """,
    ],
    # Progress and logs of held tasks. `log_line_count` numbers each task's lines; the rows of a
    # task's log are deleted with the task.
    [
        "ALTER TABLE tasks ADD COLUMN progress {float}",
        "ALTER TABLE tasks ADD COLUMN progress_message TEXT",
        "ALTER TABLE tasks ADD COLUMN log_line_count INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE task_logs (
            task_id {uuid} NOT NULL,
            line INTEGER NOT NULL,
            at {time} NOT NULL,
            text TEXT NOT NULL,
            PRIMARY KEY (task_id, line)
        )
        """,
    ],
]

# Only PostgreSQL can index a JSON array's members.
_TAG_INDEX = {SQLITE.name: "", POSTGRES.name: "CREATE INDEX tasks_tags ON tasks USING GIN (tags)"}


# PostgreSQL writers insert history rows without any lock; a row's id is then its delivery
# position, given by the stamper once every transaction that could precede the row has ended
# (api/store/stamper.py). `entry` is the insertion order, `xid` the writing transaction. Ids
# already given stay as they are; SQLite's single writer orders ids itself.
_HISTORY_POSITIONS = {
    SQLITE.name: "",
    POSTGRES.name: """
        ALTER TABLE task_history ALTER COLUMN id DROP IDENTITY;
        ALTER TABLE task_history DROP CONSTRAINT task_history_pkey;
        ALTER TABLE task_history ALTER COLUMN id DROP NOT NULL;
        CREATE UNIQUE INDEX task_history_id ON task_history (id);
        ALTER TABLE task_history ADD COLUMN entry BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
        ALTER TABLE task_history ADD COLUMN xid xid8;
        ALTER TABLE task_history ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
        CREATE INDEX task_history_unstamped ON task_history (xid, entry) WHERE id IS NULL;
    """,
}


def _for(d: Dialect, statement: Statement) -> str:
    if isinstance(statement, tuple):
        return statement[1] if statement[0] == d.name else ""
    return statement


def migrations(d: Dialect) -> list[list[str]]:
    types = {
        **d.types,
        "tag_index": _TAG_INDEX[d.name],
        "history_positions": _HISTORY_POSITIONS[d.name],
    }
    scripts = [[_for(d, s).format(**types) for s in script] for script in _MIGRATIONS]
    return [[s for s in script if s] for script in scripts]


SQLITE_MIGRATIONS = migrations(SQLITE)
POSTGRES_MIGRATIONS = migrations(POSTGRES)

CREATE_VERSIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations"
    " (version INTEGER PRIMARY KEY, applied_at {time} NOT NULL)"
)
RECORD_VERSION = "INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :now)"


def pending(d: Dialect, current: int) -> list[tuple[int, list[str]]]:
    """The migrations a database at schema version `current` still needs, in order."""
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database has schema version {current}, newer than this taskorch"
            f" ({SCHEMA_VERSION}); upgrade taskorch"
        )
    return [(v, script) for v, script in enumerate(migrations(d), start=1) if v > current]
