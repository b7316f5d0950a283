"""Metrics: plain functions from the `tasks` / `events` frames to small DataFrames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analytics import claims, groups
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


_micros = claims.micros


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
    # Only the columns used: iterating the groups of the whole frame copies every column.
    frame = frame[[] if key is None else [key]].assign(wait_s=frame["wait_s"], run_s=frame["run_s"])
    rows = {}
    groups = [("all", frame)] if key is None else list(frame.groupby(key, observed=True))
    for name, group in groups:
        row: dict[str, float] = {"tasks": float(len(group))}
        for measure in ("wait", "run"):
            values = group[f"{measure}_s"].to_numpy()
            values = values[~np.isnan(values)]
            # One partial sort for every percentile: the same values as one call each.
            found = np.quantile(values, list(percentiles)) if len(values) else None
            for i, p in enumerate(percentiles):
                label = f"{measure}_p{round(p * 100):d}"
                row[label] = float(found[i]) if found is not None else float("nan")
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
    intervals, first, step = grid(at, freq, since, until)
    # The level at an interval's end counts every event before that end, in any order: so each
    # event goes into its interval (those before the first into the first), the intervals are
    # summed, and the running sum is the level.
    bucket = np.clip((at - first) // step, 0, None) if len(at) else at
    inside = bucket < len(intervals)
    result = pd.DataFrame(index=intervals)
    for status in ("WAITING", "WORKING"):
        into = is_value(events["status"], status) & inside
        out_of = is_value(events["previous_status"], status) & inside
        change = np.bincount(bucket[into], minlength=len(intervals)) - np.bincount(
            bucket[out_of], minlength=len(intervals)
        )
        result[status.lower()] = np.cumsum(change[: len(intervals)]).astype("int64")
    result.index.name = "interval"
    return result


def is_value(column: pd.Series, value: str) -> np.ndarray:
    """`column == value` as a boolean array; a categorical column compares its integer codes."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = column.cat.categories
        if value not in categories:
            return np.zeros(len(column), dtype=bool)
        return np.asarray(column.cat.codes.to_numpy() == categories.get_loc(value))
    return np.asarray((column == value).to_numpy(), dtype=bool)


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
    runs = claims.claims(events, None if end is None else _us(end))
    if not len(runs.started):
        empty = pd.DataFrame(columns=[*columns, "utilisation", "mean_running"])
        return empty.rename_axis("worker_id")
    low = _us(start) if start is not None else int(runs.started.min())
    high = _us(end) if end is not None else int(runs.ended.max())
    lo, hi = np.maximum(runs.started, low), np.minimum(runs.ended, high)
    finished_inside = (runs.ended >= low) & (runs.ended < high)
    status, reason = events["status"], events["reason"]
    expired = runs.reason == claims.code_of(reason, "lease_expired")
    failed = np.isin(runs.outcome, [claims.code_of(status, s) for s in ("FAILED", "WAITING")])
    failed &= ~expired & (runs.reason != claims.code_of(reason, "released"))
    worker_type = events["worker_id"].dtype
    parts = pd.DataFrame(
        {
            "worker_id": pd.Categorical.from_codes(runs.worker, dtype=worker_type),
            "busy_s": np.clip(claims.seconds(hi - lo), 0, None),
            "attempts": ((runs.started >= low) & (runs.started < high)).astype("int64"),
            "completed": (
                (runs.outcome == claims.code_of(status, "COMPLETED")) & finished_inside
            ).astype("int64"),
            "lease_expired": (expired & finished_inside).astype("int64"),
            "failed": (failed & finished_inside).astype("int64"),
        }
    )
    result = parts.groupby("worker_id", observed=True)[columns[:-1]].sum()
    stretch_worker, stretch_seconds = claims.held(runs.worker, lo, hi)
    held = pd.Series(stretch_seconds).groupby(
        pd.Categorical.from_codes(stretch_worker, dtype=worker_type), observed=True
    )
    result["held_s"] = held.sum().reindex(result.index, fill_value=0.0).astype("float64")
    window = (pd.Timestamp(high, unit="us") - pd.Timestamp(low, unit="us")).total_seconds()
    result["utilisation"] = result["held_s"] / window
    result["mean_running"] = result["busy_s"] / window
    return result.sort_values("busy_s", ascending=False)


