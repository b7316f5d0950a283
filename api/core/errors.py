"""Errors a client can cause, each carrying the code every interface reports."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

INTERNAL_MESSAGE = (
    "internal error: the server logged the details; try again or contact the operator"
)


class TaskorchError(Exception):
    """Base of every error a client can see; `code` is the contract, `message` says what to do."""

    code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    @property
    def extensions(self) -> dict[str, Any]:
        """GraphQL `extensions` for this error (graphql-core copies it from the original error)."""
        return {"code": self.code, **self.details}


class ValidationError(TaskorchError):
    code = "VALIDATION_ERROR"
    http_status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, details={"field": field})
        self.field = field


class NotFound(TaskorchError):
    code = "NOT_FOUND"
    http_status = 404


class Conflict(TaskorchError):
    code = "CONFLICT"
    http_status = 409


class Unauthenticated(TaskorchError):
    code = "UNAUTHENTICATED"
    http_status = 401


class Forbidden(TaskorchError):
    code = "FORBIDDEN"
    http_status = 403


class MethodNotAllowed(TaskorchError):
    code = "METHOD_NOT_ALLOWED"
    http_status = 405


class PayloadTooLarge(TaskorchError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class RateLimited(TaskorchError):
    code = "RATE_LIMITED"
    http_status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, details={"retryAfter": retry_after})
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """The Retry-After value: whole seconds, rounded up so a client retrying then succeeds."""
        return str(max(1, math.ceil(self.retry_after)))


class Unavailable(TaskorchError):
    """The server cannot serve this right now (database down, shutting down)."""

    code = "UNAVAILABLE"
    http_status = 503


class InternalError(TaskorchError):
    code = "INTERNAL_ERROR"
    http_status = 500


def missing_key() -> Unauthenticated:
    return Unauthenticated("missing API key: send the header 'Authorization: Bearer KEY'")


def forbidden(
    key_name: str, granted: Iterable[str], scope: str, *, operation: str | None = None
) -> Forbidden:
    """A key without `scope`; `operation` names what it tried (GraphQL names the root field)."""
    has = ", ".join(sorted(granted)) or "none"
    if operation is None:
        return Forbidden(
            f"the API key {key_name!r} lacks the {scope!r} scope (it has: {has})",
            details={"requiredScope": scope},
        )
    return Forbidden(
        f"the API key {key_name!r} may not use {operation}: it needs the {scope!r} scope "
        f"(it has: {has})",
        details={"field": operation, "requiredScope": scope},
    )


def subscription_over_http() -> ValidationError:
    return ValidationError(
        "query",
        "a subscription runs over a WebSocket: connect to /graphql with the graphql-transport-ws"
        " protocol (graphql-ws clients and GraphiQL do); plain HTTP serves queries and mutations",
    )


def internal_error() -> InternalError:
    return InternalError(INTERNAL_MESSAGE)
