"""Prometheus metrics: event counters per process, queue gauges from the database, request timing.

Counters count what this process committed (fed by the store's commit listener), so they only ever
rise, survive pruning, and add up across replicas with `sum(rate(...))`. With PROMETHEUS_MULTIPROC_DIR
set (`serve --workers N` sets it for its workers) each process writes its own files there and any of
them serves the total. The queue gauges are read from the database at scrape time,
because the database is the one place that knows the queue of every replica; every replica reports
the same value (aggregate with `max`, not `sum`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from graphql import DocumentNode, FieldNode, OperationDefinitionNode
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from strawberry.extensions import SchemaExtension

from api.core.domain import TaskEvent, TaskStatus
from api.core.lifecycle import HistoryReason
from api.ops.logs import RequestInfo, Scope, request_info

# The `*_created` timestamp series double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

TASK_CREATED = Counter("task_created", "Tasks submitted (committed by this process).")
TASK_COMPLETED = Counter("task_completed", "Tasks completed (committed by this process).")
TASK_FAILED = Counter("task_failed", "Tasks that failed for good: retries spent or retry refused.")
TASK_RETRIED = Counter(
    "task_retried", "Failed attempts requeued for another try (failure or lease expiry)."
)
LEASE_EXPIRIES = Counter(
    "lease_expiries", "Working tasks whose lease ran out before the worker finished."
)
# Incremented by the rate limiter for every request it refuses.
RATE_LIMITED = Counter("rate_limited_requests", "Requests refused by the rate limiter.")

COMPILED_EXECUTIONS = Counter(
    "graphql_compiled_executions",
    "GraphQL operations answered by a compiled plan instead of the general executor.",
)

RESPONSE_TIME = Histogram(
    "response_time_seconds",
    "Time to answer an HTTP request, by operation: graphql:<root field>, REST route, mcp.",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def observe_commit(events: Sequence[TaskEvent]) -> None:
    """Commit listener: count the status changes this process just committed."""
    for event in events:
        if event.previous_status is None:
            TASK_CREATED.inc()
        elif event.status is TaskStatus.COMPLETED:
            TASK_COMPLETED.inc()
        elif event.status is TaskStatus.FAILED:
            TASK_FAILED.inc()
        elif (
            event.status is TaskStatus.WAITING
            and event.previous_status is TaskStatus.WORKING
            and "attempt" in event.details  # a release gives the task back without an attempt
        ):
            TASK_RETRIED.inc()
        if event.details.get("reason") == HistoryReason.LEASE_EXPIRED:
            LEASE_EXPIRIES.inc()


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def operation_label(scope: Scope, info: RequestInfo) -> str:
    """A label from a bounded set: schema root fields and route templates, never raw paths."""
    if info.operation is not None:
        return info.operation
    route = scope.get("route")
    if route is None:
        return "unmatched"
    path = getattr(route, "path", "")
    if path == "/graphql":
        return "graphql"
    if path == "/mcp" or path.startswith("/mcp/"):
        return "mcp"  # JSON-RPC over one route: the tool name is in the body, which is not read
    if isinstance(route, Mount):
        return path.strip("/") or "mount"
    method = scope.get("method", "")
    if method not in HTTP_METHODS:
        method = "OTHER"  # the client's own word is never a label value
    return f"{method} {path}"


# Each operation's histogram child, looked up once: `labels()` takes a lock and builds a key on
# every call. The labels are a bounded set (see operation_label), so is this.
_RESPONSE_TIMERS: dict[str, Any] = {}


def observe_request(scope: Scope, info: RequestInfo, status: int, duration: float) -> None:
    if scope["type"] == "http":  # a WebSocket's lifetime is not a response time
        operation = operation_label(scope, info)
        timer = _RESPONSE_TIMERS.get(operation)
        if timer is None:
            timer = _RESPONSE_TIMERS[operation] = RESPONSE_TIME.labels(operation)
        timer.observe(duration)


class OperationName(SchemaExtension):
    """Tells the request's log line the client's operation name, and metrics the root field."""

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context.context
        request = getattr(context, "request", None)
        info = None if request is None else request_info(request.scope)
        if info is not None:
            info.graphql_operation = self.execution_context.operation_name
        yield
        document = self.execution_context.graphql_document
        if info is None or document is None:
            return
        label = root_label(document, self.execution_context.operation_name)
        if label is not None:
            info.operation = label


def root_label(document: DocumentNode, operation_name: str | None) -> str | None:
    """`graphql:<root field>` of the operation's first selection, or None when it is a fragment."""
    for definition in document.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        if operation_name is not None and (
            definition.name is None or definition.name.value != operation_name
        ):
            continue
        first = definition.selection_set.selections[0]
        return f"graphql:{first.name.value}" if isinstance(first, FieldNode) else None
    return None


class QueueCollector(Collector):
    """The queue by status, as last read from the database (the scrape handler refreshes it)."""

    def __init__(self) -> None:
        self.counts: dict[TaskStatus, int] = {}
        self.subscriptions = 0
        self.executions = 0

    def collect(self) -> Iterable[Metric]:
        counts = self.counts
        yield GaugeMetricFamily(
            "waiting_tasks", "Tasks waiting to be claimed.", value=counts.get(TaskStatus.WAITING, 0)
        )
        yield GaugeMetricFamily(
            "active_tasks", "Tasks being worked on.", value=counts.get(TaskStatus.WORKING, 0)
        )
        by_status = GaugeMetricFamily(
            "tasks", "Tasks in the database by status.", labels=["status"]
        )
        for status in TaskStatus:
            by_status.add_metric([status.value.lower()], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily(
            "live_subscriptions",
            "taskEvents subscriptions open on the server process that answered this scrape.",
            value=self.subscriptions,
        )
        yield GaugeMetricFamily(
            "live_subscription_executions",
            "Executions serving those subscriptions: sockets subscribing alike share one.",
            value=self.executions,
        )


QUEUE = QueueCollector()
REGISTRY.register(QUEUE)


def _registry() -> Any:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(QUEUE)
    return registry


async def metrics(request: Request) -> Response:
    """GET /metrics: the Prometheus text format."""
    QUEUE.counts = await request.app.state.queue_counts.get()
    # A shared subscription holds one bus subscription for all its sockets; count the sockets.
    QUEUE.executions = request.app.state.service.bus.subscriber_count
    QUEUE.subscriptions = QUEUE.executions + request.app.state.fanout.sharing
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
