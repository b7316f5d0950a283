"""Read-only analysis of the tasks and task_history tables with pandas: load, metrics, charts and
a notebook dashboard. It reads a database or a server's GraphQL API and never writes."""

from __future__ import annotations

from analytics.charts import (
    backlog_chart,
    breakdown_chart,
    latency_chart,
    throughput_chart,
    utilisation_chart,
)
from analytics.dashboard import Dashboard, dashboard
from analytics.load import TaskData, load, load_events, load_tasks
from analytics.metrics import (
    attempts,
    backlog,
    breakdown,
    failure_rates,
    latency,
    most_failed,
    slowest,
    summary,
    throughput,
    utilisation,
)
from analytics.pushdown import throughput as database_throughput
from analytics.sources import SourceError, absolute_url

__all__ = [
    "Dashboard",
    "SourceError",
    "TaskData",
    "absolute_url",
    "attempts",
    "backlog",
    "backlog_chart",
    "breakdown",
    "breakdown_chart",
    "dashboard",
    "database_throughput",
    "failure_rates",
    "latency",
    "latency_chart",
    "load",
    "load_events",
    "load_tasks",
    "most_failed",
    "slowest",
    "summary",
    "throughput",
    "throughput_chart",
    "utilisation",
    "utilisation_chart",
]
