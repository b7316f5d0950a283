"""REST v1: the original HTTP routes on the task service, every answer in one JSON envelope."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api.core import validation
from api.core.domain import TaskFilter
from api.core.errors import (
    MethodNotAllowed,
    RateLimited,
    TaskorchError,
    ValidationError,
    internal_error,
)
from api.core.service import TaskService
from api.interfaces.disconnect import unless_disconnected
from api.interfaces.envelope import PREFIX, envelope
from api.interfaces.models import (
    AppendedLog,
    BulkResultOut,
    LogPage,
    StatisticsOut,
    TaskList,
    TaskOut,
    WorkDirectoryList,
    WorkDirectoryOut,
)
from api.security.auth import principal_of, require

log = logging.getLogger("taskorch.rest")

Handler = Callable[[Request], Awaitable[tuple[Any, int]]]


def respond(data: Any, status: int = 200) -> JSONResponse:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return JSONResponse(envelope(data, None), status_code=status)


def error_response(exc: TaskorchError) -> JSONResponse:
    """The envelope for a client-facing error; the domain already names fields in snake_case."""
    response = JSONResponse(envelope(None, exc), status_code=exc.http_status)
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = exc.retry_after_header
    return response


def endpoint(operation: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A route running service `operation`: checks its scope, runs the handler and wraps its
    answer, or error, in the envelope."""
    return functools.partial(_endpoint, operation)


