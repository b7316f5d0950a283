"""Database URLs are read one way: the server's settings and the analytics readers agree on them."""

from __future__ import annotations

import pytest

from analytics import SourceError, absolute_url
from analytics.sources import sqlite_path as analytics_sqlite_path
from api.settings import Settings, SettingsError
from api.store.sqlite import SqliteStore

FORMS = [
    ("sqlite:///taskorch.db", "taskorch.db"),
    ("sqlite:////srv/data/taskorch.db", "/srv/data/taskorch.db"),
    ("sqlite:///./taskorch.db", "./taskorch.db"),
    ("sqlite:///sub/dir/x.db", "sub/dir/x.db"),
    ("sqlite:///x.db?mode=ro", "x.db"),
    ("sqlite:////abs/x.db?cache=shared&mode=ro", "/abs/x.db"),
]


@pytest.mark.parametrize(("url", "path"), FORMS)
def test_server_and_analytics_read_the_same_sqlite_file(url: str, path: str) -> None:
    settings = Settings(database_url=url)
    assert settings.backend == "sqlite"
    assert settings.sqlite_path == path
    assert SqliteStore(url).path == path  # the file the server opens
    assert analytics_sqlite_path(url) == path


@pytest.mark.parametrize("url", ["postgresql://u@h:5432/db", "postgres://u@h/db?options=x"])
def test_postgres_urls_name_the_postgres_backend(url: str) -> None:
    settings = Settings(database_url=url)
    assert settings.backend == "postgres"
    with pytest.raises(SettingsError, match="no SQLite file"):
        settings.sqlite_path  # noqa: B018


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///", "in-memory"),
        ("sqlite://taskorch.db", "three slashes"),
        ("sqlite:taskorch.db", "three slashes"),
        ("mysql://u@h/db", "unsupported database URL"),
    ],
)
def test_unusable_urls_are_refused_by_both_naming_the_setting(url: str, advice: str) -> None:
    with pytest.raises(SettingsError, match=f"database_url .*{advice}"):
        Settings(database_url=url)
    if url.startswith("sqlite:"):
        with pytest.raises(SourceError, match=advice):
            analytics_sqlite_path(url)


def test_absolute_url_resolves_a_relative_file_as_the_server_would() -> None:
    base = "/work/notebooks"
    assert absolute_url("sqlite:///./demo.db", base) == "sqlite:////work/notebooks/demo.db"
    assert absolute_url("sqlite:///demo.db?mode=ro", base) == "sqlite:////work/notebooks/demo.db"
    assert absolute_url("sqlite:////srv/demo.db", base) == "sqlite:////srv/demo.db"
    assert absolute_url("http://127.0.0.1:8080", base) == "http://127.0.0.1:8080"
