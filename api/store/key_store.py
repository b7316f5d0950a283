"""API keys, stored by hash with one unrevoked key per name: one implementation for both backends
over the SQL catalogue; each backend gives it a way to read and a way to write."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from api.core.domain import ApiKey
from api.store import sql
from api.store.changes import Query
from api.store.rows import Row, key_of
from api.store.sql import Dialect

Run = Callable[[Query], Awaitable[list[Row]]]


class SqlKeyStore:
    def __init__(self, dialect: Dialect, read: Run, write: Run) -> None:
        self._d = dialect
        self._read = read
        self._write = write

    def _key(self, rows: list[Row]) -> ApiKey | None:
        return key_of(self._d, rows[0]) if rows else None

    async def create_key(
        self,
        name: str,
        key_hash: str,
        scopes: Sequence[str],
        now: datetime,
        rate_limit: int | None = None,
    ) -> ApiKey | None:
        params = {"name": name, "key_hash": key_hash, "scopes": ",".join(scopes),
                  "now": self._d.time(now), "rate_limit": rate_limit}  # fmt: skip
        return self._key(await self._write((sql.INSERT_KEY, params)))

    async def find_key(self, key_hash: str) -> ApiKey | None:
        return self._key(await self._read((sql.FIND_KEY, {"key_hash": key_hash})))

    async def list_keys(self) -> list[ApiKey]:
        return [key_of(self._d, row) for row in await self._read((sql.LIST_KEYS, {}))]

    async def revoke_key(self, name: str, now: datetime) -> ApiKey | None:
        params = {"name": name, "now": self._d.time(now)}
        return self._key(await self._write((sql.REVOKE_KEY, params)))

    async def touch_key(self, key_hash: str, now: datetime) -> None:
        await self._write((sql.TOUCH_KEY, {"key_hash": key_hash, "now": self._d.time(now)}))

    async def count_active_keys(self) -> int:
        return int((await self._read((sql.ACTIVE_KEYS, {})))[0]["count"])
