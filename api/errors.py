"""Errors a client can cause, each carrying the code every interface reports."""

from __future__ import annotations

from typing import Any


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


class Unavailable(TaskorchError):
    """The server cannot serve this right now (database down, shutting down)."""

    code = "UNAVAILABLE"
    http_status = 503


class InternalError(TaskorchError):
    code = "INTERNAL_ERROR"
    http_status = 500
