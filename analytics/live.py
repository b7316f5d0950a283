"""Following a source as it changes: new events (and the tasks they touch) in small batches, from
the `taskEvents` subscription of a server or by polling task_history by id, merged into loaded
frames without reloading them."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from analytics import databases
from analytics.load import TaskData, derive, frames
from analytics.sources import (
    TASK_FIELDS,
    Raw,
    SourceError,
    api_key_of,
    event_columns,
    graphql_endpoint,
    source_kind,
    task_columns,
)

TASK_SELECTION = (
    "id workDirectory prompt priority tags status workerId createdAt startedAt completedAt"
    " updatedAt retryCount maxRetries errorMessage"
)
SUBSCRIPTION = (
    "subscription($after: ID) { taskEvents(after: $after) {"
    f" id taskId status previousStatus workerId at details task {{ {TASK_SELECTION} }} }} }}"
)
Batch = Callable[[Raw], None]


class Follower:
    """Hands `on_batch` every event after `after`, with the current rows of the tasks they touch,
    on a background thread: at most one batch each `interval` seconds. `stop()` ends it."""

    def __init__(
        self,
        source: str,
        after: int,
        on_batch: Batch,
        *,
        api_key: str | None = None,
        interval: float = 0.5,
    ) -> None:
        self.source = source
        self.last_id = after
        self.interval = interval
        self.error: str | None = None
        self._api_key = api_key
        self._on_batch = on_batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        if source_kind(self.source) == "http":
            asyncio.run(self._follow_socket())
        else:
            self._poll()

    # --- a database: poll task_history by id ---

    def _poll(self) -> None:
        read = (
            databases.read_sqlite_after
            if source_kind(self.source) == "sqlite"
            else databases.read_postgres_after
        )
        while not self._stop.wait(self.interval):
            try:
                raw = read(self.source, self.last_id)
                self.error = None
            except SourceError as exc:  # shown by the dashboard; the next poll tries again
                self.error = str(exc)
                continue
            if len(raw.events[0]):
                self.last_id = int(np.asarray(raw.events[0])[-1])
                self._on_batch(raw)

    # --- a server: the taskEvents subscription over graphql-transport-ws ---

    async def _follow_socket(self) -> None:
        import websockets

        url = "ws" + graphql_endpoint(self.source).removeprefix("http")
        key = api_key_of(self._api_key)
        init = {"Authorization": f"Bearer {key}"} if key else {}
        while not self._stop.is_set():
            try:
                async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                    await ws.send(json.dumps({"type": "connection_init", "payload": init}))
                    ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if ack.get("type") != "connection_ack":
                        raise SourceError(f"source: {url} refused the subscription: {ack}")
                    variables = {"after": str(self.last_id)}
                    await ws.send(
                        json.dumps(
                            {
                                "id": "1",
                                "type": "subscribe",
                                "payload": {"query": SUBSCRIPTION, "variables": variables},
                            }
                        )
                    )
                    await self._receive(ws)
                    self.error = None
            except (OSError, SourceError, websockets.WebSocketException) as exc:
                # reconnect with the last id seen: the server replays what was missed
                self.error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(min(self.interval * 4, 2.0))

    async def _receive(self, ws: Any) -> None:
        pending: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        flush_at = loop.time() + self.interval
        while not self._stop.is_set():
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), self.interval / 2))
            except TimeoutError:
                message = None
            if message is not None:
                kind = message.get("type")
                if kind == "next":
                    if message["payload"].get("errors"):
                        raise SourceError(f"source: {message['payload']['errors'][0]['message']}")
                    pending.append(message["payload"]["data"]["taskEvents"])
                elif kind == "ping":
                    await ws.send(json.dumps({"type": "pong"}))
                elif kind in ("error", "complete"):
                    raise SourceError(f"source: the subscription ended: {message}")
            if pending and loop.time() >= flush_at:
                self._hand_over(pending)
                pending = []
            if loop.time() >= flush_at:
                flush_at = loop.time() + self.interval

    def _hand_over(self, events: list[dict[str, Any]]) -> None:
        # Decoded as a load decodes its pages, so the batch's frames have the loaded dtypes.
        nodes = {event["task"]["id"]: event["task"] for event in events}  # each one's latest
        tasks = task_columns(list(nodes.values()), None, None)
        self.last_id = int(events[-1]["id"])
        self._on_batch(Raw(tasks, event_columns(events, tasks[TASK_FIELDS.index("id")], None)))


# --- merging a batch into loaded frames ---


def _union(a: pd.Categorical, b: pd.Categorical) -> pd.Categorical:
    """Both, over the sorted union of their categories: the dtype a load of all rows gives."""
    ca, cb = (np.asarray(c.categories, dtype=object) for c in (a, b))
    dtype = pd.Categorical(np.concatenate([ca, cb])).dtype
    # codes -1 (missing) pick the -1 appended at the end
    codes = [
        np.append(dtype.categories.get_indexer(c), -1)[part.codes] for c, part in ((ca, a), (cb, b))
    ]
    return pd.Categorical.from_codes(np.concatenate(codes), dtype=dtype)


def _concat(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Rows of both, keeping categorical columns categorical (with the union of categories)."""
    merged = {}
    for name in first.columns:
        a, b = first[name], second[name]
        if not len(a) or not len(b):  # an empty side has no values to decide a dtype with
            merged[name] = (b if not len(a) else a).reset_index(drop=True)
        elif isinstance(a.dtype, pd.CategoricalDtype) and a.dtype != b.dtype:
            merged[name] = pd.Series(_union(a.array, b.array), name=name)
        else:
            merged[name] = pd.concat([a, b], ignore_index=True)
    return pd.DataFrame(merged)


def merge(data: TaskData, batch: Raw, loaded_at: pd.Timestamp) -> TaskData:
    """`data` with `batch` applied: its tasks replace (or join) the loaded rows, its events are
    appended, and the derived columns are computed again."""
    fresh, new_events = frames(batch)
    old = data.tasks
    new_events = new_events[new_events["id"] > (data.events["id"].max() if len(data.events) else 0)]
    seqs = pd.Series(old["seq"].to_numpy(), index=old["id"].to_numpy())
    known = seqs.reindex(fresh["id"].to_numpy()).to_numpy(dtype="float64", copy=True)
    unseen = np.isnan(known)
    first = int(old["seq"].max()) + 1 if len(old) else 1
    known[unseen] = np.arange(first, first + int(unseen.sum()))
    fresh["seq"] = known.astype("int64")
    kept = old[~old["id"].isin(fresh["id"])]
    tasks = _concat(kept, fresh).sort_values("seq", kind="stable", ignore_index=True)
    events = _concat(data.events.reset_index(drop=True), new_events.reset_index(drop=True))
    # Point every event at its task's row in the merged frame.
    ids = pd.Index(tasks["id"].to_numpy())
    task_codes = events["task_id"].cat.codes.to_numpy()
    where = np.append(ids.get_indexer(events["task_id"].cat.categories), -1)
    rows = where[task_codes]
    directory = tasks["work_directory"].array
    events["task_id"] = pd.Categorical.from_codes(rows, categories=ids)
    events["work_directory"] = pd.Categorical.from_codes(
        np.where(rows >= 0, directory.codes[np.maximum(rows, 0)], -1), dtype=directory.dtype
    )
    derive(tasks, events, rows)
    return TaskData(tasks, events, data.since, data.until, loaded_at)
