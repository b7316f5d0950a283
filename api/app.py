"""create_app(settings) -> Starlette: wires store, bus, service, routes and the lifespan."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from api import __version__
from api.interfaces import rest
from api.interfaces.gql.context import Context
from api.interfaces.gql.fanout import Fanout
from api.interfaces.gql.ide import graphiql_assets, graphiql_page, is_ide_request
from api.interfaces.gql.schema import build_schema
from api.interfaces.gql.security import SecuredTransportWS, guard_extensions
from api.interfaces.mcp import build_mcp, http_sessions, transport_security
from api.ops.health import QueueCounts, health
from api.ops.logs import AccessLog
from api.ops.metrics import metrics, observe_commit, observe_request
from api.runtime import runtime
from api.security.auth import AuthMiddleware, Gate
from api.settings import Settings

log = logging.getLogger("taskorch.app")


class GraphQLView(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = SecuredTransportWS  # keys, scopes and limits on sockets

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        return Context(service=request.app.state.service, request=request, response=response)

    async def get_sub_response(self, request: Request | WebSocket) -> Response:
        return _SubResponse()

    async def render_graphql_ide(self, request: Request) -> Response:
        return HTMLResponse(graphiql_page())  # its assets come from this server, not a CDN

    def encode_json(self, data: object) -> str:
        try:
            return orjson.dumps(data).decode()
        except TypeError:  # integers beyond 64 bits, which JSON allows and orjson refuses
            return json.dumps(data)


class _SubResponse(Response):
    """What resolvers may set on the HTTP answer (status, headers), without building a response
    body and headers only to throw them away on every request."""

    def __init__(self) -> None:
        self.status_code = None  # type: ignore[assignment]
        self.background = None
        self.raw_headers = []


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime(settings) as running:
            # before anything awaits, so the background jobs' first commits are counted too
            running.store.listen(observe_commit)
            app.state.service = running.service
            app.state.gate = Gate(running.store, settings)
            app.state.fanout = Fanout(view.schema, settings.subscriber_buffer)
            await app.state.gate.warn_if_protected()
            app.state.started = time.monotonic()
            app.state.queue_counts = QueueCounts(running.store)
            log.info("taskorch %s serving %s", __version__, settings.database_url)
            async with http_sessions(mcp_server):
                yield

    view = GraphQLView(
        build_schema(guard_extensions(settings)),
        graphql_ide="graphiql" if settings.graphiql else None,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
    )
    # Stateless: any replica can answer any MCP request, as with every other route.
    mcp_server = build_mcp(lambda: app.state.service)
    mcp_http = mcp_server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        transport_security=transport_security(settings),
    )
    app = Starlette(
        routes=[
            Route("/graphql", view, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *rest.routes,
            *mcp_http.routes,
            *([graphiql_assets()] if settings.graphiql else []),
        ],
        middleware=[
            Middleware(AccessLog, observe=observe_request),
            Middleware(
                AuthMiddleware,
                max_body_bytes=settings.max_body_bytes,
                is_open=is_ide_request if settings.graphiql else lambda scope: False,
            ),
        ],
        lifespan=lifespan,
    )
    return app
