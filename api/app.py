"""create_app(settings) -> Starlette: wires store, bus, service, routes and the lifespan."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.http.parse_content_type import parse_content_type
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET

from api import __version__
from api.interfaces import rest
from api.interfaces.gql.compiled import Plans
from api.interfaces.gql.context import Context
from api.interfaces.gql.fanout import Fanout
from api.interfaces.gql.ide import graphiql_assets, graphiql_page, is_ide_request
from api.interfaces.gql.schema import build_schema
from api.interfaces.gql.security import SecuredTransportWS, guard_extensions
from api.interfaces.mcp import PROFILES, build_mcp, http_routes, http_sessions
from api.jsontext import loads
from api.ops.health import QueueCounts, health
from api.ops.logs import AccessLog
from api.ops.metrics import metrics, observe_commit, observe_request
from api.runtime import runtime
from api.security.auth import AuthMiddleware, Gate
from api.settings import Settings

log = logging.getLogger("taskorch.app")


class GraphQLView(GraphQL[Context, None]):
    """Strawberry's view, with compiled plans for the documents it has served (unless `plans` is
    None): a POST whose document has a plan is answered by it; any other request, and the first
    of each document, goes through Strawberry and the general executor."""

    graphql_transport_ws_handler_class = SecuredTransportWS  # keys, scopes and limits on sockets

    def __init__(self, schema: Any, *, compiled: bool, **options: Any) -> None:
        super().__init__(schema, **options)
        self.plans = Plans(schema) if compiled else None

    async def run(  # type: ignore[override]
        self, request: Request | WebSocket, context: Any = UNSET, root_value: Any = UNSET
    ) -> Response | WebSocket:
        if self.plans is not None and isinstance(request, Request):
            answer = await self._run_plan(self.plans, request)
            if answer is not None:
                return answer
        return await super().run(request, context, root_value)

    async def _run_plan(self, plans: Plans, request: Request) -> Response | None:
        """The answer of the document's plan, or None when the general path must answer."""
        content_type, _ = parse_content_type(request.headers.get("content-type", ""))
        if (
            request.method != "POST"
            or "application/json" not in content_type
            or self._get_stream_transport_from_headers(request.headers) is not None
        ):
            return None
        try:
            body = loads(await request.body())  # integers beyond 64 bits stay exact, as there
        except ValueError:
            return None  # the general path gives its own answer
        if not isinstance(body, dict):
            return None  # a batch
        query, name = body.get("query"), body.get("operationName")
        variables, extensions = body.get("variables"), body.get("extensions")
        if (
            not isinstance(query, str)
            or not isinstance(name, str | None)
            or not isinstance(variables, dict | None)
            or not isinstance(extensions, dict | None)
        ):
            return None
        plan = plans.get(query, name)
        if plan is None:
            return None
        sub_response = await self.get_sub_response(request)
        context = await self.get_context(request, sub_response)
        payload = await plans.run(plan, context, variables)
        return self.create_response(cast(GraphQLHTTPResponse, payload), sub_response)

    async def execute_single(
        self,
        request: Request,
        request_adapter: Any,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        result = await super().execute_single(
            request, request_adapter, sub_response, context, root_value, request_data
        )
        # A plan is built from a document that parsed, validated and passed its limits: only
        # field errors (with a path) may have come back.
        if (
            self.plans is not None
            and request_adapter.method == "POST"
            and request_data.protocol == "http"
            and isinstance(request_data.query, str)
            and isinstance(request_data.operation_name, str | None)
            and all(error.path is not None for error in result.errors or ())
        ):
            self.plans.learn(request_data.query, request_data.operation_name)
        return result

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
            async with contextlib.AsyncExitStack() as sessions:
                for mcp_server in mcp_servers.values():
                    await sessions.enter_async_context(http_sessions(mcp_server))
                yield

    view = GraphQLView(
        build_schema(guard_extensions(settings)),
        compiled=settings.compiled_execution,
        graphql_ide="graphiql" if settings.graphiql else None,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
    )
    mcp_servers = {name: build_mcp(lambda: app.state.service, name) for name in PROFILES}
    app = Starlette(
        routes=[
            Route("/graphql", view, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *rest.routes,
            *http_routes(mcp_servers, settings.mcp_tools, settings),
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
