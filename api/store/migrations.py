"""Versioned schema migrations, one list per backend; version N is the Nth entry, applied once."""

from __future__ import annotations

_STATUSES = "'WAITING', 'WORKING', 'COMPLETED', 'FAILED', 'CANCELLED'"

SQLITE_MIGRATIONS: list[list[str]] = [
    [
        f"""
        CREATE TABLE tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            work_directory TEXT NOT NULL,
            prompt TEXT NOT NULL,
            priority INTEGER NOT NULL CHECK (priority IN (0, 1, 2)),
            tags TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            worker_id TEXT,
            created_at INTEGER NOT NULL,
            started_at INTEGER,
            completed_at INTEGER,
            updated_at INTEGER NOT NULL,
            result TEXT,
            error_message TEXT,
            retry_count INTEGER NOT NULL DEFAULT 0,
            max_retries INTEGER NOT NULL DEFAULT 3,
            metadata TEXT NOT NULL DEFAULT '{{}}',
            version INTEGER NOT NULL DEFAULT 1,
            lease_expires_at INTEGER,
            run_after INTEGER,
            idempotency_key TEXT UNIQUE
        )
        """,
        # The claim reads this index in order: waiting tasks of one directory, best priority, oldest.
        "CREATE INDEX tasks_claim ON tasks (work_directory, priority DESC, seq)"
        " WHERE status = 'WAITING'",
        "CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 'WORKING'",
        "CREATE INDEX tasks_status ON tasks (status, work_directory)",
        "CREATE INDEX tasks_directory ON tasks (work_directory, seq)",
        "CREATE INDEX tasks_finished ON tasks (completed_at)"
        " WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')",
        f"""
        CREATE TABLE task_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL,
            work_directory TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            previous_status TEXT CHECK (previous_status IN ({_STATUSES})),
            worker_id TEXT,
            at INTEGER NOT NULL,
            details TEXT NOT NULL DEFAULT '{{}}'
        )
        """,
        "CREATE INDEX task_history_task ON task_history (task_id, id)",
        "CREATE INDEX task_history_at ON task_history (at)",
    ],
    [
        """
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER,
            revoked_at INTEGER
        )
        """,
        # A name may be reused once its key is revoked.
        "CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL",
    ],
]

# PostgreSQL: the same tables and columns; native types (uuid, timestamptz, jsonb).
POSTGRES_MIGRATIONS: list[list[str]] = [
    [
        f"""
        CREATE TABLE tasks (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id UUID NOT NULL UNIQUE,
            work_directory TEXT NOT NULL,
            prompt TEXT NOT NULL,
            priority SMALLINT NOT NULL CHECK (priority IN (0, 1, 2)),
            tags JSONB NOT NULL DEFAULT '[]',
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            worker_id TEXT,
            created_at TIMESTAMPTZ NOT NULL,
            started_at TIMESTAMPTZ,
            completed_at TIMESTAMPTZ,
            updated_at TIMESTAMPTZ NOT NULL,
            result JSONB,
            error_message TEXT,
            retry_count INTEGER NOT NULL DEFAULT 0,
            max_retries INTEGER NOT NULL DEFAULT 3,
            metadata JSONB NOT NULL DEFAULT '{{}}',
            version INTEGER NOT NULL DEFAULT 1,
            lease_expires_at TIMESTAMPTZ,
            run_after TIMESTAMPTZ,
            idempotency_key TEXT UNIQUE
        )
        """,
        "CREATE INDEX tasks_claim ON tasks (work_directory, priority DESC, seq)"
        " WHERE status = 'WAITING'",
        "CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 'WORKING'",
        "CREATE INDEX tasks_status ON tasks (status, work_directory)",
        "CREATE INDEX tasks_directory ON tasks (work_directory, seq)",
        "CREATE INDEX tasks_finished ON tasks (completed_at)"
        " WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')",
        "CREATE INDEX tasks_tags ON tasks USING GIN (tags)",
        f"""
        CREATE TABLE task_history (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            task_id UUID NOT NULL,
            work_directory TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            previous_status TEXT CHECK (previous_status IN ({_STATUSES})),
            worker_id TEXT,
            at TIMESTAMPTZ NOT NULL,
            details JSONB NOT NULL DEFAULT '{{}}'
        )
        """,
        "CREATE INDEX task_history_task ON task_history (task_id, id)",
        "CREATE INDEX task_history_at ON task_history (at)",
    ],
    [
        """
        CREATE TABLE api_keys (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            last_used_at TIMESTAMPTZ,
            revoked_at TIMESTAMPTZ
        )
        """,
        "CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL",
    ],
]
