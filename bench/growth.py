"""Loads a large queue straight into a migrated SQLite file, far faster than through the API."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

from api.database_url import sqlite_path


def waiting_rows(count: int, directory: str, prompt: str) -> Iterator[tuple[Any, ...]]:
    now_us = int(time.time() * 1_000_000)
    base = uuid.uuid4().int & ~((1 << 64) - 1)  # random high bits, sequential low bits: valid UUIDs
    for n in range(count):
        at = now_us - (count - n)  # oldest first, as if submitted in order
        task_id = str(uuid.UUID(int=base | n))
        yield (task_id, directory, prompt, 1, "[]", "WAITING", at, at, 3, "{}")


def load_waiting(database_url: str, count: int, directory: str, prompt: str) -> float:
    """Insert `count` WAITING tasks into `directory`; the seconds it took."""
    started = time.perf_counter()
    conn = sqlite3.connect(sqlite_path(database_url))
    try:
        conn.execute("PRAGMA synchronous = OFF")  # a bulk load of a scratch file: no fsync needed
        with conn:
            conn.executemany(
                "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status,"
                " created_at, updated_at, max_retries, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                waiting_rows(count, directory, prompt),
            )
    finally:
        conn.close()
    return time.perf_counter() - started


async def store_claim_latencies(database_url: str, directory: str, samples: int) -> list[float]:
    """The store's own claim (no HTTP, no GraphQL), one at a time: claim, then release so the
    queue keeps its size. Seconds per claim."""
    from datetime import UTC, datetime, timedelta

    from api.settings import Settings
    from api.store import open_store

    store = open_store(Settings(database_url=database_url, durability="full"))
    await store.open()
    latencies: list[float] = []
    try:
        for _ in range(samples):
            now = datetime.now(UTC)
            started = time.perf_counter()
            claimed = await store.claim(
                directory, "bench-store", 1, now + timedelta(minutes=5), now
            )
            latencies.append(time.perf_counter() - started)
            for task in claimed:
                await store.release(task.id, "bench-store", now)
    finally:
        await store.close()
    return latencies
