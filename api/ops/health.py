"""GET /health: a live database ping on every call, queue counts cached for a second."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from api import __version__
from api.core.domain import TaskStatus
from api.store.base import TaskStore

log = logging.getLogger("taskorch.health")

PING_TIMEOUT = 2.0
COUNTS_TTL = 1.0


class QueueCounts:
    """Tasks by status, read at most once per `ttl` seconds however many callers ask: counting
    scans the table, while health is polled every second and metrics are scraped by several."""

    def __init__(self, store: TaskStore, ttl: float = COUNTS_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._value: dict[TaskStatus, int] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> dict[TaskStatus, int]:
        if time.monotonic() - self._read_at < self._ttl:
            return self._value
        async with self._lock:  # concurrent callers share one read
            if time.monotonic() - self._read_at >= self._ttl:
                self._value = await self._store.count_by_status(None)
                self._read_at = time.monotonic()
            return self._value


async def health(request: Request) -> JSONResponse:
    state = request.app.state
    body: dict[str, Any] = {
        "status": "healthy",
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "pid": os.getpid(),  # which process answered, with `serve --workers` or replicas
    }
    started = time.perf_counter()
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await state.service.store.ping()
        elapsed = time.perf_counter() - started
        async with asyncio.timeout(PING_TIMEOUT):
            counts = await state.queue_counts.get()
    except Exception as exc:
        log.warning("health check: the database did not answer: %s", exc or type(exc).__name__)
        body["status"] = "unhealthy"
        body["components"] = {
            "database": {
                "status": "unhealthy",
                "error": type(exc).__name__,
                "response_time_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        }
        return JSONResponse(body, status_code=503)
    body["components"] = {
        "database": {"status": "healthy", "response_time_ms": round(elapsed * 1000, 3)}
    }
    body["queue"] = {status.value.lower(): counts.get(status, 0) for status in TaskStatus}
    return JSONResponse(body)
