"""The analytics package: metrics against hand-computed values, loading from every backend and a
live server, and the dashboard without a browser."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import analytics
from analytics.load import frames
from analytics.sources import NO_TIME, STATUSES, Raw
from api.core.service import TaskService
from api.core.validation import task_spec
from api.events.bus import LocalBus
from api.settings import Settings
from api.store import open_store
from tests.conftest import FakeClock, GraphQLClient, ServerProcess

T0 = pd.Timestamp("2030-01-01T00:00:00Z")
US = 1_000_000
BASE = int(T0.value // 1000)  # microseconds since the epoch

# Five tasks, times in seconds after T0:
#   A: submitted 0, w1 claims 10, completes 70                      wait 10,  run 60
#   B: submitted 0, w1 claims 30, fails at 50 (retried), w2 claims 100, completes 200
#                                                                   wait 100, run 100, 2 attempts
#   C: submitted 3660, still waiting
#   D: submitted 5, w2 claims 20, lease expires at 1000, waiting again
#   E: submitted 40, w1 claims 50, fails for good at 80             wait 10,  run 30
EVENTS = [
    # task, status, previous, worker, at, reason
    ("A", "WAITING", None, None, 0, None),
    ("B", "WAITING", None, None, 0, None),
    ("D", "WAITING", None, None, 5, None),
    ("A", "WORKING", "WAITING", "w1", 10, None),
    ("D", "WORKING", "WAITING", "w2", 20, None),
    ("B", "WORKING", "WAITING", "w1", 30, None),
    ("E", "WAITING", None, None, 40, None),
    ("B", "WAITING", "WORKING", "w1", 50, None),
    ("E", "WORKING", "WAITING", "w1", 50, None),
    ("A", "COMPLETED", "WORKING", "w1", 70, None),
    ("E", "FAILED", "WORKING", "w1", 80, None),
    ("B", "WORKING", "WAITING", "w2", 100, None),
    ("B", "COMPLETED", "WORKING", "w2", 200, None),
    ("D", "WAITING", "WORKING", "w2", 1000, "lease_expired"),
    ("C", "WAITING", None, None, 3660, None),
]
TASKS = {
    # id: directory, priority, tags, status, worker, created, started, completed
    "A": ("/repo", 2, ["bug"], "COMPLETED", "w1", 0, 10, 70),
    "B": ("/repo", 1, ["bug", "tests"], "COMPLETED", "w2", 0, 100, 200),
    "C": ("/docs", 0, [], "WAITING", None, 3660, None, None),
    "D": ("/docs", 1, ["tests"], "WAITING", None, 5, None, None),
    "E": ("/repo", 2, ["flaky"], "FAILED", "w1", 40, 50, 80),
}


def _us(seconds: int | None) -> int:
    return NO_TIME if seconds is None else BASE + seconds * US


def fixed_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    task_rows = [
        (seq, tid, d, f"task {tid}", p, json.dumps(tags), STATUSES.index(s), w, _us(c), _us(st),
         _us(done), _us(done if done is not None else c), 0, 3, None)
        for seq, (tid, (d, p, tags, s, w, c, st, done)) in enumerate(TASKS.items(), start=1)
    ]  # fmt: skip
    event_rows = [
        (i, tid, STATUSES.index(s),
         -1 if prev is None else STATUSES.index(prev), w, _us(at), reason)
        for i, (tid, s, prev, w, at, reason) in enumerate(EVENTS, start=1)
    ]  # fmt: skip
    raw = Raw(
        [list(c) for c in zip(*task_rows, strict=True)],
        [list(c) for c in zip(*event_rows, strict=True)],
    )
    return frames(raw)


@pytest.fixture
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    return fixed_data()


def by_id(tasks: pd.DataFrame) -> pd.DataFrame:
    return tasks.set_index("id")


def test_derived_columns_are_computed_from_times_and_history(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    tasks = by_id(data[0])
    assert tasks["wait_s"].to_dict() == pytest.approx(
        {"A": 10, "B": 100, "C": np.nan, "D": np.nan, "E": 10}, nan_ok=True
    )
    assert tasks.loc[["A", "B", "E"], "run_s"].tolist() == [60, 100, 30]
    assert tasks["attempts"].to_dict() == {"A": 1, "B": 2, "C": 0, "D": 1, "E": 1}
    assert tasks["lease_expiries"].to_dict() == {"A": 0, "B": 0, "C": 0, "D": 1, "E": 0}


def test_throughput_counts_each_kind_of_event_per_interval(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    counts = analytics.throughput(data[1], "1h")
    assert list(counts.index) == [T0, T0 + pd.Timedelta(hours=1)]
    first = counts.iloc[0].to_dict()
    assert first == {
        "submitted": 4,
        "started": 5,
        "completed": 2,
        "failed": 1,
        "retried": 2,
        "cancelled": 0,
    }
    assert counts.iloc[1]["submitted"] == 1


def test_throughput_within_a_window_spans_the_whole_window(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    counts = analytics.throughput(
        data[1], "30min", since=T0 + pd.Timedelta(seconds=60), until=T0 + pd.Timedelta(hours=3)
    )
    assert len(counts) == 6  # 00:00 .. 02:30
    assert counts["completed"].sum() == 2  # A at 70 s and B at 200 s; nothing before 60 s counts
    assert counts["submitted"].sum() == 1  # only C


def test_latency_percentiles_interpolate_like_numpy(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    overall = analytics.latency(data[0]).loc["all"]
    assert overall["tasks"] == 5
    assert overall["wait_p50"] == pytest.approx(10)  # waits 10, 10, 100
    assert overall["wait_p90"] == pytest.approx(82)  # 10 + 0.8 * 90
    assert overall["run_p50"] == pytest.approx(60)  # runs 30, 60, 100
    assert overall["run_p99"] == pytest.approx(99.2)
    by_tag = analytics.latency(data[0], by="tag")
    assert by_tag.loc["bug", "wait_p50"] == pytest.approx(55)  # A 10, B 100
    assert by_tag.loc["tests", "tasks"] == 2


def test_backlog_replays_history_into_waiting_and_working(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    level = analytics.backlog(data[1], "1min", until=T0 + pd.Timedelta(minutes=4))
    # each row holds the state at the end of its interval
    assert level.loc[T0].to_dict() == {"waiting": 1, "working": 3}  # B waiting; A, D, E working
    assert level.loc[T0 + pd.Timedelta(minutes=1)].to_dict() == {"waiting": 0, "working": 2}  # B, D
    assert level.loc[T0 + pd.Timedelta(minutes=3)].to_dict() == {"waiting": 0, "working": 1}  # D
    hourly = analytics.backlog(data[1], "1h", until=T0 + pd.Timedelta(hours=2))
    assert hourly["waiting"].tolist() == [1, 2]  # D requeued; then C as well
    assert hourly["working"].tolist() == [0, 0]


def test_utilisation_sums_claimed_time_per_worker(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    table = analytics.utilisation(data[1], since=T0, until=T0 + pd.Timedelta(hours=1))
    w1, w2 = table.loc["w1"], table.loc["w2"]
    assert w1["busy_s"] == 60 + 20 + 30
    assert w2["busy_s"] == 980 + 100
    # w1 ran A 10-70, B 30-50 and E 50-80: busy from 10 to 80 s, some of it on two tasks at once.
    assert w1["held_s"] == 70
    assert w1["utilisation"] == pytest.approx(70 / 3600)
    assert w1["mean_running"] == pytest.approx(110 / 3600)
    assert w2["held_s"] == 980  # D 20-1000 covers B 100-200
    assert (w1["attempts"], w1["completed"], w1["failed"], w1["lease_expired"]) == (3, 1, 2, 0)
    assert (w2["attempts"], w2["completed"], w2["failed"], w2["lease_expired"]) == (2, 1, 0, 1)
    clipped = analytics.utilisation(
        data[1], since=T0 + pd.Timedelta(seconds=900), until=T0 + pd.Timedelta(seconds=1900)
    )
    assert clipped.loc["w2", "busy_s"] == 100  # D's attempt from 900 s to its expiry at 1000 s


def utilisation_events(claims: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """History where each worker runs the given (start, end) claims, in seconds after T0."""
    rows = []
    for worker, spans in claims.items():
        for n, (begin, end) in enumerate(spans):
            task = f"{worker}-{n}"
            rows += [
                (task, "WAITING", None, None, 0, None),
                (task, "WORKING", "WAITING", worker, begin, None),
                (task, "COMPLETED", "WORKING", worker, end, None),
            ]
    rows.sort(key=lambda row: row[4])
    event_rows = [
        (i, tid, STATUSES.index(s), -1 if prev is None else STATUSES.index(prev), w, _us(at), r)
        for i, (tid, s, prev, w, at, r) in enumerate(rows, start=1)
    ]
    done = STATUSES.index("COMPLETED")
    task_rows = [
        (seq, f"{worker}-{n}", "/repo", "p", 1, "[]", done, worker, _us(0), _us(begin),
         _us(end), _us(end), 0, 3, None)
        for seq, (worker, n, begin, end) in enumerate(
            ((w, n, b, e) for w, spans in claims.items() for n, (b, e) in enumerate(spans)),
            start=1,
        )
    ]  # fmt: skip
    raw = Raw(
        [list(c) for c in zip(*task_rows, strict=True)],
        [list(c) for c in zip(*event_rows, strict=True)],
    )
    return frames(raw)[1]


def test_utilisation_is_the_share_of_the_window_a_worker_is_busy_never_above_one() -> None:
    events = utilisation_events(
        {
            "slots-2": [(0, 3600), (0, 3600)],  # two tasks at once, the whole hour
            "staggered": [(0, 1200), (600, 1800), (3000, 3600)],  # busy 0-1800 and 3000-3600
            "half": [(0, 1800)],
        }
    )
    table = analytics.utilisation(events, since=T0, until=T0 + pd.Timedelta(hours=1))
    assert table["utilisation"].to_dict() == pytest.approx(
        {"slots-2": 1.0, "staggered": 2400 / 3600, "half": 0.5}
    )
    assert table["mean_running"].to_dict() == pytest.approx(
        {"slots-2": 2.0, "staggered": 3000 / 3600, "half": 0.5}
    )
    assert (table["utilisation"] <= 1.0).all()
    figure = analytics.utilisation_chart(events, since=T0, until=T0 + pd.Timedelta(hours=1))
    (ax,) = figure.axes
    bars = {
        label.get_text(): bar.get_width()
        for label, bar in zip(ax.get_yticklabels(), ax.patches, strict=True)
    }
    assert bars == pytest.approx({"slots-2": 1.0, "staggered": 2400 / 3600, "half": 0.5})
    assert "1.0 = never idle" in ax.get_xlabel()
    assert ax.get_xlim() == (0, 1)


def test_failure_and_retry_rates_overall_and_by_group(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    overall = analytics.failure_rates(data[0]).loc["all"]
    assert overall["failure_rate"] == pytest.approx(1 / 3)  # E failed; A, B completed
    assert overall["retry_rate"] == pytest.approx(1 / 4)  # B of the claimed A, B, D, E
    assert (overall["retries"], overall["lease_expiries"], overall["finished"]) == (1, 1, 3)
    tags = analytics.failure_rates(data[0], by="tag")
    assert tags.loc["flaky", "failure_rate"] == 1.0
    assert tags.loc["bug", "failure_rate"] == 0.0
    assert tags.loc["tests", "failure_rate"] == 0.0  # B completed, D still waiting


def test_breakdown_by_priority_counts_statuses(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    table = analytics.breakdown(data[0], "priority")
    assert table.loc["HIGH", ["tasks", "completed", "failed"]].tolist() == [2, 1, 1]
    assert table.loc["MEDIUM", ["tasks", "completed", "waiting"]].tolist() == [2, 1, 1]
    assert table.loc["LOW", "waiting"] == 1
    directories = analytics.breakdown(data[0], "work_directory")
    assert directories.loc["/repo", "run_p50"] == pytest.approx(60)


def test_summary_slowest_and_most_failed(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tasks, events = data
    figures = analytics.summary(tasks, events, since=T0, until=T0 + pd.Timedelta(hours=2))
    assert (figures["submitted"], figures["completed"], figures["failed"]) == (5, 2, 1)
    assert figures["waiting"] == 2
    assert figures["working"] == 0
    assert figures["completed_per_hour"] == pytest.approx(1.0)
    assert analytics.slowest(tasks, 2)["id"].tolist() == ["B", "A"]
    failed = analytics.most_failed(tasks)
    assert set(failed["id"]) == {"B", "D", "E"}
    assert failed.set_index("id").loc["D", "lease_expiries"] == 1


def test_metrics_accept_empty_frames() -> None:
    tasks, events = frames(Raw([[] for _ in range(15)], [[] for _ in range(7)]))
    assert analytics.throughput(events).empty
    assert analytics.backlog(events).empty
    assert analytics.utilisation(events).empty
    assert analytics.latency(tasks).loc["all", "tasks"] == 0


# --- loading from real databases ---


async def fill(service: TaskService, clock: FakeClock) -> dict[str, str]:
    """Three tasks through the real service: one done after a retry, one failed, one waiting."""
    start = clock.now
    done = await service.submit(
        task_spec(work_directory="/repo", prompt="fix it", priority="HIGH", tags=["bug", "ci"])
    )
    failed = await service.submit(
        task_spec(work_directory="/docs", prompt="write it", max_retries=0)
    )
    clock.advance(10)
    (claimed,) = await service.claim("/repo", "w1")
    clock.advance(5)
    await service.fail(claimed.id, "w1", "flaky")
    clock.advance(60)  # past the backoff
    (claimed,) = await service.claim("/repo", "w2")
    clock.advance(30)
    await service.complete(claimed.id, "w2", {"ok": True})
    (claimed,) = await service.claim("/docs", "w1")
    clock.advance(1)
    await service.fail(claimed.id, "w1", "broken")
    clock.advance(3600)
    waiting = await service.submit(
        task_spec(work_directory="/repo", prompt="later", priority="LOW")
    )
    # On PostgreSQL an event gets its position a moment after its commit; reading the last
    # change's history waits for it, and every earlier change is positioned before it.
    assert len(await service.history(waiting.id)) == 1
    return {"done": done.id, "failed": failed.id, "waiting": waiting.id, "start": start.isoformat()}


def check_loaded(data: analytics.TaskData, ids: dict[str, str]) -> None:
    tasks = data.tasks.set_index("id")
    assert set(tasks.index) == {ids["done"], ids["failed"], ids["waiting"]}
    done = tasks.loc[ids["done"]]
    assert done["tags"] == ["bug", "ci"]
    assert done["priority"] == "HIGH"
    assert done["status"] == "COMPLETED"
    assert (done["wait_s"], done["run_s"], done["attempts"]) == (75.0, 30.0, 2)
    assert tasks.loc[ids["failed"], "status"] == "FAILED"
    assert np.isnan(tasks.loc[ids["waiting"], "wait_s"])
    assert str(data.tasks["created_at"].dtype).startswith("datetime64")
    assert str(data.tasks["created_at"].dt.tz) == "UTC"
    assert isinstance(data.tasks["status"].dtype, pd.CategoricalDtype)
    assert data.tasks["priority"].cat.ordered
    assert list(data.tasks["priority"].cat.categories) == [
        "LOW",
        "MEDIUM",
        "HIGH",
    ]
    events = data.events
    assert len(events) == 3 + 2 + 2 + 1 + 1
    assert events["id"].is_monotonic_increasing
    assert events["at"].dt.tz is not None
    assert set(events["worker_id"].dropna()) == {"w1", "w2"}


async def test_load_reads_what_the_service_wrote(
    database_url: str, service: TaskService, clock: FakeClock
) -> None:
    ids = await fill(service, clock)
    check_loaded(analytics.load(database_url), ids)


TASK_DTYPES = {
    "seq": "int64", "id": "str", "work_directory": "category", "prompt": "str",
    "priority": "category", "tags": "object", "status": "category", "worker_id": "category",
    "created_at": "datetime64[us, UTC]", "started_at": "datetime64[us, UTC]",
    "completed_at": "datetime64[us, UTC]", "updated_at": "datetime64[us, UTC]",
    "retry_count": "int64", "max_retries": "int64", "error_message": "str", "wait_s": "float64",
    "run_s": "float64", "attempts": "int64", "lease_expiries": "int64",
}  # fmt: skip
EVENT_DTYPES = {
    "id": "int64", "task_id": "category", "work_directory": "category", "status": "category",
    "previous_status": "category", "worker_id": "category", "at": "datetime64[us, UTC]",
    "reason": "category",
}  # fmt: skip


def dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {name: str(dtype) for name, dtype in frame.dtypes.items()}


async def test_every_source_gives_the_same_columns_and_dtypes(
    database_url: str, service: TaskService, clock: FakeClock
) -> None:
    ids = await fill(service, clock)
    data = analytics.load(database_url)
    assert dtypes(data.tasks) == TASK_DTYPES
    assert dtypes(data.events) == EVENT_DTYPES
    assert data.tasks.set_index("id").loc[ids["failed"], "error_message"] == "broken"
    assert data.tasks["error_message"].isna().sum() == 1  # the waiting task
    assert data.events["reason"].isna().all()  # no lease expired, nothing released
    fixed_tasks, fixed_events = fixed_data()  # the raw-sequence path
    # (a text column with no value at all has nothing to infer str from, so it stays object)
    assert dtypes(fixed_tasks) == {**TASK_DTYPES, "error_message": "object"}
    assert dtypes(fixed_events) == EVENT_DTYPES
    for frame in (data.tasks, data.events, fixed_tasks, fixed_events):
        for name in frame.columns:
            if isinstance(frame[name].dtype, pd.CategoricalDtype):
                assert str(frame[name].cat.categories.dtype) in ("str", "object"), name


async def test_time_window_is_applied_in_the_query(
    database_url: str, service: TaskService, clock: FakeClock
) -> None:
    ids = await fill(service, clock)
    start = pd.Timestamp(ids["start"])
    early = analytics.load(database_url, until=start + pd.Timedelta(minutes=30))
    assert set(early.tasks["id"]) == {ids["done"], ids["failed"]}
    late = analytics.load(database_url, since=start + pd.Timedelta(minutes=30))
    assert set(late.tasks["id"]) == {ids["waiting"]}  # the others finished before the window
    assert set(late.events["task_id"].astype(str)) == {ids["waiting"]}
    with pytest.raises(analytics.SourceError, match="since must be earlier"):
        analytics.load(database_url, since=start, until=start)


def test_sqlite_source_is_opened_read_only(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(analytics.SourceError, match="no SQLite database"):
        analytics.load(f"sqlite:///{missing}")
    assert not missing.exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(analytics.SourceError, match="taskorch database"):
        analytics.load(f"sqlite:///{other}")
    with pytest.raises(analytics.SourceError, match="source must be"):
        analytics.load("mysql://x")


async def test_load_from_a_live_server_pages_through_graphql(
    database_url: str, server: ServerProcess, remote: GraphQLClient
) -> None:
    inputs = [
        {"workDirectory": f"/repo{i % 3}", "prompt": f"task {i}", "tags": ["t"]}
        for i in range(1005)
    ]
    for chunk in (inputs[:1000], inputs[1000:]):
        await remote.ok(
            "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }",
            inputs=chunk,
        )
    claimed = await remote.ok(
        'mutation { claimTask(workDirectory: "/repo0", workerId: "w1") { id } }'
    )
    task_id = claimed["claimTask"]["id"]
    await remote.ok(f'mutation {{ completeTask(id: "{task_id}", workerId: "w1") {{ id }} }}')
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "api.cli", "keys", "create", "--name", "analyst", "--scopes", "read",
         "--database", database_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    with pytest.raises(analytics.SourceError, match="refused the API key"):
        analytics.load(server.url, api_key="tko_not-a-key")
    data = analytics.load(server.url, api_key=made.stdout.strip())
    assert len(data.tasks) == 1005  # two pages
    assert len(data.events) == 1005 + 2
    done = data.tasks.set_index("id").loc[task_id]
    assert done["status"] == "COMPLETED"
    assert done["attempts"] == 1
    assert done["tags"] == ["t"]
    assert data.tasks["created_at"].dt.tz is not None
    # The pages (read at once, decoded in columns) give the databases' columns and dtypes.
    assert dtypes(data.tasks) == TASK_DTYPES
    assert dtypes(data.events) == EVENT_DTYPES
    assert set(data.events["task_id"].astype(str)) == set(data.tasks["id"])


# --- dashboard ---


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def test_dashboard_builds_filters_and_refreshes(tmp_path: Path) -> None:
    # One backend is enough here: loading from each is tested above.
    url = f"sqlite:///{tmp_path / 'board.db'}"
    clock = FakeClock()
    store = open_store(Settings(database_url=url, durability="normal"))
    await store.open()
    service = TaskService(store, LocalBus(), clock=clock, jitter=lambda: 1.0)
    try:
        await fill(service, clock)
        board = analytics.dashboard(url, window="all time")
        try:
            assert board.error is None, board.error
            assert "submitted" in board.figures.value
            assert all(bytes(i.value).startswith(b"\x89PNG") for i in board.images.values())
            assert "/docs" in board.directory.options
            assert "bug" in board.tag.options
            before = board.images["throughput"].value
            board.directory.value = "/docs"
            assert set(board.filtered()[0]["work_directory"]) == {"/docs"}
            assert board.images["throughput"].value != before
            board.tag.value = "bug"  # no /docs task has it: empty, still drawn
            assert board.filtered()[0].empty
            assert board.error is None

            await service.submit(task_spec(work_directory="/new", prompt="new one"))
            refreshes = board.refreshes
            board.refresh_button.click()
            assert board.refreshes == refreshes + 1
            assert "/new" in board.directory.options
            assert board.directory.value == "/docs"  # filters survive a refresh
            board.every.value = 1
            board.auto.value = True
            wait_for(lambda: board.refreshes >= refreshes + 2)
            board.auto.value = False
        finally:
            board.close()
    finally:
        await store.close()


def test_dashboard_shows_a_load_error_instead_of_raising(tmp_path: Path) -> None:
    board = analytics.dashboard(f"sqlite:///{tmp_path / 'none.db'}")
    assert board.data is None
    assert "no SQLite database" in board.status.value
    board.close()


async def submit_and_finish(remote: GraphQLClient, directory: str, count: int) -> list[str]:
    inputs = [{"workDirectory": directory, "prompt": f"live {i}", "tags": ["live"]}
              for i in range(count)]  # fmt: skip
    await remote.ok(
        "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }",
        inputs=inputs,
    )
    done = []
    for _ in range(count - 1):  # one stays waiting
        claimed = await remote.ok(
            f'mutation {{ claimTask(workDirectory: "{directory}", workerId: "w9") {{ id }} }}'
        )
        task_id = claimed["claimTask"]["id"]
        await remote.ok(f'mutation {{ completeTask(id: "{task_id}", workerId: "w9") {{ id }} }}')
        done.append(task_id)
    return done


def live_board_sees(board: analytics.Dashboard, directory: str, done: list[str]) -> bool:
    data = board.data
    if data is None:
        return False
    tasks = data.tasks[data.tasks["work_directory"] == directory]
    return len(tasks) == len(done) + 1 and set(
        tasks.loc[tasks["status"] == "COMPLETED", "id"]
    ) == set(done)


async def test_live_dashboard_follows_a_server_as_tasks_arrive(
    server: ServerProcess, remote: GraphQLClient
) -> None:
    await submit_and_finish(remote, "/before", 2)
    board = await asyncio.to_thread(analytics.dashboard, server.url, window="all time", live=True)
    try:
        assert board.follower is not None
        assert board.data is not None
        assert len(board.data.tasks) == 2
        done = await submit_and_finish(remote, "/live", 4)
        await asyncio.to_thread(wait_for, lambda: live_board_sees(board, "/live", done))
        assert board.updates >= 1
        assert board.refreshes == 1  # applied as events, not reloaded
        assert "/live" in board.directory.options
        data = board.data
        assert data is not None
        fresh = await asyncio.to_thread(analytics.load, server.url)
        assert dtypes(data.tasks) == dtypes(fresh.tasks)
        assert dtypes(data.events) == dtypes(fresh.events) == EVENT_DTYPES
        assert data.tasks["id"].tolist() == fresh.tasks["id"].tolist()
        assert data.events["id"].tolist() == fresh.events["id"].tolist()
        live = data.tasks.set_index("id").loc[done[0]]
        assert (live["attempts"], live["tags"], live["worker_id"]) == (1, ["live"], "w9")
        assert data.events["id"].is_unique
        assert data.events["id"].is_monotonic_increasing
        assert "live (" in board.status.value
        figures = analytics.summary(data.tasks, data.events)
        assert figures["completed"] == 1 + 3
        assert figures["waiting"] == 1 + 1
    finally:
        await asyncio.to_thread(board.close)
    assert board.follower is not None
    assert not board.follower.running


async def test_live_dashboard_polls_a_database_by_event_id(
    database_url: str, server: ServerProcess, remote: GraphQLClient
) -> None:
    board = await asyncio.to_thread(analytics.dashboard, database_url, window="all time", live=True)
    try:
        assert board.data is not None
        assert len(board.data.tasks) == 0
        done = await submit_and_finish(remote, "/polled", 3)
        await asyncio.to_thread(wait_for, lambda: live_board_sees(board, "/polled", done))
        assert board.refreshes == 1
        data = board.data
        fresh = await asyncio.to_thread(analytics.load, database_url)
        pd.testing.assert_frame_equal(data.tasks, fresh.tasks)
        pd.testing.assert_frame_equal(data.events, fresh.events)
        assert int(data.tasks["attempts"].sum()) == 2
    finally:
        await asyncio.to_thread(board.close)
    assert board.follower is not None
    assert not board.follower.running


def test_latency_chart_draws_sub_second_times() -> None:
    tasks = fixed_data()[0].assign(wait_s=0.002, run_s=0.004)
    (ax,) = analytics.latency_chart(tasks).axes
    assert ax.get_xscale() == "log"


async def test_an_empty_database_loads_as_empty_typed_frames(
    store: object, database_url: str
) -> None:
    data = analytics.load(database_url)
    assert (len(data.tasks), len(data.events)) == (0, 0)
    assert dtypes(data.events) == EVENT_DTYPES
    assert isinstance(data.tasks["status"].dtype, pd.CategoricalDtype)


async def test_throughput_counted_in_the_database_equals_the_loaded_one(
    database_url: str, service: TaskService, clock: FakeClock
) -> None:
    ids = await fill(service, clock)
    start = pd.Timestamp(ids["start"])
    events = analytics.load(database_url).events
    windows = [
        (None, None, "1h"),
        (None, None, "1min"),
        (start + pd.Timedelta(seconds=20), None, "15min"),
        (None, start + pd.Timedelta(minutes=30), "1min"),
        (start - pd.Timedelta(hours=2), start + pd.Timedelta(hours=3), "30min"),
    ]
    for since, until, freq in windows:
        expected = analytics.throughput(events, freq, since, until)
        counted = analytics.database_throughput(database_url, freq, since, until)
        pd.testing.assert_frame_equal(counted, expected)
        assert counted.values.sum() > 0
    with pytest.raises(analytics.SourceError, match="database URL"):
        analytics.database_throughput("http://127.0.0.1:1")
