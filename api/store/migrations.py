"""Versioned schema migrations: the tables written once, typed per dialect; version N is the Nth
entry, applied once. `pending` is the one rule of which to apply; each backend runs them."""

from __future__ import annotations

from api.store.base import SCHEMA_VERSION
from api.store.sql import FINISHED, POSTGRES, SQLITE, Dialect

_STATUSES = "'WAITING', 'WORKING', 'COMPLETED', 'FAILED', 'CANCELLED'"

# {seq}, {uuid}, {json}, {time} and {small} are the dialect's column types.
_MIGRATIONS: list[list[str]] = [
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
        # The claim reads this index in order: waiting tasks of one directory, best priority, oldest.
        "CREATE INDEX tasks_claim ON tasks (work_directory, priority DESC, seq)"
        " WHERE status = 'WAITING'",
        "CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 'WORKING'",
        "CREATE INDEX tasks_status ON tasks (status, work_directory)",
        "CREATE INDEX tasks_directory ON tasks (work_directory, seq)",
        f"CREATE INDEX tasks_finished ON tasks (completed_at) WHERE status IN ({FINISHED})",
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
        "CREATE INDEX task_history_task ON task_history (task_id, id)",
        "CREATE INDEX task_history_at ON task_history (at)",
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
]

# Only PostgreSQL can index a JSON array's members.
_TAG_INDEX = {SQLITE.name: "", POSTGRES.name: "CREATE INDEX tasks_tags ON tasks USING GIN (tags)"}


def migrations(d: Dialect) -> list[list[str]]:
    types = {**d.types, "tag_index": _TAG_INDEX[d.name]}
    return [[s.format(**types) for s in script if s.format(**types)] for script in _MIGRATIONS]


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
