"""Where task data comes from: the shared raw shape, source URLs, the SQL pieces the database
readers (`analytics.databases`) share, and paged GraphQL over HTTP.

Every reader returns the same raw shape, `Raw`: columns as Python sequences or Arrow arrays, times
as integer microseconds since the Unix epoch (UTC) or NO_TIME, statuses and priorities as small
integer codes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

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
    """Page through `tasks` and through `events` (1,000 a request each) at once, on two
    connections, so the server answers one stream's page while this process decodes the other's;
    the API has no time filter, so the window is applied here, after reading."""
    import httpx

    endpoint = graphql_endpoint(url)
    key = api_key_of(api_key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tasks_read, failed = threading.Event(), threading.Event()

    # Each page is decoded into columns by the thread that read it, while the server answers
    # the other stream: decoding all of them after the last page would leave the server idle.
    def read_tasks(http: Any) -> list[list[Any]]:
        pages: list[list[Any]] = []
        after: str | None = None
        while True:
            page = _post(http, endpoint, TASKS_QUERY, {"first": PAGE, "after": after})["tasks"]
            pages.append(task_page([edge["node"] for edge in page["edges"]]))
            if not page["pageInfo"]["hasNextPage"]:
                return pages
            after = page["pageInfo"]["endCursor"]

    def read_events(http: Any) -> list[list[Any]]:
        # Every event up to a page asked for after the last task page was read: so each task's
        # history reaches at least the state its row was read in.
        pages: list[list[Any]] = []
        last: str | None = None
        while not failed.is_set():
            settled = tasks_read.is_set()
            chunk = _post(http, endpoint, EVENTS_QUERY, {"first": PAGE, "after": last})["events"]
            pages.append(event_page(chunk["events"]))
            last = chunk["lastId"]
            if not chunk["hasNextPage"]:
                if settled:
                    break
                tasks_read.wait()
        return pages

    with (
        httpx.Client(headers=headers, timeout=60) as tasks_http,
        httpx.Client(headers=headers, timeout=60) as events_http,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="analytics-events") as pool,
    ):
        history = pool.submit(read_events, events_http)
        try:
            task_pages = read_tasks(tasks_http)
        except BaseException:
            failed.set()
            raise
        finally:
            tasks_read.set()
        event_pages = history.result()
    tasks = tasks_of_pages(task_pages, micros(since), micros(until))
    ids = tasks[TASK_FIELDS.index("id")]
    return Raw(tasks, events_of_pages(event_pages, ids, micros(until)))


_STATUS_CODES: dict[str | None, int] = {None: -1, **{s: i for i, s in enumerate(STATUSES)}}
_PRIORITY_CODES = {p: i for i, p in enumerate(PRIORITIES)}


def _instants(values: list[str | None]) -> pa.Array:
    """ISO 8601 times (as the API writes them) as microseconds since the epoch, NO_TIME for none:
    parsed by Arrow at once."""
    stamps = pc.cast(pa.array(values, pa.string()), pa.timestamp("us", tz="UTC"))
    return pc.fill_null(stamps.cast(pa.int64()), NO_TIME)


def _texts(values: list[str | None]) -> pa.Array:
    return pa.array(values, pa.string())


def task_columns(nodes: list[dict[str, Any]], lo: int | None, hi: int | None) -> list[Any]:
    """The TASK_FIELDS columns of the tasks that overlap [lo, hi), numbered in page order."""
    return tasks_of_pages([task_page(nodes)], lo, hi)


# The columns of a page of tasks: all but `seq`, which numbers the tasks once pages are joined.
PAGE_FIELDS = TASK_FIELDS[1:]


def task_page(nodes: list[dict[str, Any]]) -> list[Any]:
    """The PAGE_FIELDS columns of one page of task nodes."""
    return [
        _texts([n["id"] for n in nodes]),
        _texts([n["workDirectory"] for n in nodes]),
        _texts([n["prompt"][:PROMPT_CHARS] for n in nodes]),
        pa.array([_PRIORITY_CODES[n["priority"]] for n in nodes], pa.int64()),
        # JSON text, as the databases hold it; orjson writes it several times faster
        pa.array([orjson.dumps(n["tags"]) for n in nodes], pa.binary()),
        pa.array([_STATUS_CODES[n["status"]] for n in nodes], pa.int64()),
        _texts([n["workerId"] for n in nodes]),
        _instants([n["createdAt"] for n in nodes]),
        _instants([n["startedAt"] for n in nodes]),
        _instants([n["completedAt"] for n in nodes]),
        _instants([n["updatedAt"] for n in nodes]),
        pa.array([n["retryCount"] for n in nodes], pa.int64()),
        pa.array([n["maxRetries"] for n in nodes], pa.int64()),
        _texts([None if (e := n["errorMessage"]) is None else e[:ERROR_CHARS] for n in nodes]),
    ]


def tasks_of_pages(pages: list[list[Any]], lo: int | None, hi: int | None) -> list[Any]:
    """The pages' tasks that overlap [lo, hi), numbered in page order."""
    joined = [pa.concat_arrays(list(column)) for column in zip(*pages, strict=True)]
    created = joined[PAGE_FIELDS.index("created_at")].to_numpy()
    keep = np.ones(len(created), dtype=bool)
    if hi is not None:
        keep &= created < hi
    if lo is not None:
        done = joined[PAGE_FIELDS.index("completed_at")].to_numpy()
        keep &= (done == NO_TIME) | (done >= lo)
    if not keep.all():
        mask = pa.array(keep)
        joined = [column.filter(mask) for column in joined]
    return [pa.array(np.arange(1, len(joined[0]) + 1)), *joined]


def event_columns(events: list[dict[str, Any]], task_ids: pa.Array, hi: int | None) -> list[Any]:
    """The EVENT_FIELDS columns of the events of the tasks read, before `hi`: events of tasks
    submitted after the task pages were read are left out, like those tasks."""
    return events_of_pages([event_page(events)], task_ids, hi)


def event_page(events: list[dict[str, Any]]) -> list[Any]:
    """The EVENT_FIELDS columns of one page of events."""
    return [
        pc.cast(_texts([e["id"] for e in events]), pa.int64()),
        _texts([e["taskId"] for e in events]),
        pa.array([_STATUS_CODES[e["status"]] for e in events], pa.int64()),
        pa.array([_STATUS_CODES[e["previousStatus"]] for e in events], pa.int64()),
        _texts([e["workerId"] for e in events]),
        _instants([e["at"] for e in events]),
        _texts([_reason(e["details"]) for e in events]),
    ]


def events_of_pages(pages: list[list[Any]], task_ids: pa.Array, hi: int | None) -> list[Any]:
    """The pages' events of the tasks read, before `hi`."""
    columns = [pa.concat_arrays(list(column)) for column in zip(*pages, strict=True)]
    keep = pc.is_in(columns[1], value_set=task_ids)
    if hi is not None:
        keep = pc.and_(keep, pc.less(columns[EVENT_FIELDS.index("at")], hi))
    return columns if pc.all(keep).as_py() else [column.filter(keep) for column in columns]


def _reason(details: Any) -> str | None:
    reason = details.get("reason") if isinstance(details, dict) else None
    return reason if isinstance(reason, str) else None
