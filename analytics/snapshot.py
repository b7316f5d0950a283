"""Read-only database sessions that see one snapshot, and further connections on that same
snapshot, so a large table can be read in parts at once and still give one consistent picture."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

# What pg_export_snapshot() returns, e.g. 00000003-0000001B-1; checked before it is put in SQL.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(-[0-9A-F]+)+")


class Session(ABC):
    """`first`: a cursor whose transaction holds the snapshot; `another()` opens one more cursor
    on the same snapshot, or answers None when it cannot (the caller then reads on `first`)."""

    def __init__(self, first: Any) -> None:
        self.first = first

    @abstractmethod
    def another(self) -> Any | None: ...


class _SqliteSession(Session):
    # SQLite cannot hand a snapshot to another connection. A second connection sees the same one
    # when nothing committed between the first's start and its own: PRAGMA data_version on a
    # third connection, in autocommit mode, changes exactly when another connection commits.
    # It is the driver's own SQLite too: a second SQLite library in the process (the standard
    # sqlite3 module's) does not share its file locks and sees spurious changes.
    def __init__(self, uri: str, stack: ExitStack) -> None:
        import adbc_driver_sqlite.dbapi as sqlite_adbc

        self._uri = uri
        self._stack = stack
        monitor = stack.enter_context(sqlite_adbc.connect(uri, autocommit=True))
        self._monitor: Any = stack.enter_context(monitor.cursor())
        self._version = self._data_version()
        super().__init__(self._open())

    def _data_version(self) -> int:
        self._monitor.execute("PRAGMA data_version")
        (version,) = self._monitor.fetchall()[0]
        return int(version)

    def _open(self) -> Any:
        import adbc_driver_sqlite.dbapi as sqlite_adbc

        conn = self._stack.enter_context(sqlite_adbc.connect(self._uri))
        cur = self._stack.enter_context(conn.cursor())
        # Row batches of 64k instead of 1k: fewer Arrow chunks to join afterwards.
        cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": "65536"})
        cur.execute("PRAGMA busy_timeout = 10000")
        # The driver keeps a transaction open (autocommit is off); its first read fixes the
        # snapshot every later query on this cursor sees.
        cur.execute("SELECT count(*) FROM sqlite_master")
        cur.fetchall()
        return cur

    def another(self) -> Any | None:
        cur = self._open()
        return cur if self._data_version() == self._version else None


class _PostgresSession(Session):
    # The first transaction exports its snapshot; another connection adopts it with SET
    # TRANSACTION SNAPSHOT as its transaction's first statement, and then sees exactly what the
    # first one sees, whatever commits in between.
    def __init__(self, url: str, stack: ExitStack) -> None:
        self._url = url
        self._stack = stack
        first = self._open()
        self._exported = self._export(first)
        super().__init__(first)

    def _open(self, exported: str | None = None) -> Any:
        import adbc_driver_postgresql.dbapi as pg_adbc

        conn = self._stack.enter_context(pg_adbc.connect(self._url, autocommit=True))
        cur = self._stack.enter_context(conn.cursor())
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._stack.callback(cur.execute, "ROLLBACK")
        if exported is not None:
            cur.execute(f"SET TRANSACTION SNAPSHOT '{exported}'")
        return cur

    @staticmethod
    def _export(cur: Any) -> str | None:
        """The snapshot's id for other sessions, taken as the transaction's first statement; None
        when the server cannot export one (a standby): the transaction then starts again, and
        everything is read on this one connection."""
        import adbc_driver_postgresql.dbapi as pg_adbc

        try:
            cur.execute("SELECT pg_export_snapshot()")
            exported = str(cur.fetchall()[0][0])
        except pg_adbc.Error:
            cur.execute("ROLLBACK")
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return None
        return exported if _SNAPSHOT_ID.fullmatch(exported) else None

    def another(self) -> Any | None:
        return None if self._exported is None else self._open(self._exported)


@contextmanager
def sqlite_session(uri: str) -> Iterator[Session]:
    """A read-only session on the SQLite database at `uri` (a `file:...?mode=ro` URI)."""
    with ExitStack() as stack:
        yield _SqliteSession(uri, stack)


@contextmanager
def postgres_session(url: str) -> Iterator[Session]:
    """A read-only repeatable-read session on the PostgreSQL database at `url`."""
    with ExitStack() as stack:
        yield _PostgresSession(url, stack)
