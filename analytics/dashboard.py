"""The notebook dashboard: ipywidgets filters over the loaded data, key figures, charts, tables."""

from __future__ import annotations

import html
import io
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

from analytics import charts, metrics
from analytics.live import Follower, merge
from analytics.load import TaskData, load
from analytics.sources import Raw

WINDOWS = {
    "last 24 hours": pd.Timedelta(hours=24),
    "last 7 days": pd.Timedelta(days=7),
    "last 30 days": pd.Timedelta(days=30),
    "all time": None,
}
FREQ = {"last 24 hours": "1h", "last 7 days": "6h", "last 30 days": "1D", "all time": "1D"}
ALL = "(all)"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _table(frame: pd.DataFrame) -> str:
    return str(
        frame.to_html(index=False, float_format=lambda v: f"{v:,.1f}", na_rep="", max_cols=12)
    )


class Dashboard:
    """Filters (time window, work directory, tag, priority), a refresh button and optional
    auto-refresh over one source. `widget` is what a notebook displays; `refresh()` reloads the
    window from the source and redraws; changing a filter redraws from the loaded data.

    With `live=True` a follower applies each new event as it happens (the `taskEvents`
    subscription of a server; a database is polled by event id) and redraws, without reloading;
    `updates` counts the batches applied. `close()` stops it."""

    def __init__(
        self,
        source: str,
        *,
        window: str = "last 7 days",
        api_key: str | None = None,
        loader: Callable[..., TaskData] = load,
        live: bool = False,
        interval: float = 1.0,
    ) -> None:
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        self.source = source
        self._api_key = api_key
        self._loader = loader
        self.data: TaskData | None = None
        self.refreshes = 0
        self.updates = 0
        self.error: str | None = None
        self.follower: Follower | None = None
        self._lock = threading.Lock()
        self._timer: threading.Event | None = None

        self.window = widgets.Dropdown(options=list(WINDOWS), value=window, description="Window")
        self.directory = widgets.Dropdown(options=[ALL], value=ALL, description="Directory")
        self.tag = widgets.Dropdown(options=[ALL], value=ALL, description="Tag")
        self.priority = widgets.Dropdown(
            options=[ALL, "HIGH", "MEDIUM", "LOW"], value=ALL, description="Priority"
        )
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.auto = widgets.Checkbox(value=False, description="Auto-refresh")
        self.every = widgets.BoundedIntText(value=60, min=1, max=3600, description="every (s)")
        self.status = widgets.HTML()
        self.figures = widgets.HTML()
        self.images = {
            name: widgets.Image(format="png")
            for name in ("throughput", "backlog", "latency", "directories", "workers")
        }
        self.slowest = widgets.HTML()
        self.most_failed = widgets.HTML()

        self.window.observe(lambda _: self.refresh(), names="value")
        for control in (self.directory, self.tag, self.priority):
            control.observe(lambda _: self.redraw(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.auto.observe(lambda change: self.auto_refresh(change["new"]), names="value")

        image = self.images
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.window, self.directory, self.tag, self.priority]),
                widgets.HBox([self.refresh_button, self.auto, self.every, self.status]),
                self.figures,
                widgets.HBox([image["throughput"], image["backlog"]]),
                widgets.HBox([image["latency"], image["directories"]]),
                image["workers"],
                widgets.HTML("<h4>Slowest tasks</h4>"),
                self.slowest,
                widgets.HTML("<h4>Most failed tasks</h4>"),
                self.most_failed,
            ]
        )
        self.refresh()
        if live:
            self.follow(interval)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)  # type: ignore[no-untyped-call]

    # --- data ---

    def refresh(self) -> None:
        """Reload the selected window from the source, then redraw."""
        span = WINDOWS[self.window.value]
        until = pd.Timestamp.now(tz="UTC")
        since = None if span is None else until - span
        with self._lock:
            try:
                self.data = self._loader(self.source, since, None, api_key=self._api_key)
                self.error = None
            except Exception as exc:  # shown in the dashboard; the notebook keeps running
                self.error = f"{type(exc).__name__}: {exc}"
            self.refreshes += 1
            self._update_choices()
            self.redraw()

    def follow(self, interval: float = 1.0) -> None:
        """Apply new events as they happen, on a background thread, until `close()`."""
        if self.follower is not None:
            return
        with self._lock:
            events = None if self.data is None else self.data.events
            after = int(events["id"].max()) if events is not None and len(events) else 0
        self.follower = Follower(
            self.source, after, self._apply, api_key=self._api_key, interval=interval
        )
        self.follower.start()

    def _apply(self, batch: Raw) -> None:
        with self._lock:
            if self.data is None:
                return  # nothing loaded to add to: the next refresh reads everything
            try:
                self.data = merge(self.data, batch, pd.Timestamp.now(tz="UTC"))
            except Exception as exc:  # shown in the dashboard; the follower keeps going
                self.error = f"{type(exc).__name__}: {exc}"
            self.updates += 1
            self._update_choices()
            self.redraw()

    def _update_choices(self) -> None:
        if self.data is None:
            return
        tasks = self.data.tasks
        directories = sorted(str(d) for d in tasks["work_directory"].dropna().unique())
        tags = sorted({str(t) for tags in tasks["tags"] for t in tags})
        for control, options in ((self.directory, directories), (self.tag, tags)):
            current = control.value
            control.unobserve_all("value")
            control.options = [ALL, *options]
            control.value = current if current in options else ALL
            control.observe(lambda _: self.redraw(), names="value")

    def filtered(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The loaded tasks and events that match the directory, tag and priority filters."""
        assert self.data is not None
        tasks, events = self.data.tasks, self.data.events
        keep = pd.Series(True, index=tasks.index)
        if self.directory.value != ALL:
            keep &= tasks["work_directory"] == self.directory.value
        if self.priority.value != ALL:
            keep &= tasks["priority"] == self.priority.value
        if self.tag.value != ALL:
            tag = self.tag.value
            keep &= tasks["tags"].map(lambda tags: tag in tags).astype(bool)
        if keep.all():
            return tasks, events
        chosen = tasks[keep]
        return chosen, events[events["task_id"].isin(chosen["id"])]

    # --- drawing ---

    def redraw(self) -> None:
        if self.data is None:
            self.status.value = f"<b>could not load:</b> {html.escape(self.error or '')}"
            return
        tasks, events = self.filtered()
        since, until = self.data.window
        freq = FREQ[self.window.value]
        stamp = (
            f"loaded {self.data.loaded_at:%Y-%m-%d %H:%M:%S} UTC, {len(self.data.tasks):,} tasks"
        )
        if self.follower is not None:
            stamp += f", live ({self.updates:,} updates)"
            if self.follower.error:
                stamp += f"; <b>{html.escape(self.follower.error)}</b>"
        self.status.value = (
            stamp if self.error is None else f"{stamp}; <b>{html.escape(self.error)}</b>"
        )
        figures = metrics.summary(tasks, events, since, until)
        self.figures.value = _key_figures(figures)
        drawn = {
            "throughput": charts.throughput_chart(events, freq, since, until),
            "backlog": charts.backlog_chart(events, freq, since, until),
            "latency": charts.latency_chart(tasks),
            "directories": charts.breakdown_chart(tasks, "work_directory"),
            "workers": charts.utilisation_chart(events, since, until),
        }
        for name, figure in drawn.items():
            self.images[name].value = _png(figure)
        self.slowest.value = _table(metrics.slowest(tasks))
        self.most_failed.value = _table(metrics.most_failed(tasks))

    # --- auto-refresh ---

    def auto_refresh(self, on: bool = True) -> None:
        """Refresh every `every` seconds on a background thread while `on`."""
        if self.auto.value != on:
            self.auto.value = on  # the checkbox observer calls back here
            return
        if self._timer is not None:
            self._timer.set()
            self._timer = None
        if on:
            stop = threading.Event()
            self._timer = stop
            threading.Thread(target=self._tick, args=(stop,), daemon=True).start()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.every.value):
            self.refresh()

    def close(self) -> None:
        """Stop auto-refresh and the live follower, and close every widget of the dashboard."""
        self.auto_refresh(False)
        if self.follower is not None:
            self.follower.stop()
        pending: list[widgets.Widget] = [self.widget]
        while pending:
            widget = pending.pop()
            pending.extend(getattr(widget, "children", ()))
            widget.close()


def _key_figures(figures: pd.Series) -> str:
    def cell(label: str, value: Any, fmt: str) -> str:
        text = "-" if pd.isna(value) else format(value, fmt)
        return (
            f"<div style='display:inline-block;margin:0 1.5em 0.5em 0'>"
            f"<div style='font-size:1.6em;font-weight:bold'>{text}</div>"
            f"<div style='color:#666'>{label}</div></div>"
        )

    return "".join(
        [
            cell("submitted", figures["submitted"], ","),
            cell("completed", figures["completed"], ","),
            cell("failed", figures["failed"], ","),
            cell("failure rate", figures["failure_rate"], ".1%"),
            cell("retry rate", figures["retry_rate"], ".1%"),
            cell("median wait (s)", figures["wait_p50_s"], ",.0f"),
            cell("p90 wait (s)", figures["wait_p90_s"], ",.0f"),
            cell("median run (s)", figures["run_p50_s"], ",.0f"),
            cell("waiting now", figures["waiting"], ","),
            cell("working now", figures["working"], ","),
            cell("completed / hour", figures["completed_per_hour"], ",.1f"),
        ]
    )


def dashboard(
    source: str,
    *,
    window: str = "last 7 days",
    api_key: str | None = None,
    live: bool = False,
) -> Dashboard:
    """Build the dashboard for `source` (any URL `analytics.load` accepts) and load it once;
    `live=True` then follows new events as they happen (see `Dashboard`). In a notebook, make it
    the last expression of a cell to show it."""
    return Dashboard(source, window=window, api_key=api_key, live=live)