def _us(stamp: pd.Timestamp) -> int:
    """A time as whole microseconds, rounded up: `at >= stamp` and `at < stamp` for microsecond
    times `at` hold exactly when they hold for these integers."""
    return -(-int(stamp.value) // 1000)


def failure_rates(tasks: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Per group (or one row "all"): tasks, finished, completed, failed, cancelled, failure_rate =
    failed / (completed + failed), retried (tasks claimed more than once), retry_rate = retried /
    tasks that were claimed, retries (claims beyond the first) and lease_expiries."""
    if by is not None and by not in ("tag", "tags") and by not in tasks.columns:
        raise ValueError(f"by must be a column of tasks or 'tag', not {by!r}")
    status, attempts = tasks["status"], tasks["attempts"].to_numpy()
    parts = pd.DataFrame(
        {
            "tasks": np.ones(len(tasks), dtype="int64"),
            "finished": np.isin(
                claims.codes(status), [claims.code_of(status, s) for s in FINISHED]
            ).astype("int64"),
            "completed": is_value(status, "COMPLETED").astype("int64"),
            "failed": is_value(status, "FAILED").astype("int64"),
            "cancelled": is_value(status, "CANCELLED").astype("int64"),
            "claimed": (attempts > 0).astype("int64"),
            "retried": (attempts > 1).astype("int64"),
            "retries": np.clip(attempts - 1, 0, None).astype("int64"),
            "lease_expiries": tasks["lease_expiries"].to_numpy().astype("int64"),
        },
        index=tasks.index,
    )
    if by is None:
        result = parts.sum().to_frame("all").T
        result.index.name = "scope"
    else:
        result = groups.sums(parts, tasks, "tag" if by in ("tag", "tags") else by)
    decided = result["completed"] + result["failed"]
    result["failure_rate"] = (result["failed"] / decided.where(decided > 0)).astype("float64")
    claimed = result.pop("claimed")
    result["retry_rate"] = (result["retried"] / claimed.where(claimed > 0)).astype("float64")
    return result


def breakdown(tasks: pd.DataFrame, by: str = "work_directory") -> pd.DataFrame:
    """Per value of `by` ("work_directory", "tag", "priority", "worker_id", ...): tasks in each
    status, failure and retry rates, and median / p90 wait and run times in seconds."""
    key = "tag" if by in ("tag", "tags") else by
    if key != "tag" and key not in tasks.columns:
        raise ValueError(f"by must be a column of tasks or 'tag', not {by!r}")
    statuses = tasks["status"].cat.categories
    if key == "tag" or isinstance(tasks[key].dtype, pd.CategoricalDtype):
        # Statuses counted like any other per-task sum: no crosstab over a million rows. The
        # marks stay booleans (an eighth of the memory of integers); sums of them are counts.
        marks = claims.codes(tasks["status"])[:, None] == np.arange(len(statuses))
        counts = groups.sums(
            pd.DataFrame(marks, columns=list(statuses), index=tasks.index), tasks, key
        ).astype("int64")
    else:
        counts = pd.crosstab(tasks[key], tasks["status"]).reindex(columns=statuses, fill_value=0)
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
    start, end = timestamp(since, "since"), timestamp(until, "until")
    # Masks over whole columns: selecting the rows of a million-row frame copies every column.
    at = _micros(events["at"])
    upto = np.ones(len(at), dtype=bool) if end is None else at < _us(end)
    inside = upto if start is None else upto & (at >= _us(start))
    status, previous = events["status"], events["previous_status"]
    submitted = int((claims.codes(previous)[inside] == -1).sum())
    completed = int(is_value(status, "COMPLETED")[inside].sum())
    failed = int(is_value(status, "FAILED")[inside].sum())
    waiting, working = (
        int(is_value(status, s)[upto].sum() - is_value(previous, s)[upto].sum())
        for s in ("WAITING", "WORKING")
    )
    done = tasks["status"].isin(FINISHED).to_numpy() & tasks["completed_at"].notna().to_numpy()
    finished_at = _micros(tasks["completed_at"])
    if start is not None:
        done &= finished_at >= _us(start)
    if end is not None:
        done &= finished_at < _us(end)
    attempts = tasks["attempts"].to_numpy()[done]
    claimed = int((attempts > 0).sum())
    retry_rate = int((attempts > 1).sum()) / claimed if claimed else float("nan")
    wait = pd.Series(tasks["wait_s"].to_numpy()[done])
    run = pd.Series(tasks["run_s"].to_numpy()[done])
    if inside.any():
        start = (
            start if start is not None else pd.Timestamp(int(at[inside].min()), unit="us", tz="UTC")
        )
        end = end if end is not None else pd.Timestamp(int(at[inside].max()), unit="us", tz="UTC")
    hours = (end - start).total_seconds() / 3600 if start is not None and end is not None else 0.0
    return pd.Series(
        {
            "submitted": submitted,
            "completed": completed,
            "failed": failed,
            "failure_rate": failed / (completed + failed) if completed + failed else float("nan"),
            "retry_rate": retry_rate,
            "wait_p50_s": float(wait.median()),
            "wait_p90_s": float(wait.quantile(0.9)),
            "run_p50_s": float(run.median()),
            "run_p90_s": float(run.quantile(0.9)),
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
