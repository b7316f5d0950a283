"""Backup, restore, prune and retention, through the `taskorch` command and a real server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from api.core.domain import TaskStatus
from api.core.service import TaskService
from api.core.validation import task_spec
from api.events.bus import LocalBus
from api.settings import Settings
from api.store import open_store
from api.store.base import SCHEMA_VERSION
from tests.conftest import FakeClock, GraphQLClient, ServerProcess, eventually, running_app

SUBMIT = """mutation Submit($input: SubmitTaskInput!) { submitTask(input: $input) { id } }"""
CLAIM = """mutation Claim($dir: String!) { claimTask(workDirectory: $dir, workerId: "w") { id } }"""
COMPLETE = """mutation Complete($id: ID!) { completeTask(id: $id, workerId: "w") { status } }"""


def taskorch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


async def taskorch_async(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return await process.wait(), out.decode(), err.decode()


def consistency(path: Path) -> tuple[int, int]:
    """Check that the file is one moment of a taskorch database; return (tasks, history rows)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM task_history").fetchone()[0]
        created = conn.execute(
            "SELECT count(*) FROM task_history WHERE previous_status IS NULL"
        ).fetchone()[0]
        assert created == tasks  # every task with its creation event, no more, no less
        mismatched = conn.execute(
            "SELECT count(*) FROM tasks t WHERE status != (SELECT h.status FROM task_history h"
            " WHERE h.task_id = t.id ORDER BY h.id DESC LIMIT 1)"
        ).fetchone()[0]
        assert mismatched == 0  # each task's status is its last recorded change
        return tasks, events
    finally:
        conn.close()


