"""Where task data comes from: read-only SQL on SQLite or PostgreSQL, or paged GraphQL over HTTP.

Every reader returns the same raw shape, `Raw`: columns as Python sequences, times as integer
microseconds since the Unix epoch (UTC) or NO_TIME, statuses and priorities as small integer codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from api import database_url
from api.database_url import DatabaseUrlError, backend_of

STATUSES = ("WAITING", "WORKING", "COMPLETED", "FAILED", "CANCELLED")
PRIORITIES = ("LOW", "MEDIUM", "HIGH")

TASK_FIELDS = (
    "seq", "id", "work_directory", "prompt", "priority", "tags", "status", "worker_id",
    "created_at", "started_at", "completed_at", "updated_at", "retry_count", "max_retries",
    "error_message",
)  # fmt: skip
EVENT_FIELDS = ("id", "task_id", "status", "previous_status", "worker_id", "at", "reason")
# Missing times arrive as this value, NaT's own bit pattern, so int64 columns view as datetimes.
NO_TIME = -(2**63)
_NO_TIME_SQL = "(-9223372036854775807 - 1)"

PROMPT_CHARS = 200  # enough to recognise a task in a table; prompts can be 100,000 characters
ERROR_CHARS = 500
PAGE = 1000  # the largest page the GraphQL API serves


class SourceError(ValueError):
    """The source cannot be read; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class Raw:
    tasks: list[Sequence[Any]]  # one sequence per TASK_FIELDS entry
    events: list[Sequence[Any]]  # one sequence per EVENT_FIELDS entry


def source_kind(source: str) -> Literal["sqlite", "postgres", "http"]:
    """Which reader a source URL takes; databases are told apart exactly as the server does."""
    if source.startswith(("http://", "https://")):
        return "http"
    try:
        return backend_of(source)
    except DatabaseUrlError:
        raise SourceError(
            f"source must be sqlite:///PATH, postgresql://... or http(s)://SERVER, not {source!r}"
        ) from None


def absolute_url(url: str, base: str | Path) -> str:
    """`sqlite:///relative.db` made absolute against `base`; other URLs unchanged. Notebook kernels
    run in the notebook's directory, so a relative path given to Jupyter needs this."""
    if source_kind(url) == "sqlite" and not os.path.isabs(path := sqlite_path(url)):
        return f"sqlite:///{(Path(base) / path).resolve()}"
    return url


def sqlite_path(url: str) -> str:
    """The file of a SQLite source, exactly as the server reads the same URL."""
    try:
        return database_url.sqlite_path(url)
    except DatabaseUrlError as exc:
        raise SourceError(f"source: {exc}") from None


