"""Storage backends behind one interface; `open_store` picks one from a database URL."""

from __future__ import annotations

from api.settings import Settings
from api.store.base import TaskStore


def open_store(settings: Settings) -> TaskStore:
    """The store for `settings.database_url` (not yet opened)."""
    url = settings.database_url
    if url.startswith("sqlite:"):
        from api.store.sqlite import SqliteStore

        return SqliteStore(url, durability=settings.durability)
    if url.startswith(("postgresql://", "postgres://")):
        from api.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")
