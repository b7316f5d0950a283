"""create_app(settings) -> Starlette: wires store, bus, service, routes and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from api import __version__
from api.domain import Backoff, TaskStatus
from api.events import EventBus, LocalBus
from api.gql.context import Context
from api.gql.schema import build_schema
from api.service import TaskService
from api.settings import Settings
from api.store import open_store
from api.store.base import TaskStore

log = logging.getLogger("taskorch.app")


class GraphQLView(GraphQL[Context, None]):
    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        return Context(service=request.app.state.service, request=request, response=response)


async def sweep_leases(service: TaskService, interval: float) -> None:
    """Requeue expired leases every `interval` seconds; every replica may run this at once."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await service.expire_leases()
            if expired:
                log.info("requeued %d task(s) whose lease expired", len(expired))
        except Exception:
            log.exception("lease sweep failed; retrying in %.1fs", interval)


async def health(request: Request) -> JSONResponse:
    service: TaskService = request.app.state.service
    started = time.perf_counter()
    body: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app.state.started, 3),
    }
    try:
        counts = await asyncio.wait_for(service.store.count_by_status(None), timeout=2.0)
    except Exception as exc:
        log.warning("health check: database did not answer: %s", exc)
        body["status"] = "unhealthy"
        body["components"] = {"database": {"status": "unhealthy", "error": type(exc).__name__}}
        return JSONResponse(body, status_code=503)
    body["status"] = "healthy"
    body["components"] = {
        "database": {
            "status": "healthy",
            "response_time_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    }
    body["queue"] = {status.value.lower(): counts.get(status, 0) for status in TaskStatus}
    return JSONResponse(body)


def open_bus(settings: Settings, store: TaskStore) -> EventBus:
    """The event bus for this store: in-process for SQLite (one writer per process)."""
    bus = LocalBus()
    store.listen(bus.dispatch)
    return bus


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = open_store(settings)
        await store.open()
        bus = open_bus(settings, store)
        await bus.start()
        service = TaskService(
            store,
            bus,
            backoff=Backoff(settings.backoff_base, settings.backoff_cap),
            subscriber_buffer=settings.subscriber_buffer,
        )
        app.state.service = service
        app.state.started = time.monotonic()
        sweeper = asyncio.create_task(sweep_leases(service, settings.lease_sweep_interval))
        log.info("taskorch %s serving %s", __version__, settings.database_url)
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await bus.stop()
            await service.drain()
            await store.close()

    view = GraphQLView(
        build_schema(),
        graphql_ide="graphiql" if settings.graphiql else None,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
    )
    return Starlette(
        routes=[
            Route("/graphql", view, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