def _us(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise SourceError(
            "since/until must be timezone-aware, e.g. pd.Timestamp('2030-01-01', tz='UTC')"
        )
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _code(column: str, values: Sequence[str], null: str = "-1") -> str:
    cases = " ".join(f"WHEN '{v}' THEN {i}" for i, v in enumerate(values))
    return f"CASE {column} {cases} ELSE {null} END"


def _window(table: str, since: Any, until: Any, mark: Any) -> tuple[str, list[Any]]:
    """Tasks that overlap [since, until): created before `until`, not finished before `since`."""
    created, completed = f"{table}.created_at", f"{table}.completed_at"
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    if until is not None:
        clauses.append(f"{created} < {mark(len(params) + 1)}")
        params.append(until)
    if since is not None:
        clauses.append(f"({completed} IS NULL OR {completed} >= {mark(len(params) + 1)})")
        params.append(since)
    return " AND ".join(clauses), params


def _columns(rows: list[Sequence[Any]], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]


# --- SQLite ---


def _sqlite_time(column: str) -> str:
    return f"ifnull({column}, {_NO_TIME_SQL})"


def read_sqlite(url: str, since: datetime | None, until: datetime | None) -> Raw:
    path = Path(sqlite_path(url))
    if not path.exists():
        raise SourceError(f"source: no SQLite database at {path.resolve()}")
    # mode=ro: this connection can never write, whatever runs on it
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        where, params = _window("t", _us(since), _us(until), lambda _: "?")
        times = ", ".join(
            _sqlite_time(c) for c in ("created_at", "started_at", "completed_at", "updated_at")
        )
        tasks_sql = (
            f"SELECT seq, id, work_directory, substr(prompt, 1, {PROMPT_CHARS}), priority, tags,"
            f" {_code('status', STATUSES)}, worker_id, {times}, retry_count, max_retries,"
            f" substr(error_message, 1, {ERROR_CHARS}) FROM tasks t WHERE {where} ORDER BY seq"
        )
        # A scan in id order (measured: about half the CPU of joining to tasks per event).
        events_sql = (
            f"SELECT h.id, h.task_id, {_code('h.status', STATUSES)},"
            f" {_code('h.previous_status', STATUSES)}, h.worker_id, h.at,"
            " CASE WHEN instr(h.details, 'reason') = 0 THEN NULL"
            " ELSE json_extract(h.details, '$.reason') END FROM task_history h"
        )
        events_params: list[Any] = []
        if since is not None or until is not None:
            events_sql += f" WHERE h.task_id IN (SELECT t.id FROM tasks t WHERE {where})"
            events_params = list(params)
            if until is not None:
                events_sql += " AND h.at < ?"
                events_params.append(_us(until))
        events_sql += " ORDER BY h.id"
        conn.execute("BEGIN")  # one snapshot for both tables
        try:
            tasks = conn.execute(tasks_sql, params).fetchall()
            events = conn.execute(events_sql, events_params).fetchall()
        finally:
            conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        raise SourceError(
            f"source: cannot read {path}: {exc} (is it a taskorch database?)"
        ) from exc
    finally:
        conn.close()
    return Raw(_columns(tasks, len(TASK_FIELDS)), _columns(events, len(EVENT_FIELDS)))


# --- PostgreSQL ---


def _postgres_dsn(url: str) -> tuple[str, dict[str, str]]:
    """Split libpq's `options` (`-c key=value ...`) out of the URL into server settings."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    settings: dict[str, str] = {}
    kept = []
    for key, value in query:
        if key != "options":
            kept.append((key, value))
            continue
        words = shlex.split(value)
        for i, word in enumerate(words):
            setting = word[2:] if word.startswith("-c") and len(word) > 2 else None
            if word == "-c" and i + 1 < len(words):
                setting = words[i + 1]
            if setting and "=" in setting:
                name, _, val = setting.partition("=")
                settings[name.strip()] = val.strip()
    dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    return dsn, settings


def _epoch_us(column: str) -> str:
    return f"coalesce((extract(epoch from {column}) * 1000000)::bigint, {_NO_TIME_SQL})"


async def _read_postgres(url: str, since: datetime | None, until: datetime | None) -> Raw:
    import asyncpg

    dsn, settings = _postgres_dsn(url)
    settings["default_transaction_read_only"] = "on"
    conn = await asyncpg.connect(dsn, server_settings=settings)
    try:
        where, params = _window("t", since, until, lambda n: f"${n}")
        times = ", ".join(
            _epoch_us(c) for c in ("created_at", "started_at", "completed_at", "updated_at")
        )
        tasks_sql = (
            f"SELECT seq, id::text, work_directory, left(prompt, {PROMPT_CHARS}), priority,"
            f" tags::text, {_code('status', STATUSES)}, worker_id, {times}, retry_count,"
            f" max_retries, left(error_message, {ERROR_CHARS}) FROM tasks t WHERE {where}"
            " ORDER BY seq"
        )
        events_sql = (
            f"SELECT h.id, h.task_id::text, {_code('h.status', STATUSES)},"
            f" {_code('h.previous_status', STATUSES)}, h.worker_id, {_epoch_us('h.at')},"
            " h.details->>'reason' FROM task_history h"
        )
        events_params: list[Any] = []
        if since is not None or until is not None:
            events_sql += f" WHERE h.task_id IN (SELECT t.id FROM tasks t WHERE {where})"
            events_params = list(params)
            if until is not None:
                events_params.append(until)
                events_sql += f" AND h.at < ${len(events_params)}"
        events_sql += " ORDER BY h.id"
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            tasks = await conn.fetch(tasks_sql, *params)
            events = await conn.fetch(events_sql, *events_params)
    except (asyncpg.PostgresError, OSError) as exc:
        raise SourceError(f"source: cannot read the PostgreSQL database: {exc}") from exc
    finally:
        await conn.close()
    return Raw(
        _columns([tuple(r) for r in tasks], len(TASK_FIELDS)),
        _columns([tuple(r) for r in events], len(EVENT_FIELDS)),
    )


def read_postgres(url: str, since: datetime | None, until: datetime | None) -> Raw:
    coro = _read_postgres(url, since, until)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Inside a running loop (a notebook kernel): run on a thread with its own loop.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --- GraphQL over HTTP ---

TASKS_QUERY = """
query AnalyticsTasks($first: Int!, $after: String) {
  tasks(first: $first, after: $after) {
    edges { node {
      id workDirectory prompt priority tags status workerId createdAt startedAt
      completedAt updatedAt retryCount maxRetries errorMessage
      history { id status previousStatus workerId at details }
    } }
    pageInfo { hasNextPage endCursor }
  }
}
"""


def _iso_us(value: str | None) -> int:
    if value is None:
        return NO_TIME
    stamp = _us(datetime.fromisoformat(value.replace("Z", "+00:00")))
    assert stamp is not None
    return stamp


def read_graphql(
    url: str, api_key: str | None, since: datetime | None, until: datetime | None
) -> Raw:
    """Page through `tasks` with their history; the API has no time filter, so the window is
    applied here, after reading."""
    import httpx

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/graphql"):
        endpoint += "/graphql"
    key = api_key if api_key is not None else os.environ.get("TASKORCH_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lo, hi = _us(since), _us(until)
    tasks: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    after: str | None = None
    with httpx.Client(headers=headers, timeout=60) as http:
        while True:
            variables = {"first": PAGE, "after": after}
            try:
                response = http.post(endpoint, json={"query": TASKS_QUERY, "variables": variables})
            except httpx.HTTPError as exc:
                raise SourceError(f"source: cannot reach {endpoint}: {exc}") from exc
            if response.status_code in (401, 403):
                raise SourceError(
                    f"source: {endpoint} refused the API key ({response.status_code})"
                )
            try:
                body = response.json()
            except ValueError:
                raise SourceError(
                    f"source: {endpoint} answered {response.status_code} without JSON"
                ) from None
            if body.get("errors"):
                raise SourceError(f"source: {endpoint} answered {body['errors'][0].get('message')}")
            page = body["data"]["tasks"]
            for edge in page["edges"]:
                node = edge["node"]
                created, completed = _iso_us(node["createdAt"]), _iso_us(node["completedAt"])
                if (hi is not None and created >= hi) or (
                    lo is not None and completed != NO_TIME and completed < lo
                ):
                    continue
                seq = len(tasks) + 1
                tasks.append(_graphql_task(node, seq, created, completed))
                for event in node["history"]:
                    at = _iso_us(event["at"])
                    if hi is None or at < hi:
                        events.append(_graphql_event(event, node["id"], at))
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
    events.sort(key=lambda e: int(e[0]))
    return Raw(_columns(list(tasks), len(TASK_FIELDS)), _columns(list(events), len(EVENT_FIELDS)))


def _status_code(value: str | None) -> int:
    return -1 if value is None else STATUSES.index(value)


def _graphql_task(node: dict[str, Any], seq: int, created: int, completed: int) -> tuple[Any, ...]:
    prompt = node["prompt"][:PROMPT_CHARS]
    error = node["errorMessage"]
    return (
        seq, node["id"], node["workDirectory"], prompt, PRIORITIES.index(node["priority"]),
        json.dumps(node["tags"]), _status_code(node["status"]), node["workerId"], created,
        _iso_us(node["startedAt"]), completed, _iso_us(node["updatedAt"]), node["retryCount"],
        node["maxRetries"], None if error is None else error[:ERROR_CHARS],
    )  # fmt: skip


def _graphql_event(event: dict[str, Any], task_id: str, at: int) -> tuple[Any, ...]:
    details = event["details"] or {}
    reason = details.get("reason") if isinstance(details, dict) else None
    return (
        int(event["id"]), task_id, _status_code(event["status"]),
        _status_code(event["previousStatus"]), event["workerId"], at, reason,
    )  # fmt: skip
