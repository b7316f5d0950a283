"""Charts: one call per matplotlib figure, with titles, units and labelled axes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analytics import metrics
from analytics.load import TimeLike

SIZE = (9.0, 3.6)


def _axes(ax: Axes | None, size: tuple[float, float] = SIZE) -> tuple[Figure, Axes]:
    if ax is not None:
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    # Figure() rather than plt.figure(): nothing accumulates in pyplot's global state
    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.add_subplot()


def _label(ax: Axes, title: str, x: str, y: str, *, grid: bool = False) -> None:
    """Every chart's title and axis labels (with units), set in one way."""
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if grid:
        ax.grid(alpha=0.3)


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this window", ha="center", va="center", transform=ax.transAxes)


def throughput_chart(
    events: pd.DataFrame,
    freq: str = "1h",
    since: TimeLike = None,
    until: TimeLike = None,
    ax: Axes | None = None,
) -> Figure:
    """Tasks submitted, completed and failed per interval."""
    figure, ax = _axes(ax)
    counts = metrics.throughput(events, freq, since, until)
    for column, style in (("submitted", "-"), ("completed", "-"), ("failed", "--")):
        ax.plot(counts.index, counts[column], style, label=column, drawstyle="steps-post")
    if not len(counts):
        _empty(ax, "events")
    _label(ax, f"Throughput (tasks per {freq})", "time (UTC)", f"tasks / {freq}", grid=True)
    ax.legend(loc="upper left")
    return figure


def backlog_chart(
    events: pd.DataFrame,
    freq: str = "1h",
    since: TimeLike = None,
    until: TimeLike = None,
    ax: Axes | None = None,
) -> Figure:
    """Tasks waiting and working at the end of each interval, stacked."""
    figure, ax = _axes(ax)
    level = metrics.backlog(events, freq, since, until)
    if len(level):
        ax.stackplot(
            level.index,
            level["waiting"],
            level["working"],
            labels=["waiting", "working"],
            step="post",
        )
        ax.legend(loc="upper left")
    else:
        _empty(ax, "events")
    _label(ax, "Backlog over time", "time (UTC)", "tasks", grid=True)
    return figure


def latency_chart(tasks: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Distribution of wait and run times (log-scaled seconds), with medians marked."""
    figure, ax = _axes(ax)
    shown = False
    for column, label in (
        ("wait_s", "wait (created → started)"),
        ("run_s", "run (started → done)"),
    ):
        every = tasks[column].dropna().to_numpy()
        values = every[every > 0]  # a log axis cannot show zero
        if not len(values):
            continue
        # sub-second times (a fast worker) would put the upper edge below the 0.1 s floor
        low = max(values.min(), 0.1)
        bins = np.logspace(np.log10(low), np.log10(max(values.max() * 1.01, low * 10)), 40)
        ax.hist(
            values,
            bins=bins.tolist(),
            alpha=0.55,
            label=f"{label}, median {np.median(every):,.0f} s",
        )
        shown = True
    if shown:
        ax.set_xscale("log")
        ax.legend(loc="upper right")
    else:
        _empty(ax, "started tasks")
    _label(ax, "Wait and run times", "seconds (log scale)", "tasks")
    return figure


def breakdown_chart(
    tasks: pd.DataFrame, by: str = "work_directory", ax: Axes | None = None
) -> Figure:
    """Tasks per group by final status (bars), with the failure rate on a second axis."""
    figure, ax = _axes(ax)
    table = metrics.breakdown(tasks, by)
    if not len(table):
        _empty(ax, "tasks")
    else:
        statuses = ["completed", "failed", "cancelled", "working", "waiting"]
        bottom = np.zeros(len(table))
        labels = [str(i) for i in table.index]
        for status in statuses:
            ax.bar(labels, table[status], bottom=bottom, label=status)
            bottom += table[status].to_numpy()
        rate = ax.twinx()
        rate.plot(labels, table["failure_rate"] * 100, "ko-", label="failure rate")
        rate.set_ylabel("failure rate (%)")
        rate.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize="small")
        ax.tick_params(axis="x", labelrotation=20)
    name = by.replace("_", " ")
    _label(ax, f"Tasks and failure rate by {name}", name, "tasks")
    return figure


def utilisation_chart(
    events: pd.DataFrame, since: TimeLike = None, until: TimeLike = None, ax: Axes | None = None
) -> Figure:
    """Share of the window in which each worker ran at least one task (1.0 = never idle); see
    `metrics.utilisation` for tasks run at once (`mean_running`)."""
    figure, ax = _axes(ax)
    table = metrics.utilisation(events, since, until)
    if len(table):
        ax.barh([str(i) for i in table.index][::-1], table["utilisation"].to_numpy()[::-1])
    else:
        _empty(ax, "workers")
    _label(
        ax, "Worker utilisation", "share of the window running a task (1.0 = never idle)", "worker"
    )
    ax.set_xlim(0, 1)
    return figure
