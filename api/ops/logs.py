"""Structured logs: JSON lines (or text), secrets redacted, one access line per request."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.security.redact import redact

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("taskorch.access")

# Attributes every LogRecord has; anything else came from `extra=` and is logged as a field.
# uvicorn adds `color_message`: the same message with terminal colour codes.
_BLANK = logging.LogRecord("", 0, "", 0, "", None, None)
_STANDARD = frozenset(vars(_BLANK)) | {"message", "asctime", "color_message"}

SCOPE_KEY = "taskorch.request"
MAX_REQUEST_ID = 128


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the `extra` fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(redact(_fields(record)))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a terminal: `time LEVEL logger message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        extra = redact(_fields(record))
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return str(line)


def configure(level: str, fmt: str) -> None:
    """Route every logger (ours, uvicorn's, libraries') through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our middleware writes the access line; uvicorn's would be a second, less complete one.
    logging.getLogger("uvicorn.access").disabled = True


@dataclass(slots=True)
class RequestInfo:
    """What the layers below the middleware learn about a request, for its log line and metrics."""

    request_id: str
    operation: str | None = None  # the metrics label: bounded by the schema and the routes
    graphql_operation: str | None = None  # the client's operation name, for the log line


def request_info(scope: Scope) -> RequestInfo | None:
    info = scope.get(SCOPE_KEY)
    return info if isinstance(info, RequestInfo) else None


# Unique across processes and restarts (random prefix) and cheap per request (a counter).
_ID_PREFIX = os.urandom(12).hex()  # with the counter: 32 hex digits, like a UUID
_ID_COUNTER = itertools.count(1)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text: str = value.decode("latin-1").strip()
            if text and len(text) <= MAX_REQUEST_ID and text.isprintable():
                return text
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


RequestObserver = Callable[[Scope, RequestInfo, int, float], None]


class AccessLog:
    """Pure ASGI middleware: request id in and out, one log line per HTTP request, and a hook
    (`observe`) that metrics use to time each request by operation."""

    def __init__(self, app: ASGIApp, observe: RequestObserver | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        info = RequestInfo(_request_id(scope))
        scope[SCOPE_KEY] = info
        header = (b"x-request-id", info.request_id.encode("latin-1"))
        status = 500 if scope["type"] == "http" else 101
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif message["type"] == "websocket.accept":
                message["headers"] = [*message.get("headers", ()), header]
            elif message["type"] == "websocket.close" and status == 101:
                status = 403  # refused before it was accepted
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            self._log(scope, info, status, duration)
            if self.observe is not None:
                self.observe(scope, info, status, duration)

    @staticmethod
    def _log(scope: Scope, info: RequestInfo, status: int, duration: float) -> None:
        level = logging.ERROR if status >= 500 else logging.INFO
        if not access_log.isEnabledFor(level):  # TASKORCH_LOG_LEVEL=warning: no line to build
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope.get("method", "WEBSOCKET"),
            "path": scope.get("path", ""),
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "request_id": info.request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        if info.graphql_operation is not None:
            fields["operation"] = info.graphql_operation
        access_log.log(
            level,
            "%s %s %d %.1fms",
            fields["method"],
            fields["path"],
            status,
            duration * 1000,
            extra=fields,
        )
