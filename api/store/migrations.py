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
]
