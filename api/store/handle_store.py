"""MCP task handles: one implementation for both backends over the SQL catalogue."""

from __future__ import annotations

from api.core.domain import TaskHandle
from api.store import sql
from api.store.key_store import Run
from api.store.sql import Dialect


class SqlHandleStore:
    def __init__(self, dialect: Dialect, read: Run, write: Run) -> None:
        self._d = dialect
        self._read = read
        self._write = write

    async def find_handle(self, handle: str) -> TaskHandle | None:
        rows = await self._read((sql.FIND_HANDLE, {"handle": handle}))
        if not rows:
            return None
        row = rows[0]
        created_at = self._d.instant(row["created_at"])
        assert created_at is not None
        return TaskHandle(row["handle"], str(row["task_id"]), row["owner"], created_at)
