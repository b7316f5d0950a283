"""Database URLs: which backend a URL names, and the file a SQLite URL points at.

Pure and import-free, so the settings, the stores, the backup tool and the analytics readers all
read a URL the same way."""

from __future__ import annotations

from typing import Literal

Backend = Literal["sqlite", "postgres"]

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
FORMS = "sqlite:///relative.db, sqlite:////absolute/path.db or postgresql://USER@HOST:PORT/DB"


class DatabaseUrlError(ValueError):
    """The URL names no backend taskorch has, or no file it can share; the message says why."""


def backend_of(url: str) -> Backend:
    """`sqlite:...` -> "sqlite"; `postgresql://...` or `postgres://...` -> "postgres"."""
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith(POSTGRES_PREFIXES):
        return "postgres"
    raise DatabaseUrlError(f"unsupported database URL: use {FORMS}")


def sqlite_path(url: str) -> str:
    """The file of a SQLite URL, as given (relative paths stay relative to the working directory):
    `sqlite:///rel.db` -> `rel.db`, `sqlite:///./rel.db` -> `./rel.db`, `sqlite:////abs.db` ->
    `/abs.db`. A query (`?mode=ro`) is not part of the file name and is ignored."""
    if not url.startswith(SQLITE_PREFIX):
        raise DatabaseUrlError(
            "a SQLite URL has three slashes before the path: use sqlite:///relative.db or"
            " sqlite:////absolute/path.db"
        )
    path = url[len(SQLITE_PREFIX) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise DatabaseUrlError(
            "an in-memory SQLite database cannot be shared; give a file path, e.g."
            " sqlite:///taskorch.db"
        )
    return path