def _endpoint(operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            require(principal_of(request), operation)
            data, status = await handler(request)
        except TaskorchError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return error_response(internal_error())
        return respond(data, status)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


# --- reading requests ---


def _service(request: Request) -> TaskService:
    service: TaskService = request.app.state.service
    return service


async def _body(request: Request, allowed: set[str], *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and optional:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("body", "the request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationError("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(
            unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    return body


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(name, f"{name} must be a whole number") from None


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValidationError(name, f"{name} must be a number") from None


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ValidationError(name, f"{name} must be true or false")
    return value


def _whole(value: object) -> object:
    """A JSON number with no fraction is a whole number, as JSON Schema's `integer` says: 13.0 is 13."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(body: dict[str, Any], name: str) -> int:
    value = _whole(body.get(name))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"{name} must be a whole number")
    return value


def _run_after(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise ValidationError(
            "run_after", "run_after must be an ISO 8601 time, e.g. 2030-01-01T00:00:00Z"
        )
    return validation.check_aware(parsed, "run_after")


def _claim_directory(request: Request) -> str:
    """`work_directory`, or `work_path` (its name in the original REST design) when it is absent."""
    query = request.query_params
    value = query.get("work_directory") or query.get("work_path")
    if not value:
        raise ValidationError(
            "work_directory",
            "work_directory (or its older name work_path) is required: give an absolute path "
            "such as /repo",
        )
    return validation.check_work_directory(value, "work_directory")


# --- routes ---

SUBMIT_FIELDS = {
    "work_directory", "prompt", "priority", "tags", "max_retries", "metadata",
    "idempotency_key", "run_after", "depends_on", "require_review",
}  # fmt: skip
UPDATE_FIELDS = {"expected_version", "prompt", "priority", "tags", "metadata", "max_retries"}


@endpoint("submit")
async def create_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, SUBMIT_FIELDS)
    spec = validation.task_spec(
        work_directory=body.get("work_directory"),
        prompt=body.get("prompt"),
        priority=body.get("priority"),
        tags=body.get("tags"),
        max_retries=_whole(body.get("max_retries")),
        metadata=body.get("metadata"),
        idempotency_key=body.get("idempotency_key"),
        run_after=_run_after(body.get("run_after")),
        depends_on=body.get("depends_on"),
        require_review=body.get("require_review"),
    )
    return TaskOut.of(await _service(request).submit(spec)), 201


@endpoint("read")
async def list_tasks(request: Request) -> tuple[Any, int]:
    query = request.query_params
    where = validation.task_filter(
        statuses=query.getlist("status"),
        work_directory=query.get("work_directory"),
        priority=query.get("priority"),
        tag=query.get("tag"),
        created_before=query.get("created_before"),
        created_after=query.get("created_after"),
    )
    limit = _int_param(request, "limit", 50)
    offset = _int_param(request, "offset", 0)
    assert limit is not None
    assert offset is not None
    page = await _service(request).list_page(where, limit, offset)
    tasks = [TaskOut.of(t) for t in page.tasks]
    return TaskList(
        tasks=tasks, total=page.total or 0, limit=limit, offset=offset, has_more=page.has_next
    ), 200


@endpoint("claim")
async def next_task(request: Request) -> tuple[Any, int]:
    query = request.query_params
    wait = _float_param(request, "wait_seconds")
    claim = _service(request).claim(
        _claim_directory(request),
        validation.check_worker_id(query.get("worker_id"), "worker_id"),
        lease_seconds=_int_param(request, "lease_seconds", None),
        wait_seconds=wait,
    )
    tasks = (await unless_disconnected(request, claim) or []) if wait else await claim
    return (TaskOut.of(tasks[0]) if tasks else None), 200


@endpoint("read")
async def get_task(request: Request) -> tuple[Any, int]:
    return TaskOut.of(await _service(request).get(request.path_params["id"])), 200


@endpoint("update")
async def update_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, UPDATE_FIELDS)
    expected = _int(body, "expected_version")
    changes = validation.task_changes(
        prompt=body.get("prompt"),
        priority=body.get("priority"),
        tags=body.get("tags"),
        metadata=body.get("metadata"),
        max_retries=_whole(body.get("max_retries")),
    )
    task = await _service(request).update(request.path_params["id"], expected, changes)
    return TaskOut.of(task), 200


@endpoint("complete")
async def complete_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"worker_id", "result", "original_prompt"})
    original = body.get("original_prompt")
    if original is not None and not isinstance(original, str):
        raise ValidationError("original_prompt", "original_prompt must be a string")
    task = await _service(request).complete(
        request.path_params["id"],
        body.get("worker_id", ""),
        body.get("result"),
        expected_prompt=original,
    )
    return TaskOut.of(task), 200


@endpoint("fail")
async def fail_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"worker_id", "error", "retry"})
    task = await _service(request).fail(
        request.path_params["id"],
        body.get("worker_id", ""),
        body.get("error", ""),
        _bool(body, "retry", True),
    )
    return TaskOut.of(task), 200


@endpoint("report_progress")
async def report_progress(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"worker_id", "progress", "message", "lease_seconds"})
    task = await _service(request).report_progress(
        request.path_params["id"],
        body.get("worker_id", ""),
        body.get("progress"),
        body.get("message"),
        _whole(body.get("lease_seconds")),  # type: ignore[arg-type]  # checked by the service
    )
    return TaskOut.of(task), 200


@endpoint("append_log")
async def append_log(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"worker_id", "lines"})
    last = await _service(request).append_logs(
        request.path_params["id"], body.get("worker_id", ""), body.get("lines")
    )
    return AppendedLog(last_line=last), 200


@endpoint("read")
async def task_logs(request: Request) -> tuple[Any, int]:
    after = _int_param(request, "after", 0) or 0
    first = _int_param(request, "first", 100)
    lines, more = await _service(request).log_page(request.path_params["id"], after, first)
    return LogPage.of(lines, after, more), 200


@endpoint("cancel")
async def cancel_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"reason"}, optional=True)
    task = await _service(request).cancel(request.path_params["id"], body.get("reason"))
    return TaskOut.of(task), 200


@endpoint("retry")
async def retry_task(request: Request) -> tuple[Any, int]:
    await _body(request, set(), optional=True)
    return TaskOut.of(await _service(request).retry(request.path_params["id"])), 200


@endpoint("approve")
async def approve_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"note"}, optional=True)
    task = await _service(request).approve(request.path_params["id"], body.get("note"))
    return TaskOut.of(task), 200


@endpoint("reject")
async def reject_task(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"feedback", "retry"})
    task = await _service(request).reject(
        request.path_params["id"], body.get("feedback", ""), _bool(body, "retry", True)
    )
    return TaskOut.of(task), 200


FILTER_FIELDS = {
    "statuses", "work_directory", "priority", "tag", "created_before", "created_after",
}  # fmt: skip


def _filter(body: dict[str, Any]) -> TaskFilter:
    """The `filter` object of a bulk change, as the task listing's filters."""
    raw = body.get("filter")
    if not isinstance(raw, dict):
        raise ValidationError("filter", "filter is required: a JSON object of task filters")
    unknown = sorted(set(raw) - FILTER_FIELDS)
    if unknown:
        raise ValidationError(
            f"filter.{unknown[0]}",
            f"unknown filter {unknown[0]!r}; allowed: {', '.join(sorted(FILTER_FIELDS))}",
        )
    statuses = raw.get("statuses")
    if statuses is None:
        statuses = []
    elif not isinstance(statuses, list):
        raise ValidationError("filter.statuses", "filter.statuses must be a list of statuses")
    return validation.task_filter(
        statuses=statuses,
        work_directory=raw.get("work_directory"),
        priority=raw.get("priority"),
        tag=raw.get("tag"),
        created_before=raw.get("created_before"),
        created_after=raw.get("created_after"),
        prefix="filter.",
    )


@endpoint("cancel_tasks")
async def cancel_tasks(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"filter", "reason"})
    result = await _service(request).cancel_many(_filter(body), body.get("reason"))
    return BulkResultOut.of(result), 200


@endpoint("retry_tasks")
async def retry_tasks(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"filter"})
    return BulkResultOut.of(await _service(request).retry_many(_filter(body))), 200


@endpoint("read")
async def list_work_directories(request: Request) -> tuple[Any, int]:
    found = await _service(request).directories(request.query_params.get("work_directory"))
    return WorkDirectoryList(work_directories=[WorkDirectoryOut.of(d) for d in found]), 200


@endpoint("configure_work_directory")
async def configure_work_directory(request: Request) -> tuple[Any, int]:
    body = await _body(request, {"work_directory", "max_working", "paused"})
    changes = validation.directory_changes(
        max_working=_whole(body.get("max_working")),
        set_max_working="max_working" in body,
        paused=body.get("paused"),
    )
    directory = validation.check_work_directory(body.get("work_directory"))
    found = await _service(request).configure_directory(directory, changes)
    return WorkDirectoryOut.of(found), 200


@endpoint("read")
async def statistics(request: Request) -> tuple[Any, int]:
    stats = await _service(request).statistics(request.query_params.get("work_directory"))
    return StatisticsOut.of(stats), 200


async def openapi(request: Request) -> Response:
    from api.interfaces.openapi import document

    return JSONResponse(document())


Endpoint = Callable[[Request], Awaitable[Response]]


class Resource:
    """One path answering every method (an ASGI app, so Starlette leaves the method to us): a
    method it lacks is a 405 whose Allow header names all it has. Starlette's route per method
    would name only the first route's, and let `PUT /tasks/next` fall through to `PUT /tasks/{id}`."""

    def __init__(self, **handlers: Endpoint) -> None:
        self.handlers = {method.upper(): handler for method, handler in handlers.items()}
        if "GET" in self.handlers:
            self.handlers["HEAD"] = self.handlers["GET"]
        self.allow = ", ".join(sorted(self.handlers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        handler = self.handlers.get(request.method)
        if handler is None:
            error = MethodNotAllowed(f"{request.method} is not allowed here; use {self.allow}")
            response: Response = error_response(error)
            response.headers["Allow"] = self.allow
        else:
            response = await handler(request)
        await response(scope, receive, send)


def resource(path: str, **handlers: Endpoint) -> Route:
    return Route(PREFIX + path, Resource(**handlers))


routes = [
    resource("/openapi.json", get=openapi),
    resource("/tasks", get=list_tasks, post=create_task),
    resource("/tasks/next", get=next_task),  # before {id}: "next" is no id
    resource("/tasks/cancel", post=cancel_tasks),  # bulk, by filter
    resource("/tasks/retry", post=retry_tasks),
    resource("/tasks/{id}", get=get_task, put=update_task),
    resource("/tasks/{id}/complete", post=complete_task),
    resource("/tasks/{id}/fail", post=fail_task),
    resource("/tasks/{id}/cancel", post=cancel_task),
    resource("/tasks/{id}/progress", post=report_progress),
    resource("/tasks/{id}/logs", get=task_logs, post=append_log),
    resource("/tasks/{id}/retry", post=retry_task),
    resource("/tasks/{id}/approve", post=approve_task),
    resource("/tasks/{id}/reject", post=reject_task),
    resource("/statistics", get=statistics),
    resource("/work-directories", get=list_work_directories, put=configure_work_directory),
]
