"""Loading: one call reads tasks and their history from a source into typed pandas frames."""

from __future__ import annotations

import contextlib
import gc
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analytics import databases
from analytics.sources import (
    EVENT_FIELDS,
    PRIORITIES,
    STATUSES,
    TASK_FIELDS,
    Raw,
    SourceError,
    read_graphql,
    source_kind,
)

STATUS_TYPE = pd.CategoricalDtype(list(STATUSES))
PRIORITY_TYPE = pd.CategoricalDtype(list(PRIORITIES), ordered=True)
TimeLike: TypeAlias = datetime | pd.Timestamp | str | None


@dataclass(frozen=True)
class TaskData:
    """What `load` returns.

    `tasks`: one row per task, in submission order. Columns: seq (from a server URL: the
    position in that order), id, work_directory, prompt (first 200 characters),
    priority (ordered categorical LOW < MEDIUM < HIGH), tags (a list per row; rows with the same
    tags share one list, so do not mutate it in place), status (categorical), worker_id,
    created_at / started_at / completed_at / updated_at (tz-aware UTC), retry_count, max_retries,
    error_message (first 500 characters) and the derived wait_s (started - created, seconds),
    run_s (completed - started, seconds), attempts (claims of the task) and lease_expiries.

    `events`: one row per history row (a status change), ordered by id. Columns: id, task_id,
    work_directory, status, previous_status (categorical; NaN for the submission), worker_id,
    at (tz-aware UTC), reason ("lease_expired", "released", "retried" or NaN).

    With a window, `tasks` holds every task that overlaps it (created before `until`, not finished
    before `since`) and `events` every event of those tasks before `until`, including events before
    `since`, so states at `since` can be reconstructed. Metric functions take `since`/`until` to
    count only what happened inside the window.
    """

    tasks: pd.DataFrame
    events: pd.DataFrame
    since: pd.Timestamp | None
    until: pd.Timestamp | None
    loaded_at: pd.Timestamp

    @property
    def window(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """The window as two timestamps: open ends become the first event and the load time."""
        start = self.since
        if start is None:
            start = self.events["at"].min() if len(self.events) else self.loaded_at
        end = self.until if self.until is not None else self.loaded_at
        return pd.Timestamp(start), pd.Timestamp(end)


def timestamp(value: TimeLike, field: str) -> pd.Timestamp | None:
    """A tz-aware UTC timestamp from a datetime, Timestamp or ISO string; naive means UTC."""
    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise SourceError(
            f"{field} must be a time such as '2030-01-01T00:00Z', not {value!r}"
        ) from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def load(
    source: str,
    since: TimeLike = None,
    until: TimeLike = None,
    *,
    api_key: str | None = None,
) -> TaskData:
    """Read tasks and their history, read-only, from `source`:

    - `sqlite:///relative.db` or `sqlite:////absolute.db`: the server's SQLite file;
    - `postgresql://user@host:5432/db` (an `options=-c search_path=...` query is honoured);
    - `http://host:8080` (or `.../graphql`): a running server over GraphQL, paged; `api_key`
      (default: the TASKORCH_API_KEY variable) is sent as `Authorization: Bearer KEY`.

    `since`/`until` (times; naive means UTC) limit the load to tasks that overlap the window; for
    databases the filter runs in SQL.
    """
    start, end = timestamp(since, "since"), timestamp(until, "until")
    if start is not None and end is not None and start >= end:
        raise SourceError("since must be earlier than until")
    loaded_at = pd.Timestamp.now(tz="UTC")
    lo = None if start is None else start.to_pydatetime()
    hi = None if end is None else end.to_pydatetime()
    with _gc_paused():
        tasks, events = _read(source, lo, hi, api_key)
    return TaskData(tasks, events, start, end, loaded_at)


def _read(
    source: str, lo: datetime | None, hi: datetime | None, api_key: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not isinstance(source, str):
        raise SourceError("source must be a URL string such as sqlite:///taskorch.db")
    kind = source_kind(source)
    if kind == "sqlite":
        return _frames(databases.read_sqlite(source, lo, hi))
    if kind == "postgres":
        # The tasks frame is built while the history still streams in.
        rows = databases.window(lo, hi, databases.postgres_mark, databases.postgres_instant)
        loaded, events = databases.read_postgres_prepared(source, rows, _task_frame)
        return _event_frame(loaded, events)
    return _frames(read_graphql(source, api_key, lo, hi))


def load_tasks(
    source: str, since: TimeLike = None, until: TimeLike = None, **kw: Any
) -> pd.DataFrame:
    """The `tasks` frame of `load`."""
    return load(source, since, until, **kw).tasks


def load_events(
    source: str, since: TimeLike = None, until: TimeLike = None, **kw: Any
) -> pd.DataFrame:
    """The `events` frame of `load`."""
    return load(source, since, until, **kw).events


# --- raw columns -> typed frames, vectorised ---


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Millions of fresh row tuples make the cyclic collector run over and over; none of them
    # can form a cycle, so pausing it roughly halves the load time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _arrow(values: Any) -> bool:
    return isinstance(values, pa.Array | pa.ChunkedArray)


def _ints(values: Any) -> np.ndarray:
    if _arrow(values):
        return np.asarray(values.cast(pa.int64()).to_numpy(zero_copy_only=False))
    return np.fromiter(values, dtype="int64", count=len(values))


def _objects(values: Any) -> np.ndarray:
    if _arrow(values):
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(values, dtype=object)


def _text(values: Any) -> Any:
    """A text column: Arrow strings become pandas' Arrow-backed `str` without a Python object per
    row (a round trip through objects costs about a second per million rows)."""
    if _arrow(values):
        if not pa.types.is_string(values.type):  # no rows to infer a type from
            values = values.cast(pa.string())
        return values.to_pandas()
    return np.asarray(values, dtype=object)


def _rows(ids: Any, task_ids: Any, index: pd.Index) -> np.ndarray:
    """The task row of each event (-1 when its task was not loaded)."""
    if _arrow(ids) and _arrow(task_ids):
        if _is_uuid(task_ids.type):
            task_ids, ids = _binary(task_ids), uuid_bytes(ids)
        elif not pa.types.is_string(ids.type):
            ids, task_ids = ids.cast(pa.string()), task_ids.cast(pa.string())
        found = pc.index_in(task_ids, value_set=ids)
        return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype="int64")
    codes, distinct = _encoded(task_ids)
    return index.get_indexer(distinct)[codes] if len(codes) else np.empty(0, dtype="int64")


def _is_uuid(kind: pa.DataType) -> bool:
    storage = kind.storage_type if isinstance(kind, pa.BaseExtensionType) else kind
    return bool(pa.types.is_fixed_size_binary(storage) and storage.byte_width == 16)


def _binary(values: Any) -> Any:
    """A uuid column as its plain 16-byte storage (the hash kernels take no extension type)."""
    if isinstance(values, pa.ChunkedArray):
        return pa.chunked_array([_binary(chunk) for chunk in values.chunks], _UUID_BYTES)
    return values.storage if isinstance(values, pa.ExtensionArray) else values


_UUID_BYTES = pa.binary(16)
# Where the 32 hex digits of a uuid's 36 characters are: five runs between the dashes.
_DIGIT_RUNS = ((0, 8), (9, 13), (14, 18), (19, 23), (24, 36))


def uuid_bytes(ids: Any) -> pa.Array:
    """Text uuids (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, either case) as their 16 bytes, all at
    once in numpy; an id of another form (no uuid column holds one) gets 16 bytes no uuid has."""
    text = pc.cast(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids, pa.string())
    count = len(text)
    offsets = np.frombuffer(
        text.buffers()[1], dtype=np.int32, count=count + 1, offset=text.offset * 4
    )
    if not count or text.null_count or not np.array_equal(np.diff(offsets), np.full(count, 36)):
        return pa.array([_uuid_of(value) for value in text.to_pylist()], _UUID_BYTES)
    chars = np.frombuffer(
        text.buffers()[2], dtype=np.uint8, count=36 * count, offset=int(offsets[0])
    )
    rows = chars.reshape(count, 36)
    digits = np.concatenate([rows[:, a:b] for a, b in _DIGIT_RUNS], axis=1) | 0x20  # lower case
    values = digits - ord("0")  # '0'..'9' -> 0..9, 'a'..'f' -> 49..54
    values -= (values > 9).astype(np.uint8) * (ord("a") - ord("0") - 10)
    packed = np.ascontiguousarray((values[:, 0::2] << 4) | values[:, 1::2])
    return pa.FixedSizeBinaryArray.from_buffers(_UUID_BYTES, count, [None, pa.py_buffer(packed)])


def _uuid_of(value: str | None) -> bytes:
    try:
        return uuid.UUID(value).bytes if value is not None else b"\xff" * 16
    except ValueError:
        return b"\xff" * 16


def _times(values: Any) -> pd.DatetimeIndex:
    # NO_TIME is NaT's bit pattern, so the integers are already datetime64[us] values.
    return pd.DatetimeIndex(_ints(values).view("datetime64[us]")).tz_localize("UTC")


def _encoded(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values): -1 for a missing value. Arrow hashes its strings in C++, without
    a Python object per row."""
    if _arrow(values):
        encoded = values.dictionary_encode()
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
        return np.asarray(codes, dtype="int64"), _objects(encoded.dictionary)
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    return codes, np.asarray(uniques, dtype=object)


def _category(values: Any) -> pd.Categorical:
    if not _arrow(values):
        return pd.Categorical(np.asarray(values, dtype=object))
    codes, uniques = _encoded(values)
    # The same (sorted) categories pandas gives the values themselves.
    dtype = pd.Categorical(uniques).dtype
    # The code -1 (missing) picks the -1 appended at the end.
    ranks = np.append(dtype.categories.get_indexer(uniques), -1)
    return pd.Categorical.from_codes(ranks[codes], dtype=dtype)


def _unique_categories(ids: pd.Index) -> pd.CategoricalDtype:
    """The task ids as categories. They are unique (the table's key), and checking that again
    costs more than the rest of the load's frames (a million ids turned into Python strings and
    hashed): pandas' own constructor for known-valid categories skips it."""
    return pd.CategoricalDtype._from_fastpath(ids, ordered=False)


def _codes(values: Any, dtype: pd.CategoricalDtype) -> pd.Categorical:
    return pd.Categorical.from_codes(_ints(values), dtype=dtype)


def _tags(values: Any) -> np.ndarray:
    # Few distinct tag sets: parse each distinct JSON text once.
    codes, uniques = _encoded(values)
    parsed = np.empty(len(uniques), dtype=object)
    for i, text in enumerate(uniques):
        parsed[i] = json.loads(text)
    return parsed[codes] if len(codes) else np.empty(0, dtype=object)


def frames(raw: Raw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Typed `tasks` and `events` frames from raw columns (see `TaskData`)."""
    with _gc_paused():
        return _frames(raw)


def _frames(raw: Raw) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _event_frame(_task_frame(raw.tasks), raw.events)


@dataclass(frozen=True)
class _Tasks:
    """The tasks frame, with the raw id column the events are matched against."""

    frame: pd.DataFrame
    ids: Any


def _task_frame(columns: list[Any]) -> _Tasks:
    t = dict(zip(TASK_FIELDS, columns, strict=True))
    tasks = pd.DataFrame(
        {
            "seq": _ints(t["seq"]),
            "id": _text(t["id"]),
            "work_directory": _category(t["work_directory"]),
            "prompt": _text(t["prompt"]),
            "priority": _codes(t["priority"], PRIORITY_TYPE),
            "tags": _tags(t["tags"]),
            "status": _codes(t["status"], STATUS_TYPE),
            "worker_id": _category(t["worker_id"]),
            "created_at": _times(t["created_at"]),
            "started_at": _times(t["started_at"]),
            "completed_at": _times(t["completed_at"]),
            "updated_at": _times(t["updated_at"]),
            "retry_count": _ints(t["retry_count"]),
            "max_retries": _ints(t["max_retries"]),
            "error_message": _text(t["error_message"]),
        }
    )
    return _Tasks(tasks, t["id"])


def _event_frame(loaded: _Tasks, columns: list[Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    tasks = loaded.frame
    e = dict(zip(EVENT_FIELDS, columns, strict=True))
    # One hash table over the task ids maps each event to its task's row.
    ids = pd.Index(tasks["id"]).rename(None)
    rows = _rows(loaded.ids, e["task_id"], ids)
    directory = tasks["work_directory"].array
    events = pd.DataFrame(
        {
            "id": _ints(e["id"]),
            "task_id": pd.Categorical.from_codes(rows, dtype=_unique_categories(ids)),
            "work_directory": pd.Categorical.from_codes(
                np.where(rows >= 0, directory.codes[np.maximum(rows, 0)], -1),
                dtype=directory.dtype,
            ),
            "status": _codes(e["status"], STATUS_TYPE),
            "previous_status": _codes(e["previous_status"], STATUS_TYPE),
            "worker_id": _category(e["worker_id"]),
            "at": _times(e["at"]),
            "reason": _category(e["reason"]),
        }
    )
    derive(tasks, events, rows)
    return tasks, events


def derive(tasks: pd.DataFrame, events: pd.DataFrame, rows: np.ndarray) -> None:
    """Set the derived task columns; `rows[i]` is the task row of event i (-1: none)."""
    tasks["wait_s"] = (tasks["started_at"] - tasks["created_at"]).dt.total_seconds()
    tasks["run_s"] = (tasks["completed_at"] - tasks["started_at"]).dt.total_seconds()
    claims = (events["status"] == "WORKING").to_numpy()
    expiries = (events["reason"] == "lease_expired").to_numpy()
    valid = rows >= 0
    tasks["attempts"] = np.bincount(rows[claims & valid], minlength=len(tasks))
    tasks["lease_expiries"] = np.bincount(rows[expiries & valid], minlength=len(tasks))
