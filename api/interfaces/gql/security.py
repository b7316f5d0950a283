"""GraphQL's share of security: the scope each root field needs, the guards against hostile
documents, and the subscription socket's authentication, rate limit and scope checks."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    get_operation_ast,
    parse,
)
from starlette.websockets import WebSocket
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    QueryDepthLimiter,
    SchemaExtension,
)
from strawberry.schema.exceptions import CannotGetOperationTypeError
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    ErrorMessage,
    SubscribeMessage,
)

from api.core.errors import (
    TaskorchError,
    Unauthenticated,
    forbidden,
    missing_key,
    subscription_over_http,
)
from api.interfaces.gql.context import Context
from api.interfaces.gql.fanout import Fanout, Key, shareable
from api.security.auth import Gate, Principal, principal_of, rate_limited, scope_of
from api.settings import Settings

log = logging.getLogger("taskorch.graphql")

# The service operation each mutation runs; its scope comes from `auth.OPERATION_SCOPES`.
MUTATION_OPERATIONS = {
    "submitTask": "submit",
    "submitTasks": "submit",
    "cancelTask": "cancel",
    "retryTask": "retry",
    "updateTask": "update",
    "claimTask": "claim",
    "claimTasks": "claim",
    "heartbeat": "heartbeat",
    "reportProgress": "report_progress",
    "appendTaskLog": "append_log",
    "completeTask": "complete",
    "completeTasks": "complete",
    "failTask": "fail",
    "releaseTask": "release",
    "approveTask": "approve",
    "rejectTask": "reject",
    "cancelTasks": "cancel_tasks",
    "retryTasks": "retry_tasks",
    "configureWorkDirectory": "configure_work_directory",
}


def field_scope(operation: OperationType, name: str) -> str | None:
    """The scope a root field needs; a mutation nobody listed here needs `admin`."""
    if name == "__typename":
        return None
    if operation is OperationType.MUTATION:
        return scope_of(MUTATION_OPERATIONS.get(name, ""))
    return scope_of("read")


def root_fields(document: DocumentNode, operation_name: str | None) -> list[tuple[str, str | None]]:
    """(field, scope) for each root field the chosen operation selects, through fragments."""
    operation = get_operation_ast(document, operation_name)
    if operation is None:
        return []
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    found: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def walk(selection_set: SelectionSetNode) -> None:
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                name = selection.name.value
                found.append((name, field_scope(operation.operation, name)))
            elif isinstance(selection, InlineFragmentNode):
                walk(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                spread = selection.name.value
                if spread not in seen and spread in fragments:
                    seen.add(spread)
                    walk(fragments[spread].selection_set)

    walk(operation.selection_set)
    return found


def refusal(
    principal: Principal | None, fields: list[tuple[str, str | None]]
) -> TaskorchError | None:
    """The error refusing the whole operation, or None when the principal may run every field."""
    if principal is None:
        return missing_key()
    for name, scope in fields:
        if scope is not None and not principal.allows(scope):
            return forbidden(principal.name, principal.scopes, scope, operation=name)
    return None


class ScopeCheck(SchemaExtension):
    """Refuses, before anything runs, an operation with a root field the caller's scopes lack, and
    a subscription sent over plain HTTP (it would answer nothing)."""

    def on_execute(self) -> Iterator[None]:
        ctx = self.execution_context
        context = ctx.context
        request = getattr(context, "request", None)
        principal = None if request is None else principal_of(request)
        document = ctx.graphql_document
        if document is not None:
            error = refusal(principal, root_fields(document, ctx.operation_name))
            if error is None and not isinstance(request, WebSocket):
                operation = get_operation_ast(document, ctx.operation_name)
                if operation is not None and operation.operation is OperationType.SUBSCRIPTION:
                    error = subscription_over_http()
            if error is not None:
                raise refused(context, error)
        yield


def refused(context: Any, error: TaskorchError) -> GraphQLError:
    """`error` as the GraphQL error refusing the whole operation; an HTTP answer takes its status."""
    response = getattr(context, "response", None)
    if hasattr(response, "status_code"):
        response.status_code = error.http_status  # type: ignore[union-attr]
    return GraphQLError(error.message, extensions=error.extensions)


def guard_extensions(settings: Settings) -> list[Any]:
    """Schema extensions that bound what one document may cost, from the settings."""
    # The rule classes are built once: ValidationCache keys on them, and the limiters make a new
    # class on every construction, which would make every request miss the cache.
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    guards: list[Any] = [
        lambda: MaxTokensLimiter(max_token_count=settings.max_tokens),
        lambda: AddValidationRules(rules),
    ]
    if not settings.introspection:
        guards.append(DisableIntrospection)
    return guards


class SecuredTransportWS(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws with keys: 4401 for a missing, invalid or revoked key; each subscribe
    message spends one request of the caller's rate limit. An operation that cannot start (syntax
    error, unknown operation, a scope the key lacks, the rate limit) gets an `error` message with the
    GraphQL errors HTTP would give, and the socket stays open for the caller's other operations."""

    @property
    def socket(self) -> WebSocket:
        socket = self.context.request
        assert isinstance(socket, WebSocket)
        return socket

    @property
    def gate(self) -> Gate:
        gate: Gate = self.socket.app.state.gate
        return gate

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        payload = message.get("payload")
        if isinstance(payload, dict) and not self.connection_init_received:
            authorization = payload.get("Authorization") or payload.get("authorization")
            if not isinstance(authorization, str):
                authorization = self.socket.headers.get("authorization")
            client = self.socket.client.host if self.socket.client else None
            try:
                principal = await self.gate.authenticate(authorization, client)
            except Unauthenticated as error:
                await self._reject(4401, error.message[:120])
                return
            self.socket.state.principal = principal
        await super().handle_connection_init(message)
        if self.connection_init_received:
            # The base handler cancelled its init timer but keeps the task, with its exception and
            # frames, for as long as the socket lives: ~1 KB each of 1,000 sockets.
            self.connection_init_timeout_task = None

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        # An unacknowledged socket or a reused id is the protocol's own business (4401, 4409).
        op_id = message["id"]
        if self.connection_acknowledged and op_id not in self.operations:
            principal = principal_of(self.socket)
            if principal is None or not await self.gate.still_valid(principal):
                await self._reject(4401, "invalid or revoked API key")
                return
            wait = self.gate.charge(principal, None)
            if wait:
                limited = rate_limited(wait)
                await self._refuse(
                    op_id, GraphQLError(limited.message, extensions=limited.extensions)
                )
                return
            error = self._unstartable(principal, message.get("payload"))
            if error is not None:
                await self._refuse(op_id, error)
                return
            if self._share(message):
                return
        await super().handle_subscribe(message)

    def _share(self, message: SubscribeMessage) -> bool:
        """Join (or start) the shared execution of this subscription if it can share one."""
        limit = self.max_subscriptions_per_connection
        if limit is not None and len(self.operations) >= limit:
            return False  # the base handler refuses it
        payload = message["payload"]
        variables = payload.get("variables") or {}
        query, name = payload["query"], payload.get("operationName")
        if not isinstance(variables, dict):
            return False
        key = shareable(parse(query), query, name, variables)
        if key is None:
            return False
        operation: Operation[Context, None] = Operation(self, message["id"], query, variables, name)
        operation.task = asyncio.create_task(self._run_shared(operation, key))
        operation.task.add_done_callback(self._task_done)
        self.operations[message["id"]] = operation
        return True

    async def _run_shared(self, operation: Operation[Context, None], key: Key) -> None:
        fanout: Fanout = self.socket.app.state.fanout
        variables = operation.variables or {}
        # Every member sends the group's encoded payload inside its own message.
        head = '{"id":' + json.dumps(operation.id) + ',"type":"next","payload":'
        async with fanout.join(key, self.context, variables, self.view.encode_json) as member:
            async for payload in member.payloads():
                if operation.completed:
                    return
                await self.socket.send_text(head + payload + "}")
            final = member.final
        assert final is not None
        if final.kind == "error":
            message: Any = {"id": operation.id, "type": "error", "payload": final.payload}
            await operation.send_operation_message(message)
            return
        if final.payload is not None:
            next_message: Any = {"id": operation.id, "type": "next", "payload": final.payload}
            await operation.send_operation_message(next_message)
        await operation.send_operation_message({"id": operation.id, "type": "complete"})

    def _unstartable(self, principal: Principal, payload: object) -> GraphQLError | None:
        """Why the operation cannot start, or None. Strawberry's stream lets a syntax error escape
        (its subscribers see only `complete`) and closes the whole socket for an unknown operation,
        so both are decided here, before the operation exists."""
        if not isinstance(payload, dict):
            return None
        query = payload.get("query")
        if not isinstance(query, str) or not query:
            return None  # the handler answers a missing query itself
        try:
            document = parse(query, max_tokens=self.gate.max_tokens)
        except GraphQLSyntaxError as error:
            return error
        name = payload.get("operationName")
        if isinstance(name, str):
            if get_operation_ast(document, name) is None:
                return GraphQLError(CannotGetOperationTypeError(name).as_http_error_reason())
        else:
            # As over HTTP, an unnamed request runs the document's first operation.
            first = next(
                (d for d in document.definitions if isinstance(d, OperationDefinitionNode)), None
            )
            if first is None:
                return GraphQLError(CannotGetOperationTypeError(None).as_http_error_reason())
            name = first.name.value if first.name else None
        refused = refusal(principal, root_fields(document, name))
        return (
            None
            if refused is None
            else GraphQLError(refused.message, extensions=refused.extensions)
        )

    async def _refuse(self, op_id: str, error: GraphQLError) -> None:
        self.schema.process_errors([error])  # the same codes as over HTTP
        await self.send_message(ErrorMessage(id=op_id, type="error", payload=[error.formatted]))

    async def _reject(self, code: int, reason: str) -> None:
        self.connection_init_received = True
        if self.connection_init_timeout_task:
            self.connection_init_timeout_task.cancel()
        await self.websocket.close(code=code, reason=reason)
