"""API keys in PostgreSQL: stored by hash, one unrevoked key per name."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from api.domain import ApiKey
from api.store.pg_rows import KEY_COLUMNS, key_row


class PostgresKeys:
    """The API-key half of the PostgreSQL store, and the pool both halves use."""

    _pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def create_key(
        self, name: str, key_hash: str, scopes: Sequence[str], now: datetime
    ) -> ApiKey | None:
        row = await self.pool.fetchrow(
            "INSERT INTO api_keys (name, key_hash, scopes, created_at) VALUES ($1, $2, $3, $4)"
            f" ON CONFLICT DO NOTHING RETURNING {KEY_COLUMNS}",
            name,
            key_hash,
            ",".join(scopes),
            now,
        )
        return None if row is None else key_row(row)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        row = await self.pool.fetchrow(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash
        )
        return None if row is None else key_row(row)

    async def list_keys(self) -> list[ApiKey]:
        rows = await self.pool.fetch(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id")
        return [key_row(r) for r in rows]

    async def revoke_key(self, name: str, now: datetime) -> ApiKey | None:
        row = await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"
            f" RETURNING {KEY_COLUMNS}",
            now,
            name,
        )
        return None if row is None else key_row(row)

    async def touch_key(self, key_hash: str, now: datetime) -> None:
        await self.pool.execute(
            "UPDATE api_keys SET last_used_at = $1 WHERE key_hash = $2", now, key_hash
        )

    async def count_active_keys(self) -> int:
        return int(
            await self.pool.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        )
