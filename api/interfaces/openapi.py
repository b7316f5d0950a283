"""The OpenAPI 3.1 document of REST v1, served at /api/v1/openapi.json."""

from __future__ import annotations

import functools
from typing import Any

from api import __version__
from api.core import domain
from api.core.service import MAX_OFFSET
from api.interfaces.envelope import PREFIX
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

REF = "#/components/schemas/{model}"

PRIORITIES = ["LOW", "MEDIUM", "HIGH"]
STATUSES = [status.value for status in domain.TaskStatus]

_ERROR_STATUSES = {
    "400": "VALIDATION_ERROR: the request is malformed; `details.field` names the field",
    "401": "UNAUTHENTICATED: a missing or invalid API key",
    "403": "FORBIDDEN: the key lacks the scope this route needs",
    "404": "NOT_FOUND: no task with this id",
    "409": "CONFLICT: the task is not in a state that allows this",
    "413": "PAYLOAD_TOO_LARGE: the body exceeds TASKORCH_MAX_BODY_BYTES",
    "429": "RATE_LIMITED: too many requests; retry after the Retry-After header",
    "500": "INTERNAL_ERROR: the server logged the details",
    "503": "UNAVAILABLE: the server is starting, stopping or cannot reach its database",
}
# Headers the server sends with some errors, as the clients that read them expect.
_ERROR_HEADERS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "description": "Bearer, the scheme to authenticate with",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    "429": {
        "Retry-After": {
            "description": "Whole seconds to wait before the next request",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}
SECURITY_SCHEME = "bearer"

# What str.strip() removes, as regex escapes: the domain refuses text made only of these.
_SPACE = "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace())
_NON_BLANK = f"[^{_SPACE}]"
# Non-blank and without a NUL character.
_TEXT = f"^[^\\u0000]*[^\\u0000{_SPACE}][^\\u0000]*$"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional fields also take an explicit null, meaning "the default"."""
    return {"anyOf": [schema, {"type": "null"}]}


_TAGS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:\\-]+$", "minLength": 1, "maxLength": 64},
    "maxItems": domain.MAX_TAGS,
}
_WORK_DIRECTORY = {
    "type": "string",
    # absolute, no `..` segment, no NUL
    "pattern": "^(?![^\\u0000]*(^|/)\\.\\.(/[^\\u0000]*)?$)/[^\\u0000]*$",
    "minLength": 1,
    "maxLength": domain.MAX_WORK_DIRECTORY,
}
_PROMPT = {"type": "string", "pattern": _TEXT, "minLength": 1, "maxLength": domain.MAX_PROMPT}
_WORKER_ID = {
    "type": "string",
    "pattern": _TEXT,
    "minLength": 1,
    "maxLength": domain.MAX_WORKER_ID,
}
_MESSAGE = {"type": "string", "pattern": _NON_BLANK, "minLength": 1, "maxLength": domain.MAX_TEXT}
_LEASE_SECONDS = {"type": "integer", "minimum": 1, "maximum": domain.MAX_LEASE_SECONDS}
# A line may hold MAX_LOG_LINE_BYTES of UTF-8; the schema promises the length every text fits in.
_LOG_LINES = {
    "type": "array",
    "minItems": 1,
    "maxItems": domain.MAX_LOG_LINES_PER_CALL,
    "items": {
        "type": "string",
        "pattern": "^[^\\u0000]*$",
        "maxLength": domain.MAX_LOG_LINE_BYTES // 4,
    },
}
_MAX_RETRIES = {"type": "integer", "minimum": 0, "maximum": domain.MAX_RETRIES}


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["success", "data", "error", "timestamp"],
        "properties": {
            "success": {"const": True},
            "data": data,
            "error": {"type": "null"},
            "timestamp": {"type": "string", "format": "date-time"},
        },
    }


def _ok(description: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _envelope(data)}},
    }


def _errors(*codes: str) -> dict[str, Any]:
    error_ref = {"$ref": REF.format(model="ErrorEnvelope")}
    chosen = codes or tuple(_ERROR_STATUSES)
    return {
        code: {
            "description": _ERROR_STATUSES[code],
            "content": {"application/json": {"schema": error_ref}},
            **({"headers": _ERROR_HEADERS[code]} if code in _ERROR_HEADERS else {}),
        }
        for code in chosen
    }


def _body(
    properties: dict[str, Any],
    required: list[str],
    *,
    optional: bool = False,
    any_of: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    if any_of:
        schema["anyOf"] = any_of
    return {"required": not optional, "content": {"application/json": {"schema": schema}}}


def _query(
    name: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The task id",
}
_TASK = {"$ref": REF.format(model="TaskOut")}


def _task_action(summary: str, body: dict[str, Any] | None, description: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "parameters": [_ID],
        "responses": {"200": _ok("The task after the change", _TASK), **_errors()},
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


_INSTANT = {"type": "string", "format": "date-time"}


def _bulk_filter(statuses: list[str]) -> dict[str, Any]:
    """A bulk change's filter: the listing's filters; at least one must be given (not null)."""
    properties: dict[str, Any] = {
        "statuses": _nullable({"type": "array", "items": {"enum": statuses}}),
        "work_directory": _nullable(_WORK_DIRECTORY),
        "priority": _nullable({"enum": PRIORITIES}),
        "tag": _nullable(_TAGS["items"]),
        "created_before": _nullable(_INSTANT),
        "created_after": _nullable(_INSTANT),
    }
    given = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in properties
        if name != "statuses"
    ]
    given.append(
        {"required": ["statuses"], "properties": {"statuses": {"type": "array", "minItems": 1}}}
    )
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "anyOf": given,
        "description": "Every filter given must match. An empty filter is refused: to change "
        "every task the change can, name its statuses.",
    }


def _bulk(summary: str, statuses: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": "In chunks of 500 tasks per transaction, each change with its history "
            "row; a task that changed meanwhile is skipped, not overwritten. Needs the admin scope.",
            "requestBody": _body({"filter": _bulk_filter(statuses), **extra}, ["filter"]),
            "responses": {
                "200": _ok("What changed", {"$ref": REF.format(model="BulkResultOut")}),
                **_errors("400", "401", "403", "413", "429", "500", "503"),
            },
        }
    }


@functools.cache
def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (
        TaskOut,
        TaskList,
        StatisticsOut,
        WorkDirectoryOut,
        WorkDirectoryList,
        BulkResultOut,
        LogPage,
        AppendedLog,
    ):
        schema = model.model_json_schema(ref_template=REF, mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["ErrorEnvelope"] = {
        "type": "object",
        "required": ["success", "data", "error", "timestamp"],
        "properties": {
            "success": {"const": False},
            "data": {"type": "null"},
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            },
            "timestamp": {"type": "string", "format": "date-time"},
        },
    }
    optional = {
        "priority": {"enum": PRIORITIES},
        "tags": _TAGS,
        "max_retries": _MAX_RETRIES,
        "metadata": {"type": "object"},
    }
    submit = _body(
        {
            "work_directory": _WORK_DIRECTORY,
            "prompt": _PROMPT,
            **{name: _nullable(schema) for name, schema in optional.items()},
            "idempotency_key": _nullable(
                {"type": "string", "minLength": 1, "maxLength": domain.MAX_IDEMPOTENCY_KEY}
            ),
            "run_after": _nullable({"type": "string", "format": "date-time"}),
            "depends_on": _nullable(
                {
                    "type": "array",
                    "items": {"type": "string", "format": "uuid"},
                    "maxItems": domain.MAX_DEPENDENCIES,
                    "description": "Existing tasks that must complete first (repeats count once)",
                }
            ),
            "require_review": _nullable({"type": "boolean"}),
        },
        ["work_directory", "prompt"],
    )
    changeable = {"prompt": _PROMPT, **optional}
    update = _body(
        {
            "expected_version": {"type": "integer", "minimum": 0, "maximum": domain.MAX_INT32},
            **{name: _nullable(schema) for name, schema in changeable.items()},
        },
        ["expected_version"],
        # null leaves a field as it is, and at least one field must change
        any_of=[
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
            for name in changeable
        ],
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskorch REST v1",
            "version": __version__,
            "description": "Every response is an envelope: success, data, error (code, message, "
            "details) or null, timestamp.",
        },
        "paths": {
            f"{PREFIX}/tasks": {
                "post": {
                    "summary": "Queue a task",
                    "description": "An existing idempotency_key returns its task unchanged.",
                    "requestBody": submit,
                    "responses": {"201": _ok("The queued task", _TASK), **_errors()},
                },
                "get": {
                    "summary": "List tasks in submission order",
                    "parameters": [
                        _query(
                            "status",
                            {"type": "array", "items": {"enum": STATUSES}},
                            "Only these statuses (repeat the parameter for several)",
                        ),
                        _query("priority", {"enum": PRIORITIES}, "Only this priority"),
                        _query("work_directory", _WORK_DIRECTORY, "Only this work directory"),
                        _query("tag", _TAGS["items"], "Only tasks with this tag"),
                        _query("created_before", _INSTANT, "Only tasks created before this"),
                        _query("created_after", _INSTANT, "Only tasks created after this"),
                        _query(
                            "limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size"
                        ),
                        _query(
                            "offset",
                            {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                            "Skip",
                        ),
                    ],
                    "responses": {
                        "200": _ok("One page", {"$ref": REF.format(model="TaskList")}),
                        **_errors(),
                    },
                },
            },
            f"{PREFIX}/tasks/next": {
                "get": {
                    "summary": "Claim the next task of a work directory",
                    "description": "data is null when no task is claimable, after waiting"
                    " up to wait_seconds.",
                    "parameters": [
                        _query(
                            "work_directory",
                            _WORK_DIRECTORY,
                            "The work directory (`work_path`, its older name, is accepted too)",
                            required=True,
                        ),
                        _query("worker_id", _WORKER_ID, "Who claims", required=True),
                        _query(
                            "lease_seconds",
                            {"type": "integer", "minimum": 1, "maximum": domain.MAX_LEASE_SECONDS},
                            "Lease",
                        ),
                        _query(
                            "wait_seconds",
                            {"type": "number", "minimum": 0, "maximum": domain.MAX_WAIT_SECONDS},
                            "Wait for one",
                        ),
                    ],
                    "responses": {
                        "200": _ok(
                            "The claimed task, or null", {"anyOf": [_TASK, {"type": "null"}]}
                        ),
                        **_errors(),
                    },
                },
            },
            f"{PREFIX}/tasks/{{id}}": {
                "get": {
                    "summary": "One task",
                    "parameters": [_ID],
                    "responses": {"200": _ok("The task", _TASK), **_errors()},
                },
                "put": _task_action(
                    "Edit a WAITING or BLOCKED task",
                    update,
                    "Only while the task is still at expected_version.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/complete": {
                "post": _task_action(
                    "Complete a task you hold",
                    _body(
                        {
                            "worker_id": _WORKER_ID,
                            "result": {},
                            "original_prompt": _nullable({"type": "string"}),
                        },
                        ["worker_id"],
                    ),
                    "An original_prompt that differs from the task's prompt is a CONFLICT.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/fail": {
                "post": _task_action(
                    "Fail a task you hold",
                    _body(
                        {
                            "worker_id": _WORKER_ID,
                            "error": _MESSAGE,
                            "retry": {"type": "boolean"},
                        },
                        ["worker_id", "error"],
                    ),
                    "Retried with backoff while retries remain, unless retry is false.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/cancel": {
                "post": _task_action(
                    "Cancel a BLOCKED, WAITING, WORKING or IN_REVIEW task",
                    _body(
                        {"reason": _nullable({"type": "string", "maxLength": domain.MAX_TEXT})},
                        [],
                        optional=True,
                    ),
                    "The reason is kept in the task's history.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/retry": {
                "post": _task_action(
                    "Queue a FAILED or CANCELLED task again", None, "With a fresh retry budget."
                ),
            },
            f"{PREFIX}/tasks/{{id}}/approve": {
                "post": _task_action(
                    "Approve a task IN_REVIEW",
                    _body(
                        {"note": _nullable({"type": "string", "maxLength": domain.MAX_TEXT})},
                        [],
                        optional=True,
                    ),
                    "It becomes COMPLETED and its dependents may run. Needs the review scope.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/reject": {
                "post": _task_action(
                    "Reject a task IN_REVIEW",
                    _body(
                        {"feedback": _MESSAGE, "retry": {"type": "boolean"}},
                        ["feedback"],
                    ),
                    "Back to WAITING with review_feedback (one retry counted; FAILED once the"
                    " retries are spent), or FAILED when retry is false. Needs the review scope.",
                ),
            },
            f"{PREFIX}/tasks/cancel": _bulk(
                "Cancel every BLOCKED, WAITING, WORKING or IN_REVIEW task a filter matches",
                [s.value for s in domain.CANCELLABLE],
                {"reason": _nullable({"type": "string", "maxLength": domain.MAX_TEXT})},
            ),
            f"{PREFIX}/tasks/retry": _bulk(
                "Queue again every FAILED or CANCELLED task a filter matches",
                ["FAILED", "CANCELLED"],
                {},
            ),
            f"{PREFIX}/work-directories": {
                "get": {
                    "summary": "Every known work directory, with its controls and task counts",
                    "parameters": [
                        _query("work_directory", _WORK_DIRECTORY, "Only this directory")
                    ],
                    "responses": {
                        "200": _ok("By name", {"$ref": REF.format(model="WorkDirectoryList")}),
                        **_errors(),
                    },
                },
                "put": {
                    "summary": "Set a work directory's controls",
                    "description": "max_working caps its WORKING tasks (null or 0: no cap; 1: one "
                    "agent at a time); paused stops it handing out tasks. A field left out (or "
                    "a null paused) keeps its value. Waiting claims wake on every replica. "
                    "Needs the admin scope.",
                    "requestBody": _body(
                        {
                            "work_directory": _WORK_DIRECTORY,
                            "max_working": _nullable(
                                {"type": "integer", "minimum": 0, "maximum": domain.MAX_INT32}
                            ),
                            "paused": _nullable({"type": "boolean"}),
                        },
                        ["work_directory"],
                    ),
                    "responses": {
                        "200": _ok(
                            "The directory after the change",
                            {"$ref": REF.format(model="WorkDirectoryOut")},
                        ),
                        **_errors("400", "401", "403", "413", "429", "500", "503"),
                    },
                },
            },
            f"{PREFIX}/tasks/{{id}}/progress": {
                "post": _task_action(
                    "Report the progress of a task you hold",
                    _body(
                        {
                            "worker_id": _WORKER_ID,
                            "progress": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
                            "message": _nullable(
                                {
                                    "type": "string",
                                    "pattern": "^[^\\u0000]*$",
                                    "maxLength": domain.MAX_PROGRESS_MESSAGE,
                                }
                            ),
                            "lease_seconds": _nullable(_LEASE_SECONDS),
                        },
                        ["worker_id"],
                    ),
                    "progress from 0 to 1; null (or absent) leaves the stored value. Extends the"
                    " lease like a heartbeat.",
                ),
            },
            f"{PREFIX}/tasks/{{id}}/logs": {
                "post": {
                    "summary": "Append lines to the log of a task you hold",
                    "description": "Lines are numbered per task from 1; each line may hold up to"
                    f" {domain.MAX_LOG_LINE_BYTES} bytes of UTF-8. The newest"
                    f" {domain.MAX_LOG_LINES_KEPT} lines of a task are kept.",
                    "parameters": [_ID],
                    "requestBody": _body(
                        {"worker_id": _WORKER_ID, "lines": _LOG_LINES}, ["worker_id", "lines"]
                    ),
                    "responses": {
                        "200": _ok(
                            "The number of the last line stored",
                            {"$ref": REF.format(model="AppendedLog")},
                        ),
                        **_errors(),
                    },
                },
                "get": {
                    "summary": "A page of a task's log",
                    "parameters": [
                        _ID,
                        _query(
                            "after",
                            {"type": "integer", "minimum": 0, "maximum": domain.MAX_INT32},
                            "Only lines numbered above this (0: from the first)",
                        ),
                        _query(
                            "first",
                            {"type": "integer", "minimum": 1, "maximum": domain.MAX_PAGE},
                            "Page size",
                        ),
                    ],
                    "responses": {
                        "200": _ok("One page", {"$ref": REF.format(model="LogPage")}),
                        **_errors(),
                    },
                },
            },
            f"{PREFIX}/statistics": {
                "get": {
                    "summary": "Tasks per status",
                    "parameters": [
                        _query("work_directory", _WORK_DIRECTORY, "Only this directory")
                    ],
                    "responses": {
                        "200": _ok("Counts", {"$ref": REF.format(model="StatisticsOut")}),
                        **_errors(),
                    },
                },
            },
        },
        "security": [{SECURITY_SCHEME: []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `taskorch keys create`. While no key exists, "
                    "loopback clients are served without one.",
                }
            },
        },
    }
