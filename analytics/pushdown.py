"""Metrics computed inside the database, for windows too large to load: the same answers as the
pandas metrics over loaded frames, from a few hundred rows of counts instead of millions of events.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analytics import databases
from analytics.load import TimeLike, timestamp
from analytics.metrics import THROUGHPUT_KINDS, grid
from analytics.sources import SourceError, micros, source_kind

# Each kind of event as SQL over task_history h, exactly as `metrics.throughput` counts them.
_KINDS = {
    "submitted": "h.previous_status IS NULL",
    "started": "h.status = 'WORKING'",
    "completed": "h.status = 'COMPLETED'",
    "failed": "h.status = 'FAILED'",
    "retried": "h.status = 'WAITING' AND h.previous_status = 'WORKING'"
    " AND coalesce({reason}, '') <> 'released'",
    "cancelled": "h.status = 'CANCELLED'",
}
_REASON = {"sqlite": "json_extract(h.details, '$.reason')", "postgres": "(h.details->>'reason')"}
_MICROS = {"sqlite": "h.at", "postgres": "(extract(epoch from h.at) * 1000000)::bigint"}


def throughput(
    source: str, freq: str = "1h", since: TimeLike = None, until: TimeLike = None
) -> pd.DataFrame:
    """`analytics.throughput` of every event of a database (sqlite:/// or postgresql://),
    counted per interval by the database itself: the same frame, without loading the events."""
    kind = source_kind(source)
    if kind == "http":
        raise SourceError("source must be a database URL (sqlite:/// or postgresql://)")
    start, end = timestamp(since, "since"), timestamp(until, "until")
    if start is not None and end is not None and start >= end:
        raise SourceError("since must be earlier than until")
    bounds = _bounds(source, start, end)
    intervals, first, step = grid(bounds, freq, start, end)
    at = _MICROS[kind]
    mark = "?" if kind == "sqlite" else "$"
    params: list[object] = [first, step]
    clauses = []
    for value, sign in ((start, ">="), (end, "<")):
        if value is not None:
            moment = value.to_pydatetime()
            params.append(micros(moment) if kind == "sqlite" else moment)
            clauses.append(f"h.at {sign} {_mark(mark, len(params))}")
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sums = ", ".join(
        f"sum(CASE WHEN {_KINDS[name].format(reason=_REASON[kind])} THEN 1 ELSE 0 END)"
        for name in THROUGHPUT_KINDS
    )
    bucket = f"(({at}) - {_mark(mark, 1)}) / {_mark(mark, 2)}"
    sql = f"SELECT {bucket} AS bucket, {sums} FROM task_history h{where} GROUP BY 1 ORDER BY 1"
    table = databases.query(source, sql, sql, params)
    counts = np.zeros((len(intervals), len(THROUGHPUT_KINDS)), dtype="int64")
    if table.num_rows:
        buckets = np.asarray(table.column(0).to_numpy(zero_copy_only=False), dtype="int64")
        values = np.column_stack(
            [np.asarray(table.column(i + 1).to_numpy(zero_copy_only=False), dtype="int64")
             for i in range(len(THROUGHPUT_KINDS))]
        )  # fmt: skip
        inside = (buckets >= 0) & (buckets < len(intervals))
        counts[buckets[inside]] = values[inside]
    result = pd.DataFrame(counts, index=intervals, columns=list(THROUGHPUT_KINDS))
    result.index.name = "interval"
    return result


def _mark(style: str, n: int) -> str:
    return "?" if style == "?" else f"${n}"


def _bounds(source: str, start: pd.Timestamp | None, end: pd.Timestamp | None) -> np.ndarray:
    """The first and last event time in microseconds (only what `grid` needs of the events)."""
    if start is not None and end is not None:
        return np.array([micros(start.to_pydatetime()), micros(end.to_pydatetime())], dtype="int64")
    table = databases.query(
        source,
        "SELECT min(h.at), max(h.at) FROM task_history h",
        f"SELECT {_MICROS['postgres'].replace('h.at', 'min(h.at)')},"
        f" {_MICROS['postgres'].replace('h.at', 'max(h.at)')} FROM task_history h",
        [],
    )
    low, high = table.column(0)[0].as_py(), table.column(1)[0].as_py()
    return np.empty(0, dtype="int64") if low is None else np.array([low, high], dtype="int64")
