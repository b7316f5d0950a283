"""Storage backends behind one interface; `open_store` picks the one the settings name."""

from __future__ import annotations

from api.settings import Settings
from api.store.base import TaskStore


def open_store(settings: Settings) -> TaskStore:
    """The store for `settings.database_url` (not yet opened)."""
    if settings.backend == "postgres":
        from api.store.postgres import PostgresStore

        return PostgresStore(settings.database_url)
    from api.store.sqlite import SqliteStore

    return SqliteStore(settings.database_url, durability=settings.durability)
