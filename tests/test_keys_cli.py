"""`taskorch keys create|list|revoke` as an operator runs them: a separate process on a database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from api.security.keys import hash_key
from api.settings import Settings
from api.store import open_store
from api.store.base import SCHEMA_VERSION
from api.store.migrations import SQLITE_MIGRATIONS


def taskorch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=60
    )


async def test_create_prints_only_the_raw_key_and_stores_only_its_hash(database_url: str) -> None:
    done = taskorch(
        "keys", "create", "--name", "ci", "--scopes", "submit,work,read", "--database", database_url
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tko_")
    assert len(lines[0]) > 40
    raw = lines[0]

    store = open_store(Settings(database_url=database_url))
    await store.open()
    try:
        key = await store.keys.find_key(hash_key(raw))
        assert key is not None
        assert key.name == "ci"
        assert set(key.scopes) == {"read", "submit", "work"}
        assert await store.keys.find_key(raw) is None  # the raw key itself is not what is stored
    finally:
        await store.close()


def test_list_and_revoke(database_url: str) -> None:
    for name, scopes in (("reader", "read"), ("boss", "admin")):
        made = taskorch(
            "keys", "create", "--name", name, "--scopes", scopes, "--database", database_url
        )
        assert made.returncode == 0, made.stderr

    revoked = taskorch("keys", "revoke", "reader", "--database", database_url)
    assert revoked.returncode == 0, revoked.stderr

    listed = taskorch("keys", "list", "--database", database_url)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "SCOPES", "CREATED", "LAST", "USED", "REVOKED"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["reader"][1] == "read"
    assert by_name["reader"][-1] != "-"
    assert by_name["boss"][1] == "admin"
    assert by_name["boss"][-1] == "-"
    assert "tko_" not in listed.stdout

    again = taskorch("keys", "revoke", "reader", "--database", database_url)
    assert again.returncode == 1
    assert "reader" in again.stderr


def test_unknown_scope_exits_2_naming_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    done = taskorch(
        "keys", "create", "--name", "x", "--scopes", "read,superuser", "--database", url
    )
    assert done.returncode == 2
    assert "superuser" in done.stderr
    assert done.stdout == ""


def test_bad_name_exits_2_and_duplicate_active_name_exits_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    bad = taskorch("keys", "create", "--name", "has space", "--scopes", "read", "--database", url)
    assert bad.returncode == 2
    assert "name" in bad.stderr
    assert (
        taskorch("keys", "create", "--name", "a", "--scopes", "read", "--database", url).returncode
        == 0
    )
    dup = taskorch("keys", "create", "--name", "a", "--scopes", "read", "--database", url)
    assert dup.returncode == 1
    assert "'a'" in dup.stderr


async def test_create_migrates_an_older_database_first(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # a database as the first release left it
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
        )
        for statement in SQLITE_MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
    conn.close()
    url = f"sqlite:///{path}"
    done = taskorch("keys", "create", "--name", "a", "--scopes", "work", "--database", url)
    assert done.returncode == 0, done.stderr
    store = open_store(Settings(database_url=url))
    await store.open()
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        assert [k.name for k in await store.keys.list_keys()] == ["a"]
    finally:
        await store.close()


@pytest.mark.parametrize("scopes", ["", " , "])
def test_empty_scopes_are_refused(tmp_path: Path, scopes: str) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    done = taskorch("keys", "create", "--name", "a", "--scopes", scopes, "--database", url)
    assert done.returncode == 2
    assert "scope" in done.stderr
