"""SQLite backup and restore: online copies, and restores that check before they replace."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api.database_url import DatabaseUrlError, backend_of, sqlite_path
from api.store.base import SCHEMA_VERSION

REQUIRED_TABLES = ("schema_migrations", "tasks", "task_history")


class BackupError(Exception):
    """The backup or restore was refused or failed; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Summary:
    path: str
    schema_version: int
    tasks: int
    events: int
    size_bytes: int


def database_file(url: str, action: str) -> Path:
    try:
        backend = backend_of(url)
    except DatabaseUrlError as exc:
        raise BackupError(str(exc)) from None
    if backend == "postgres":
        tool = "pg_dump --format=custom" if action == "backup" else "pg_restore"
        raise BackupError(
            f"{action} works on SQLite databases only; for PostgreSQL use {tool}"
            " (see the Operations section of the README)"
        )
    try:
        return Path(sqlite_path(url))
    except DatabaseUrlError as exc:
        raise BackupError(str(exc)) from None


def _temp_next_to(path: Path) -> Path:
    # Same directory, so the final os.replace is an atomic rename on one file system.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: sqlite3.Connection, target: Path) -> None:
    """One step of the online backup API: it reads one snapshot of the source, so the copy is
    consistent, and in WAL mode writers carry on while it runs."""
    destination = sqlite3.connect(target)
    try:
        source.backup(destination)
        # A single self-contained file: no -wal beside it to lose when the backup is moved.
        destination.execute("PRAGMA journal_mode = DELETE").fetchone()
    finally:
        destination.close()


def inspect(path: Path) -> Summary:
    """Check that `path` is an intact taskorch database this version can serve."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupError(f"{path} cannot be opened as a SQLite database: {exc}") from None
    try:
        try:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(10)")]
        except sqlite3.DatabaseError as exc:  # too damaged for the check to finish
            problems = [str(exc)]
        if problems != ["ok"]:
            raise BackupError(f"{path} failed the integrity check: {'; '.join(problems)}")
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise BackupError(
                f"{path} is not a taskorch database: it has no {', '.join(missing)} table"
            )
        version = conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()[0]
        if not 1 <= version <= SCHEMA_VERSION:
            raise BackupError(
                f"{path} has schema version {version}; this taskorch understands 1 to"
                f" {SCHEMA_VERSION} (upgrade taskorch to restore a newer backup)"
            )
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM task_history").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a readable SQLite database: {exc}") from None
    finally:
        conn.close()
    return Summary(str(path), version, tasks, events, path.stat().st_size)


def _check_writable(destination: Path) -> None:
    """Refuse a destination the copy could not be written to, naming it and why, before the
    copy starts: SQLite itself only says "unable to open database file"."""
    folder = destination.parent
    cannot = f"cannot write the backup to {destination}:"
    if destination.is_dir():
        raise BackupError(f"{cannot} it is a folder; give a file path inside it")
    if not folder.exists():
        raise BackupError(f"{cannot} the folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise BackupError(f"{cannot} {folder} is not a folder")
    probe = _temp_next_to(destination)
    try:
        probe.touch()
    except OSError as exc:  # not writable, read-only file system, out of space...
        raise BackupError(
            f"{cannot} the folder {folder} is not writable ({exc.strerror})"
        ) from None
    probe.unlink()


def backup(url: str, destination: Path) -> Summary:
    """Copy the live database at `url` to `destination` (written atomically) and check the copy."""
    source_path = database_file(url, "backup")
    if not source_path.is_file():
        raise BackupError(f"there is no database at {source_path}")
    if destination.exists() and destination.resolve() == source_path.resolve():
        raise BackupError("the backup path is the database itself; give another path")
    _check_writable(destination)
    temp = _temp_next_to(destination)
    _remove(temp)
    try:
        source = sqlite3.connect(source_path, timeout=10)
        try:
            _copy(source, temp)
        finally:
            source.close()
        summary = inspect(temp)
        _fsync(temp)
        os.replace(temp, destination)
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {source_path} failed: {exc}") from None
    finally:
        _remove(temp)
    return dataclasses.replace(
        summary, path=str(destination), size_bytes=destination.stat().st_size
    )


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[sqlite3.Connection | None]:
    """Hold the current database exclusively, or refuse: a WAL database can leave WAL mode only
    when no other connection has it open, which is how a running server is detected."""
    if not target.exists():
        yield None
        return
    conn = sqlite3.connect(target, timeout=0, isolation_level=None)
    try:
        try:
            conn.execute("PRAGMA journal_mode = DELETE").fetchone()
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as exc:
            raise BackupError(
                f"{target} is in use ({exc}): stop the server (and any other taskorch command"
                " using it) before restoring"
            ) from None
        except sqlite3.DatabaseError:  # the current file is damaged: replacing it is the point
            yield None
            return
        yield conn
    finally:
        conn.close()


def restore(source: Path, url: str) -> Summary:
    """Replace the database at `url` with the backup at `source`, only if the backup checks out.

    The backup is copied next to the target and checked there; only then is it renamed over the
    target, so a refused or interrupted restore leaves the current database as it was."""
    target = database_file(url, "restore")
    if not source.is_file():
        raise BackupError(f"there is no backup file at {source}")
    inspect(source)
    temp = _temp_next_to(target)
    _remove(temp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            _copy(reader, temp)
        finally:
            reader.close()
        summary = inspect(temp)
        _fsync(temp)
        with _exclusive(target):
            # A stale WAL next to the new file would be replayed into it; none may survive.
            Path(f"{target}-wal").unlink(missing_ok=True)
            Path(f"{target}-shm").unlink(missing_ok=True)
            os.replace(temp, target)
    except sqlite3.Error as exc:
        raise BackupError(f"restore from {source} failed: {exc}") from None
    finally:
        _remove(temp)
    return dataclasses.replace(summary, path=str(target), size_bytes=target.stat().st_size)
