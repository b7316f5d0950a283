"""The REST v1 envelope and where REST v1 lives: shared by its routes and the middleware's refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from api.core.errors import TaskorchError

PREFIX = "/api/v1"


def is_rest(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def envelope(data: Any, error: TaskorchError | None) -> dict[str, Any]:
    """Every REST answer: success, data, error (code, message, details) or null, timestamp."""
    return {
        "success": error is None,
        "data": data,
        "error": None
        if error is None
        else {"code": error.code, "message": error.message, "details": error.details},
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
