"""Metrics: plain functions from the `tasks` / `events` frames to small DataFrames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analytics.load import TimeLike, timestamp

PERCENTILES = (0.5, 0.9, 0.99)
THROUGHPUT_KINDS = ("submitted", "started", "completed", "failed", "retried", "cancelled")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def _clip(events: pd.DataFrame, since: TimeLike, until: TimeLike) -> pd.DataFrame:
    start, end = timestamp(since, "since"), timestamp(until, "until")
    mask = np.ones(len(events), dtype=bool)
    if start is not None:
        mask &= (events["at"] >= start).to_numpy()
    if end is not None:
        mask &= (events["at"] < end).to_numpy()
    return events[mask] if not mask.all() else events


def _step(freq: str) -> pd.Timedelta:
    try:
        step = pd.Timedelta(freq)
    except ValueError:
        raise ValueError(
            f"freq must be a fixed interval such as 15min, 1h or 1D, not {freq!r}"
        ) from None
    if step <= pd.Timedelta(0):
        raise ValueError(f"freq must be a positive interval, not {freq!r}")
    return step


def _micros(times: pd.Series) -> np.ndarray:
    return np.asarray(pd.DatetimeIndex(times).as_unit("us").asi8)


def grid(
    at: np.ndarray, freq: str, since: TimeLike, until: TimeLike
) -> tuple[pd.DatetimeIndex, int, int]:
    """Interval starts covering the window (or the events), the first start and the step, in us."""
    step = _step(freq)
    start, end = timestamp(since, "since"), timestamp(until, "until")
    if start is None:
        if not len(at):
            return pd.DatetimeIndex([], tz="UTC"), 0, 1
        start = pd.Timestamp(int(at.min()), unit="us", tz="UTC")
    first = start.floor(step)
    if end is not None:
        starts = pd.date_range(first, end, freq=step, inclusive="left")
    elif len(at):
        starts = pd.date_range(first, pd.Timestamp(int(at.max()), unit="us", tz="UTC"), freq=step)
    else:
        starts = pd.DatetimeIndex([first])
    return starts, int(first.value // 1000), int(step.value // 1000)


def throughput(
    events: pd.DataFrame, freq: str = "1h", since: TimeLike = None, until: TimeLike = None
) -> pd.DataFrame:
    """Counts per interval (index: interval start, UTC): submitted (new tasks), started (claims),
    completed, failed (final failures), retried (failed attempts sent back to the queue,
    lease expiries included) and cancelled. `freq` is a fixed interval: 15min, 1h, 6h, 1D."""
    ev = _clip(events, since, until)
    status, previous = ev["status"], ev["previous_status"]
    kinds = {
        "submitted": previous.isna(),
        "started": status == "WORKING",
        "completed": status == "COMPLETED",
        "failed": status == "FAILED",
        "retried": (status == "WAITING") & (previous == "WORKING") & (ev["reason"] != "released"),
        "cancelled": status == "CANCELLED",
    }
    at = _micros(ev["at"])
    intervals, first, step = grid(at, freq, since, until)
    bucket = (at - first) // step
    result = pd.DataFrame(
        {
            name: np.bincount(bucket[mask.to_numpy()], minlength=len(intervals))[: len(intervals)]
            for name, mask in kinds.items()
        },
        index=intervals,
    ).astype("int64")
    result.index.name = "interval"
    return result


def latency(
    tasks: pd.DataFrame, by: str | None = None, percentiles: Sequence[float] = PERCENTILES
) -> pd.DataFrame:
    """Percentiles of wait_s (created -> started) and run_s (started -> finished), in seconds, over
    the tasks that have them: one row, or one row per value of column `by` (e.g. "work_directory",
    "priority", "worker_id", or "tag" to count a task once under each of its tags). Columns:
    tasks, wait_p50, wait_p90, wait_p99, run_p50, run_p90, run_p99 (for the default percentiles)."""
    frame, key = _grouped(tasks, by)
    rows = {}
    groups = [("all", frame)] if key is None else list(frame.groupby(key, observed=True))
    for name, group in groups:
        row: dict[str, float] = {"tasks": float(len(group))}
        for measure in ("wait", "run"):
            values = group[f"{measure}_s"].dropna().to_numpy()
            for p in percentiles:
                label = f"{measure}_p{round(p * 100):d}"
                row[label] = float(np.quantile(values, p)) if len(values) else float("nan")
        rows[name] = row
    columns = ["tasks"] + [f"{m}_p{round(p * 100):d}" for m in ("wait", "run") for p in percentiles]
    result = pd.DataFrame.from_dict(rows, orient="index", columns=columns) if rows else None
    if result is None:
        result = pd.DataFrame(columns=columns, dtype="float64")
    result["tasks"] = result["tasks"].astype("int64")
    result.index.name = key or "scope"
    return result


def _grouped(tasks: pd.DataFrame, by: str | None) -> tuple[pd.DataFrame, str | None]:
    if by is None:
        return tasks, None
    if by in ("tag", "tags"):
        exploded = tasks.explode("tags")
        exploded = exploded[exploded["tags"].notna()].rename(columns={"tags": "tag"})
        return exploded, "tag"
    if by not in tasks.columns:
        raise ValueError(f"by must be a column of tasks or 'tag', not {by!r}")
    return tasks, by


def backlog(
    events: pd.DataFrame, freq: str = "1h", since: TimeLike = None, until: TimeLike = None
) -> pd.DataFrame:
    """Tasks WAITING and WORKING at the end of each interval, replayed from the history: each
    event adds one to its status and takes one from its previous status. Give the frame every event
    of the tasks (as `load` does), including those before `since`."""
    at = _micros(events["at"])
    order = np.lexsort((events["id"].to_numpy(), at))
    at = at[order]
    counts = {}
    for status in ("WAITING", "WORKING"):
        into = (events["status"] == status).to_numpy()[order].astype("int64")
        out_of = (events["previous_status"] == status).to_numpy()[order].astype("int64")
        counts[status.lower()] = np.cumsum(into - out_of)
    intervals, first, step = grid(at, freq, since, until)
    # The state at an interval's end is the one after the last event before that end.
    ends = first + step * (np.arange(len(intervals)) + 1)
    position = np.searchsorted(at, ends, side="left") - 1
    result = pd.DataFrame(index=intervals)
    for name, level in counts.items():
        values = (
            level[np.clip(position, 0, None)] if len(level) else np.zeros(len(intervals), "int64")
        )
        result[name] = np.where(position >= 0, values, 0).astype("int64")
    result.index.name = "interval"
    return result


def attempts(events: pd.DataFrame, until: TimeLike = None) -> pd.DataFrame:
    """One row per claim: task_id, worker_id, started, ended (the task's next event; `until`, or
    the last event, while it still runs), outcome (the status that ended it, or WORKING) and
    reason (of the ending event: "lease_expired", "released" or NaN)."""
    order = np.lexsort((events["id"].to_numpy(), events["task_id"].cat.codes.to_numpy()))
    ev = events.iloc[order].reset_index(drop=True)
    count = len(ev)
    task = ev["task_id"].cat.codes.to_numpy()
    same_next = np.zeros(count, dtype=bool)
    same_next[:-1] = task[1:] == task[:-1]
    claims = np.flatnonzero((ev["status"] == "WORKING").to_numpy())
    has_next = same_next[claims]
    following = ev.iloc[np.minimum(claims + 1, max(count - 1, 0))].reset_index(drop=True)
    end = timestamp(until, "until")
    open_end = end if end is not None else (ev["at"].max() if count else pd.NaT)
    claimed = ev.iloc[claims].reset_index(drop=True)
    return pd.DataFrame(
        {
            "task_id": claimed["task_id"],
            "worker_id": claimed["worker_id"],
            "started": claimed["at"],
            "ended": following["at"].where(has_next, open_end),
            "outcome": following["status"].astype(object).where(has_next, "WORKING"),
            "reason": following["reason"].astype(object).where(has_next, None),
        }
    )


def _held_s(worker: pd.Series, lo: pd.Series, hi: pd.Series) -> pd.Series:
    """Per worker, the seconds in which it held at least one task: overlapping claims count once."""
    runs = pd.DataFrame({"worker_id": worker, "lo": lo, "hi": hi})
    runs = runs[runs["hi"] > runs["lo"]].sort_values(["worker_id", "lo"], kind="stable")
    if not len(runs):
        return pd.Series(dtype="float64")
    # A claim starts a new busy stretch when it begins after every earlier claim of its worker ended.
    reach = runs.groupby("worker_id", observed=True)["hi"].cummax()
    before = reach.groupby(runs["worker_id"], observed=True).shift()
    stretch = (before.isna() | (runs["lo"] > before)).cumsum()
    spans = runs.groupby(stretch).agg(
        worker_id=("worker_id", "first"), lo=("lo", "min"), hi=("hi", "max")
    )
    seconds = (spans["hi"] - spans["lo"]).dt.total_seconds()
    return seconds.groupby(spans["worker_id"], observed=True).sum()


def utilisation(
    events: pd.DataFrame, since: TimeLike = None, until: TimeLike = None
) -> pd.DataFrame:
    """Per worker over the window: attempts started, completed, failed (attempts that failed,
    retried or not), lease_expired, busy_s (seconds spent running tasks inside the window, summed
    over tasks: two tasks at once count twice), held_s (seconds in which the worker ran at least one
    task), utilisation = held_s / window length (from 0 to 1: 1.0 = never idle), and mean_running =
    busy_s / window length (tasks run at once on average; a worker with `--concurrency N` reaches at
    most N, so mean_running / N is the share of its slots in use)."""
    columns = ["attempts", "completed", "failed", "lease_expired", "busy_s", "held_s"]
    start, end = timestamp(since, "since"), timestamp(until, "until")
    runs = attempts(events, end)
    if start is None:
        start = runs["started"].min() if len(runs) else None
    if end is None:
        end = runs["ended"].max() if len(runs) else None
    if start is None or end is None or not len(runs):
        empty = pd.DataFrame(columns=[*columns, "utilisation", "mean_running"])
        return empty.rename_axis("worker_id")
    lo = runs["started"].clip(lower=start)
    hi = runs["ended"].clip(upper=end)
    runs["busy_s"] = (hi - lo).dt.total_seconds().clip(lower=0)
    inside = (runs["started"] >= start) & (runs["started"] < end)
    runs["attempts"] = inside.astype("int64")
    finished_inside = (runs["ended"] >= start) & (runs["ended"] < end)
    runs["completed"] = ((runs["outcome"] == "COMPLETED") & finished_inside).astype("int64")
    expired = runs["reason"] == "lease_expired"
    runs["lease_expired"] = (expired & finished_inside).astype("int64")
    failed = runs["outcome"].isin(["FAILED", "WAITING"]) & ~expired & (runs["reason"] != "released")
    runs["failed"] = (failed & finished_inside).astype("int64")
    result = runs.groupby("worker_id", observed=True)[columns[:-1]].sum()
    held = _held_s(runs["worker_id"], lo, hi)
    result["held_s"] = held.reindex(result.index, fill_value=0.0).astype("float64")
    window = (end - start).total_seconds()
    result["utilisation"] = result["held_s"] / window
    result["mean_running"] = result["busy_s"] / window
    return result.sort_values("busy_s", ascending=False)


def failure_rates(tasks: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Per group (or one row "all"): tasks, finished, completed, failed, cancelled, failure_rate =
    failed / (completed + failed), retried (tasks claimed more than once), retry_rate = retried /
    tasks that were claimed, retries (claims beyond the first) and lease_expiries."""
    frame, key = _grouped(tasks, by)
    status = frame["status"]
    parts = pd.DataFrame(
        {
            "tasks": 1,
            "finished": status.isin(FINISHED).astype("int64"),
            "completed": (status == "COMPLETED").astype("int64"),
            "failed": (status == "FAILED").astype("int64"),
            "cancelled": (status == "CANCELLED").astype("int64"),
            "claimed": (frame["attempts"] > 0).astype("int64"),
            "retried": (frame["attempts"] > 1).astype("int64"),
            "retries": (frame["attempts"] - 1).clip(lower=0).astype("int64"),
            "lease_expiries": frame["lease_expiries"].astype("int64"),
        },
        index=frame.index,
    )
    if key is None:
        result = parts.sum().to_frame("all").T
        result.index.name = "scope"
    else:
        parts[key] = frame[key].to_numpy()
        result = parts.groupby(key, observed=True).sum()
    decided = result["completed"] + result["failed"]
    result["failure_rate"] = (result["failed"] / decided.where(decided > 0)).astype("float64")
    claimed = result.pop("claimed")
    result["retry_rate"] = (result["retried"] / claimed.where(claimed > 0)).astype("float64")
    return result


