"""Claims as whole numpy columns: each claim of the history with the event that ended it, and the
busy stretches of each worker; what `metrics.utilisation` counts, without a row per claim in
pandas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Claims:
    """One entry per claim (a WORKING event), in (task, event id) order. Times in microseconds;
    `worker` holds the codes of the events' worker_id categories (-1: none); `outcome` and
    `reason` the codes of the ending event's status and reason (-1 while it still runs)."""

    worker: np.ndarray
    started: np.ndarray
    ended: np.ndarray
    outcome: np.ndarray
    reason: np.ndarray
    last_at: int | None  # the last event's time (None: no events)


def codes(column: pd.Series) -> np.ndarray:
    return np.asarray(column.cat.codes.to_numpy())


def code_of(column: pd.Series, value: str) -> int:
    """The code of `value` among a categorical column's categories (-2, matching nothing, when
    absent)."""
    categories = column.cat.categories
    return int(categories.get_loc(value)) if value in categories else -2


def micros(times: pd.Series) -> np.ndarray:
    stamps = pd.DatetimeIndex(times)
    # Loaded frames are in microseconds already: converting them anyway copies every value.
    return np.asarray((stamps if stamps.unit == "us" else stamps.as_unit("us")).asi8)


def claims(events: pd.DataFrame, open_end: int | None) -> Claims:
    """Each claim with the next event of its task, which ends it; a claim with none still runs
    and ends at `open_end` (default: the last event)."""
    task = codes(events["task_id"])
    order = np.lexsort((events["id"].to_numpy(), task))
    task = task[order]
    status = codes(events["status"])[order]
    at = micros(events["at"])[order]
    count = len(at)
    last_at = int(at.max()) if count else None
    start = np.flatnonzero(status == code_of(events["status"], "WORKING"))
    following = np.minimum(start + 1, max(count - 1, 0))
    has_next = (start + 1 < count) & (task[following] == task[start])
    end = open_end if open_end is not None else last_at
    return Claims(
        worker=codes(events["worker_id"])[order][start],
        started=at[start],
        ended=np.where(has_next, at[following], end if end is not None else 0),
        outcome=np.where(has_next, status[following], -1),
        reason=np.where(has_next, codes(events["reason"])[order][following], -1),
        last_at=last_at,
    )


def seconds(micros: np.ndarray) -> np.ndarray:
    """Microseconds as float seconds, rounded exactly as pandas' `total_seconds`."""
    return np.asarray(pd.TimedeltaIndex(micros.view("timedelta64[us]")).total_seconds())


def held(worker: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The busy stretches of each worker: (worker code, seconds) per stretch, overlapping claims
    merged, in worker then time order."""
    keep = (hi > lo) & (worker >= 0)
    worker, lo, hi = worker[keep], lo[keep], hi[keep]
    if not len(worker):
        return worker, np.empty(0, dtype="float64")
    order = _worker_time_order(worker, lo)
    worker, lo, hi = worker[order], lo[order], hi[order]
    first = np.ones(len(worker), dtype=bool)
    first[1:] = worker[1:] != worker[:-1]
    reach = _running_max(worker, hi)
    # A claim starts a new stretch when it begins after every earlier claim of its worker ended.
    starts = np.flatnonzero(first | (lo > np.concatenate(([0], reach[:-1]))))
    return worker[starts], seconds(np.maximum.reduceat(hi, starts) - lo[starts])


def _worker_time_order(worker: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The order by worker, then start time. One integer key sorts in a third of the time of
    lexsort's two keys; claims that tie on both may come in either order, which no stretch
    depends on."""
    low = int(start.min())
    span = int(start.max()) - low + 1
    if (int(worker.max()) + 1) * span < 2**62:
        return np.argsort(worker.astype("int64") * span + (start - low))
    return np.lexsort((start, worker))


def _running_max(group: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The running maximum of `values` within each run of equal `group` codes (sorted)."""
    low = int(values.min())
    span = int(values.max()) - low + 1
    if (int(group.max()) + 1) * span < 2**62:
        # Each group lifted above every earlier one: one running maximum over all of them.
        lift = group.astype("int64") * span
        return np.asarray(np.maximum.accumulate(lift + (values - low)) - lift + low)
    return np.asarray(pd.Series(values).groupby(group).cummax().to_numpy())
