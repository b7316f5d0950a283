"""`taskorch keys create|list|revoke` as an operator runs them: a separate process on a database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from api.security.keys import hash_key
from api.settings import Settings
from api.store import open_store
from api.store.base import SCHEMA_VERSION
from api.store.migrations import CREATE_VERSIONS, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from api.store.sql import POSTGRES, SQLITE


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
    assert header.split() == [
        "NAME",
        "SCOPES",
        "RATE",
        "LIMIT",
        "CREATED",
        "LAST",
        "USED",
        "REVOKED",
    ]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["reader"][1] == "read"
    assert by_name["reader"][2] == "default"
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


def test_create_with_a_rate_limit_stores_it_and_list_shows_it(database_url: str) -> None:
    for name, limit in (("slow", "5"), ("free", "0")):
        made = taskorch(
            "keys", "create", "--name", name, "--scopes", "read", "--rate-limit", limit,
            "--database", database_url,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
    assert "rate limit none" in made.stderr
    listed = taskorch("keys", "list", "--database", database_url)
    assert listed.returncode == 0, listed.stderr
    by_name = {row.split()[0]: row.split() for row in listed.stdout.splitlines()[1:]}
    assert by_name["slow"][2] == "5/min"
    assert by_name["free"][2] == "none"


@pytest.mark.parametrize("limit", ["-1", "2147483648"])
def test_a_rate_limit_out_of_range_exits_2_naming_the_flag(tmp_path: Path, limit: str) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    done = taskorch(
        "keys", "create", "--name", "a", "--scopes", "read", "--rate-limit", limit, "--database", url
    )  # fmt: skip
    assert done.returncode == 2
    assert "--rate-limit" in done.stderr
    assert "requests a minute" in done.stderr
    assert done.stdout == ""


async def _version_2_database(url: str, key_hash: str) -> None:
    """A database as the release before key rate limits left it, holding one key."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(CREATE_VERSIONS.format(**SQLITE.types))
            for version, script in enumerate(SQLITE_MIGRATIONS[:2], start=1):
                for statement in script:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
            conn.execute(
                "INSERT INTO api_keys (name, key_hash, scopes, created_at) VALUES (?, ?, ?, 0)",
                ("old", key_hash, "read,work"),
            )
        conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(CREATE_VERSIONS.format(**POSTGRES.types))
        for version, script in enumerate(POSTGRES_MIGRATIONS[:2], start=1):
            for statement in script:
                await pg.execute(statement)
            await pg.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
        await pg.execute(
            "INSERT INTO api_keys (name, key_hash, scopes, created_at) VALUES ($1, $2, $3, now())",
            "old",
            key_hash,
            "read,work",
        )
    finally:
        await pg.close()


async def test_the_rate_limit_migration_keeps_existing_keys(database_url: str) -> None:
    await _version_2_database(database_url, hash_key("tko_old"))
    store = open_store(Settings(database_url=database_url))
    await store.open()
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        key = await store.keys.find_key(hash_key("tko_old"))
        assert key is not None
        assert (key.name, key.scopes, key.rate_limit) == ("old", ("read", "work"), None)
        limited = await store.keys.create_key("new", "h", ["read"], key.created_at, 5)
        assert limited is not None
        assert limited.rate_limit == 5
    finally:
        await store.close()


async def test_a_review_key_may_approve_and_reject_and_nothing_else(database_url: str) -> None:
    from tests.conftest import GraphQLClient, running_app

    keys = {}
    for name, scopes in (("reviewer", "review"), ("worker", "work,read,submit")):
        made = taskorch(
            "keys", "create", "--name", name, "--scopes", scopes, "--database", database_url
        )
        assert made.returncode == 0, made.stderr
        keys[name] = made.stdout.strip()
    approve = 'mutation { approveTask(id: "00000000-0000-0000-0000-000000000001") { id } }'
    reject = (
        'mutation { rejectTask(id: "00000000-0000-0000-0000-000000000001", feedback: "x") { id } }'
    )
    submit = 'mutation { submitTask(input: {workDirectory: "/r", prompt: "p"}) { id } }'
    async with running_app(Settings(database_url=database_url, durability="normal")) as http:
        gql = GraphQLClient(http)
        http.headers["Authorization"] = f"Bearer {keys['reviewer']}"
        for query in (approve, reject):  # allowed: the task is just not there
            assert (await gql.error(query))["extensions"]["code"] == "NOT_FOUND"
        refused = await http.post("/graphql", json={"query": submit})
        assert refused.status_code == 403
        http.headers["Authorization"] = f"Bearer {keys['worker']}"
        for query in (approve, reject):
            refused = await http.post("/graphql", json={"query": query})
            assert refused.status_code == 403
            (error,) = refused.json()["errors"]
            assert (error["extensions"]["code"], error["extensions"]["requiredScope"]) == (
                "FORBIDDEN", "review",
            )  # fmt: skip