def alone(path: Path) -> bool:
    return not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_backup_during_concurrent_writes_restores_to_a_consistent_database(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    live = tmp_path / "live.db"
    server = start_server(f"sqlite:///{live}", {"TASKORCH_DURABILITY": "normal"})
    stop = asyncio.Event()
    written = 0

    async def writer(http: httpx.AsyncClient) -> None:
        nonlocal written
        gql = GraphQLClient(http)
        while not stop.is_set():
            await gql.ok(SUBMIT, input={"workDirectory": "/b", "prompt": "p"})
            claimed = (await gql.ok(CLAIM, dir="/b"))["claimTask"]
            if claimed is not None:
                await gql.ok(COMPLETE, id=claimed["id"])
            written += 1

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        writers = [asyncio.create_task(writer(http)) for _ in range(4)]
        await eventually(lambda: asyncio.sleep(0, written >= 20))
        before = written
        backups = []
        for n in range(2):  # each while the writers keep going
            path = tmp_path / f"backup-{n}.db"
            code, out, err = await taskorch_async(
                "backup", "--database", f"sqlite:///{live}", str(path)
            )
            assert code == 0, err
            assert "backed up" in out
            backups.append(path)
        during = written
        stop.set()
        await asyncio.gather(*writers)
    assert during > before  # the writes went on while the backups ran
    counts = [consistency(path) for path in backups]
    assert 0 < counts[0][0] <= counts[1][0]  # two moments, in order
    assert alone(backups[0])  # a backup is one self-contained file

    restored = tmp_path / "restored.db"
    result = taskorch("restore", str(backups[1]), "--database", f"sqlite:///{restored}")
    assert result.returncode == 0, result.stderr
    assert consistency(restored) == counts[1]
    async with running_app(Settings(database_url=f"sqlite:///{restored}")) as http:
        health = (await http.get("/health")).json()
        assert sum(health["queue"].values()) == counts[1][0]


@pytest.fixture
def current(tmp_path: Path) -> Path:
    """A stopped server's database with a few tasks in it."""
    path = tmp_path / "current.db"

    async def fill() -> None:
        store = open_store(Settings(database_url=f"sqlite:///{path}"))
        await store.open()
        try:
            service = TaskService(store, LocalBus())
            for n in range(3):
                await service.submit(task_spec(work_directory="/c", prompt=f"task {n}"))
        finally:
            await store.close()

    asyncio.run(fill())
    return path


def make_sqlite(path: Path, *statements: str) -> Path:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def refuse(source: Path, current: Path, reason: str) -> None:
    before = digest(current)
    result = taskorch("restore", str(source), "--database", f"sqlite:///{current}")
    assert result.returncode == 1
    assert reason in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert digest(current) == before
    assert consistency(current) == (3, 3)
    assert not list(current.parent.glob(".current.db.*"))  # no temp file left behind


def test_restore_refuses_a_corrupt_file(tmp_path: Path, current: Path) -> None:
    backup = tmp_path / "good.db"
    assert taskorch("backup", "--database", f"sqlite:///{current}", str(backup)).returncode == 0
    data = bytearray(backup.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page : 3 * page] = os.urandom(page)  # a damaged page in the middle
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(bytes(data))
    refuse(corrupt, current, "corrupt.db failed the integrity check")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    refuse(garbage, current, "garbage.db failed the integrity check")


def test_restore_refuses_a_database_that_is_not_taskorch(tmp_path: Path, current: Path) -> None:
    other = make_sqlite(tmp_path / "other.db", "CREATE TABLE notes (body TEXT)")
    refuse(other, current, "is not a taskorch database")


def test_restore_refuses_a_newer_schema(tmp_path: Path, current: Path) -> None:
    newer = tmp_path / "newer.db"
    assert taskorch("backup", "--database", f"sqlite:///{current}", str(newer)).returncode == 0
    make_sqlite(newer, f"INSERT INTO schema_migrations VALUES ({SCHEMA_VERSION + 1}, 0)")
    refuse(newer, current, f"schema version {SCHEMA_VERSION + 1}")


def test_restore_refuses_while_a_server_uses_the_database(
    tmp_path: Path, current: Path, start_server: Callable[..., ServerProcess]
) -> None:
    backup = tmp_path / "b.db"
    assert taskorch("backup", "--database", f"sqlite:///{current}", str(backup)).returncode == 0
    server = start_server(f"sqlite:///{current}")
    result = taskorch("restore", str(backup), "--database", f"sqlite:///{current}")
    assert result.returncode == 1, result.stderr
    assert "stop the server" in result.stderr, result.stderr
    assert httpx.get(f"{server.url}/health").json()["queue"]["waiting"] == 3


def test_restore_replaces_the_database_and_its_stale_wal(tmp_path: Path, current: Path) -> None:
    backup = tmp_path / "b.db"
    assert taskorch("backup", "--database", f"sqlite:///{current}", str(backup)).returncode == 0
    make_sqlite(current, "DELETE FROM task_history", "DELETE FROM tasks")
    assert taskorch("restore", str(backup), "--database", f"sqlite:///{current}").returncode == 0
    assert consistency(current) == (3, 3)
    assert not Path(f"{current}-wal").exists()


def test_backup_and_restore_point_postgresql_users_to_pg_tools(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/test"
    result = taskorch("backup", "--database", url, str(tmp_path / "x.db"))
    assert result.returncode == 1
    assert "pg_dump" in result.stderr
    result = taskorch("restore", str(tmp_path / "x.db"), "--database", url)
    assert result.returncode == 1
    assert "pg_restore" in result.stderr


# --- retention ---


async def test_prune_deletes_finished_tasks_past_the_cutoff_with_their_history(
    database_url: str,
) -> None:
    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    clock = FakeClock()
    clock.advance(-40 * 86_400)
    service = TaskService(store, LocalBus(), clock=clock)
    try:
        old_done = await service.submit(task_spec(work_directory="/p", prompt="old"))
        await service.claim("/p", "w")
        await service.complete(old_done.id, "w")
        old_waiting = await service.submit(task_spec(work_directory="/q", prompt="never run"))
        clock.advance(39 * 86_400)  # one day ago
        recent = await service.submit(task_spec(work_directory="/p", prompt="recent"))
        await service.claim("/p", "w")
        await service.cancel(recent.id)
    finally:
        await store.close()

    result = await taskorch_async("prune", "--older-than", "30d", "--database", database_url)
    assert result[0] == 0, result[2]
    assert "deleted 1 finished task" in result[1]

    await store.open()
    try:
        assert await store.get(old_done.id) is None
        assert await store.history(old_done.id) == []
        assert (await store.get(old_waiting.id)) is not None  # unfinished tasks are kept
        assert (await store.get(recent.id)) is not None
        counts = await store.count_by_status(None)
        assert counts.get(TaskStatus.COMPLETED, 0) == 0
        assert counts[TaskStatus.CANCELLED] == 1
    finally:
        await store.close()
    bad = await taskorch_async("prune", "--older-than", "soon", "--database", database_url)
    assert bad[0] == 2
    assert "--older-than" in bad[2]


async def test_automatic_retention_prunes_in_the_background(database_url: str) -> None:
    settings = Settings(database_url=database_url, durability="normal", retention="1s")
    async with running_app(settings) as http:
        gql = GraphQLClient(http)
        task_id = (await gql.ok(SUBMIT, input={"workDirectory": "/r", "prompt": "p"}))["submitTask"]
        kept = (await gql.ok(SUBMIT, input={"workDirectory": "/other", "prompt": "p"}))[
            "submitTask"
        ]
        await gql.ok(CLAIM, dir="/r")
        await gql.ok(COMPLETE, id=task_id["id"])
        query = "query($id: ID!) { task(id: $id) { id } }"

        async def pruned() -> bool:
            return (await gql.ok(query, id=task_id["id"]))["task"] is None

        await eventually(pruned, timeout=15)
        assert (await gql.ok(query, id=kept["id"]))["task"] is not None


def test_retention_period_parsing() -> None:
    assert Settings(retention="30d").retention_period == timedelta(days=30)
    assert Settings(retention="90m").retention_period == timedelta(minutes=90)
    assert Settings().retention_period is None


def test_backup_to_a_missing_folder_names_the_destination_and_the_cause(
    tmp_path: Path, current: Path
) -> None:
    target = tmp_path / "missing-dir" / "x.db"
    result = taskorch("backup", "--database", f"sqlite:///{current}", str(target))
    assert result.returncode == 1, result.stderr
    assert f"cannot write the backup to {target}" in result.stderr
    assert f"the folder {target.parent} does not exist" in result.stderr
    assert str(current) not in result.stderr  # the source is not to blame
    folder = tmp_path / "taken"
    folder.mkdir()
    result = taskorch("backup", "--database", f"sqlite:///{current}", str(folder))
    assert result.returncode == 1
    assert f"{folder}: it is a folder" in result.stderr


def test_backup_to_a_read_only_folder_names_the_destination_and_the_cause(
    tmp_path: Path, current: Path
) -> None:
    # /proc refuses new files even to root, unlike a folder without write permission.
    target = Path("/proc/taskorch-backup.db")
    result = taskorch("backup", "--database", f"sqlite:///{current}", str(target))
    assert result.returncode == 1, result.stderr
    assert f"cannot write the backup to {target}: the folder /proc is not writable" in result.stderr
    assert str(current) not in result.stderr