def breakdown(tasks: pd.DataFrame, by: str = "work_directory") -> pd.DataFrame:
    """Per value of `by` ("work_directory", "tag", "priority", "worker_id", ...): tasks in each
    status, failure and retry rates, and median / p90 wait and run times in seconds."""
    frame, key = _grouped(tasks, by)
    assert key is not None
    counts = pd.crosstab(frame[key], frame["status"]).reindex(
        columns=tasks["status"].cat.categories, fill_value=0
    )
    counts.columns = [str(c).lower() for c in counts.columns]
    rates = failure_rates(tasks, by)[["tasks", "failure_rate", "retry_rate", "lease_expiries"]]
    times = latency(tasks, by, (0.5, 0.9))
    result = rates.join(counts).join(times.drop(columns="tasks"))
    result.index.name = key
    return result.sort_values("tasks", ascending=False)


def summary(
    tasks: pd.DataFrame, events: pd.DataFrame, since: TimeLike = None, until: TimeLike = None
) -> pd.Series:
    """Headline figures over the window: tasks submitted, completed, failed, failure rate,
    retry rate, median and p90 wait and run (seconds), waiting and working at the end, and
    completions per hour."""
    ev = _clip(events, since, until)
    start, end = timestamp(since, "since"), timestamp(until, "until")
    finished = tasks["status"].isin(FINISHED) & tasks["completed_at"].notna()
    if start is not None:
        finished &= tasks["completed_at"] >= start
    if end is not None:
        finished &= tasks["completed_at"] < end
    done = tasks[finished]
    submitted = int(ev["previous_status"].isna().sum())
    completed = int((ev["status"] == "COMPLETED").sum())
    failed = int((ev["status"] == "FAILED").sum())
    upto = events if end is None else events[(events["at"] < end).to_numpy()]
    waiting, working = (
        int((upto["status"] == s).sum() - (upto["previous_status"] == s).sum())
        for s in ("WAITING", "WORKING")
    )
    start = start if start is not None else (ev["at"].min() if len(ev) else None)
    end = end if end is not None else (ev["at"].max() if len(ev) else None)
    hours = (end - start).total_seconds() / 3600 if start is not None and end is not None else 0.0
    rates = failure_rates(done) if len(done) else None
    return pd.Series(
        {
            "submitted": submitted,
            "completed": completed,
            "failed": failed,
            "failure_rate": failed / (completed + failed) if completed + failed else float("nan"),
            "retry_rate": float(rates["retry_rate"].iloc[0]) if rates is not None else float("nan"),
            "wait_p50_s": float(done["wait_s"].median()),
            "wait_p90_s": float(done["wait_s"].quantile(0.9)),
            "run_p50_s": float(done["run_s"].median()),
            "run_p90_s": float(done["run_s"].quantile(0.9)),
            "waiting": waiting,
            "working": working,
            "completed_per_hour": completed / hours if hours > 0 else float("nan"),
        },
        dtype="object",
    )


def slowest(tasks: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The `n` finished tasks with the longest run time."""
    columns = [
        "id",
        "work_directory",
        "priority",
        "status",
        "worker_id",
        "run_s",
        "wait_s",
        "prompt",
    ]
    return tasks.dropna(subset=["run_s"]).nlargest(n, "run_s")[columns]


def most_failed(tasks: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The `n` tasks with the most failed attempts (claims that did not complete), then latest."""
    failures = tasks["attempts"] - (tasks["status"] == "COMPLETED").astype("int64")
    failures -= (tasks["status"] == "WORKING").astype("int64")
    frame = tasks.assign(failed_attempts=failures)
    frame = frame[frame["failed_attempts"] > 0]
    columns = [
        "id", "work_directory", "status", "failed_attempts", "lease_expiries", "error_message",
        "prompt",
    ]  # fmt: skip
    return frame.sort_values(["failed_attempts", "updated_at"], ascending=False).head(n)[columns]
