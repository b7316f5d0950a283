"""Where task data comes from: the shared raw shape, source URLs, the SQL pieces the database
readers (`analytics.databases`) share, and paged GraphQL over HTTP.

Every reader returns the same raw shape, `Raw`: columns as Python sequences or Arrow arrays, times
as integer microseconds since the Unix epoch (UTC) or NO_TIME, statuses and priorities as small
integer codes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from api import database_url
from api.database_url import DatabaseUrlError, backend_of

# A status is read as its position in this tuple; newer statuses are appended.
STATUSES = ("WAITING", "WORKING", "COMPLETED", "FAILED", "CANCELLED", "BLOCKED", "IN_REVIEW")
PRIORITIES = ("LOW", "MEDIUM", "HIGH")

TASK_FIELDS = (
    "seq", "id", "work_directory", "prompt", "priority", "tags", "status", "worker_id",
    "created_at", "started_at", "completed_at", "updated_at", "retry_count", "max_retries",
    "error_message",
)  # fmt: skip
EVENT_FIELDS = ("id", "task_id", "status", "previous_status", "worker_id", "at", "reason")
# Missing times arrive as this value, NaT's own bit pattern, so int64 columns view as datetimes.
NO_TIME = -(2**63)
NO_TIME_SQL = "(-9223372036854775807 - 1)"

PROMPT_CHARS = 200  # enough to recognise a task in a table; prompts can be 100,000 characters
ERROR_CHARS = 500
PAGE = 1000  # the largest page the GraphQL API serves


class SourceError(ValueError):
    """The source cannot be read; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class Raw:
    tasks: list[Any]  # one sequence or Arrow array per TASK_FIELDS entry
    events: list[Any]  # one sequence or Arrow array per EVENT_FIELDS entry


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


def micros(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise SourceError(
            "since/until must be timezone-aware, e.g. pd.Timestamp('2030-01-01', tz='UTC')"
        )
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def code_sql(column: str, values: Sequence[str], null: str = "-1") -> str:
    cases = " ".join(f"WHEN '{v}' THEN {i}" for i, v in enumerate(values))
    return f"CASE {column} {cases} ELSE {null} END"


def window_sql(table: str, since: Any, until: Any, mark: Any) -> tuple[str, list[Any]]:
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


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]


# --- GraphQL over HTTP ---

TASKS_QUERY = """
query AnalyticsTasks($first: Int!, $after: String) {
  tasks(first: $first, after: $after) {
    edges { node {
      id workDirectory prompt priority tags status workerId createdAt startedAt
      completedAt updatedAt retryCount maxRetries errorMessage
    } }
    pageInfo { hasNextPage endCursor }
  }
}
"""
EVENTS_QUERY = """
query AnalyticsEvents($first: Int!, $after: ID) {
  events(first: $first, after: $after) {
    events { id taskId status previousStatus workerId at details }
    lastId hasNextPage
  }
}
"""


def iso_micros(value: str | None) -> int:
    if value is None:
        return NO_TIME
    stamp = micros(datetime.fromisoformat(value.replace("Z", "+00:00")))
    assert stamp is not None
    return stamp


def graphql_endpoint(url: str) -> str:
    """The GraphQL path of a server URL: `http://host:8080` -> `http://host:8080/graphql`."""
    endpoint = url.rstrip("/")
    return endpoint if endpoint.endswith("/graphql") else endpoint + "/graphql"


def api_key_of(api_key: str | None) -> str | None:
    """The key given, else the TASKORCH_API_KEY variable."""
    return api_key if api_key is not None else os.environ.get("TASKORCH_API_KEY")


def _post(http: Any, endpoint: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    import httpx

    try:
        response = http.post(endpoint, json={"query": query, "variables": variables})
    except httpx.HTTPError as exc:
        raise SourceError(f"source: cannot reach {endpoint}: {exc}") from exc
    if response.status_code in (401, 403):
        raise SourceError(f"source: {endpoint} refused the API key ({response.status_code})")
    try:
        # orjson: about three times faster than the standard parser on these pages
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise SourceError(
            f"source: {endpoint} answered {response.status_code} without JSON"
        ) from None
    if body.get("errors"):
        raise SourceError(f"source: {endpoint} answered {body['errors'][0].get('message')}")
    data: dict[str, Any] = body["data"]
    return data


def read_graphql(
    url: str, api_key: str | None, since: datetime | None, until: datetime | None
) -> Raw:
    """Page through `tasks`, then through `events` (1,000 a request each); the API has no time
    filter, so the window is applied here, after reading."""
    import httpx

    endpoint = graphql_endpoint(url)
    key = api_key_of(api_key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lo, hi = micros(since), micros(until)
    tasks: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    with httpx.Client(headers=headers, timeout=60) as http:
        after: str | None = None
        while True:
            page = _post(http, endpoint, TASKS_QUERY, {"first": PAGE, "after": after})["tasks"]
            for edge in page["edges"]:
                node = edge["node"]
                created, completed = iso_micros(node["createdAt"]), iso_micros(node["completedAt"])
                if (hi is not None and created >= hi) or (
                    lo is not None and completed != NO_TIME and completed < lo
                ):
                    continue
                tasks.append(graphql_task(node, len(tasks) + 1, created, completed))
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        # Events of tasks submitted after the task pages were read are left out, like the tasks.
        known = {t[1] for t in tasks}
        last: str | None = None
        while True:
            variables = {"first": PAGE, "after": last}
            chunk = _post(http, endpoint, EVENTS_QUERY, variables)["events"]
            for event in chunk["events"]:
                at = iso_micros(event["at"])
                if event["taskId"] in known and (hi is None or at < hi):
                    events.append(graphql_event(event, at))
            if not chunk["hasNextPage"]:
                break
            last = chunk["lastId"]
    return Raw(columns(tasks, len(TASK_FIELDS)), columns(events, len(EVENT_FIELDS)))


def _status_code(value: str | None) -> int:
    return -1 if value is None else STATUSES.index(value)


def graphql_task(node: dict[str, Any], seq: int, created: int, completed: int) -> tuple[Any, ...]:
    prompt = node["prompt"][:PROMPT_CHARS]
    error = node["errorMessage"]
    return (
        seq, node["id"], node["workDirectory"], prompt, PRIORITIES.index(node["priority"]),
        json.dumps(node["tags"]), _status_code(node["status"]), node["workerId"], created,
        iso_micros(node["startedAt"]), completed, iso_micros(node["updatedAt"]), node["retryCount"],
        node["maxRetries"], None if error is None else error[:ERROR_CHARS],
    )  # fmt: skip


def graphql_event(event: dict[str, Any], at: int) -> tuple[Any, ...]:
    """One `TaskEvent` as the GraphQL API serves it, as a raw events row."""
    details = event["details"] or {}
    reason = details.get("reason") if isinstance(details, dict) else None
    return (
        int(event["id"]), event["taskId"], _status_code(event["status"]),
        _status_code(event["previousStatus"]), event["workerId"], at, reason,
    )  # fmt: skip
