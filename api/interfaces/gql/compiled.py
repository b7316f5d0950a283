"""Compiled execution: a plan built once for a cached GraphQL operation answers it without the
general executor, with the same JSON.

A plan is built only for a (document, operationName) that the general executor already ran
without a request error, so parsing, validation and the document limits (tokens, depth,
aliases, introspection) are known to pass: they depend on the document alone. Per request a
plan does what the general path does, with the same functions: the scope check (`refusal`),
graphql-core's variable and argument coercion, Strawberry's argument conversion and the resolver
itself, then `Schema.process_errors` for every error. Only the completion differs: a serializer
built for exactly the selected fields turns the resolver's result into plain data for orjson.
When that serializer meets anything it does not expect (a null for a non-null field, a value
its scalar refuses), graphql-core completes the same result instead, so error paths, locations,
null propagation and masking come from graphql-core itself.

A document of another shape gets no plan and keeps the general executor: subscriptions, several
root fields, directives (@skip/@include depend on variables), fields below the root that have
their own resolver (they do I/O: `Task.history`, `Task.logs`, `TaskEvent.task`), abstract types,
and introspection."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    ExecutionResult,
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLField,
    GraphQLObjectType,
    OperationType,
    Visitor,
    get_operation_ast,
    parse,
    visit,
)
from graphql.execution.collect_fields import FieldDetailsList, FragmentDetails, collect_fields
from graphql.execution.executor import Executor
from graphql.execution.values import get_argument_values
from graphql.pyutils import Path
from strawberry.execution import optimized_is_awaitable
from strawberry.types.field import StrawberryField
from strawberry.utils.await_maybe import await_maybe

from api.interfaces.gql.context import Context
from api.interfaces.gql.conversion import CallArguments, call_arguments
from api.interfaces.gql.security import refusal, refused, root_fields
from api.interfaces.gql.serializers import (
    NO_VARIABLES,
    Serialize,
    Serializers,
    Unsupported,
    strawberry_field,
)
from api.ops.logs import request_info
from api.ops.metrics import COMPILED_EXECUTIONS, root_label
from api.security.auth import principal_of


@dataclass(frozen=True, slots=True)
class Plan:
    """How to run one operation of one document."""

    document: DocumentNode
    operation_name: str | None
    scopes: list[tuple[str, str | None]]  # (root field, scope) for `refusal`
    label: str | None  # the metrics label OperationName would give
    root_type: GraphQLObjectType
    key: str  # the root field's response key (its alias or name)
    details: FieldDetailsList  # its field nodes, for arguments, locations and graphql-core
    field: GraphQLField
    resolver: StrawberryField
    arguments: CallArguments  # Strawberry's conversion to the resolver's arguments
    serialize: Serialize


class Plans:
    """The plans of the documents served lately, by (query text, operationName), least recently
    used first out. A document found unsupported is remembered too (as None), so it is examined
    once, not on every request."""

    def __init__(self, schema: Any, size: int = 256) -> None:
        self.schema = schema  # the Strawberry schema: conversion, resolvers, process_errors
        self.size = size
        self._plans: OrderedDict[tuple[str, str | None], Plan | None] = OrderedDict()
        # Resolving middleware would wrap every field, which a serializer does not do.
        self.enabled = not any(e._implements_resolve() for e in schema.get_extensions())

    def get(self, query: str, operation_name: str | None) -> Plan | None:
        key = (query, operation_name)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def learn(self, query: str, operation_name: str | None) -> None:
        """Build the plan of a document the general executor just ran without request errors."""
        key = (query, operation_name)
        if not self.enabled or key in self._plans:
            return
        try:
            plan: Plan | None = build_plan(self.schema, parse(query), operation_name)
        except Unsupported:
            plan = None
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)

    async def run(
        self, plan: Plan, context: Context, variables: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The response (data, errors) of one request, as the general executor would give it."""
        COMPILED_EXECUTIONS.inc()
        info = request_info(context.request.scope)  # what OperationName tells the log and metrics
        if info is not None:
            info.graphql_operation = plan.operation_name
            if plan.label is not None:
                info.operation = plan.label
        result = await _execute(self.schema, plan, context, variables)
        if result.errors:
            self.schema._process_errors(result.errors)
            return {"data": result.data, "errors": [e.formatted for e in result.errors]}
        return {"data": result.data}


def build_plan(schema: Any, document: DocumentNode, operation_name: str | None) -> Plan:
    """The plan of `operation_name` in `document`, or Unsupported."""
    graphql_schema = schema._schema
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation is OperationType.SUBSCRIPTION:
        raise Unsupported("only queries and mutations")
    if _has_directives(document):
        raise Unsupported("directives")
    fragments = {}
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            if definition.variable_definitions:
                raise Unsupported("fragment variables")
            fragments[definition.name.value] = FragmentDetails(definition)
    root_type = graphql_schema.get_root_type(operation.operation)
    grouped = collect_fields(
        graphql_schema, fragments, NO_VARIABLES, root_type, operation
    ).grouped_field_set
    if len(grouped) != 1:
        raise Unsupported("one root field")
    [(key, details)] = grouped.items()
    field = root_type.fields.get(details[0].node.name.value)
    resolver = strawberry_field(field)
    if resolver is None or resolver.base_resolver is None or resolver.extensions:
        raise Unsupported("a root field served by its own resolver")
    serializers = Serializers(graphql_schema, fragments, operation)
    assert field is not None  # a Strawberry field is a schema field
    return Plan(
        document=document,
        operation_name=operation_name,
        scopes=root_fields(document, operation_name),
        label=root_label(document, operation_name),
        root_type=root_type,
        key=key,
        details=details,
        field=field,
        resolver=resolver,
        arguments=call_arguments(schema, resolver),
        serialize=serializers.of(field.type, details),
    )


async def _execute(
    schema: Any, plan: Plan, context: Context, variables: dict[str, Any] | None
) -> ExecutionResult:
    """Scope check, variables, arguments, resolver and serializer, in the general path's order."""
    refused_by = refusal(principal_of(context.request), plan.scopes)
    if refused_by is not None:
        return ExecutionResult(None, [refused(context, refused_by)])
    # Built as graphql-core's execute builds it: the same variable coercion and messages, and
    # the resolve info the resolver gets.
    executor = Executor.build(
        schema._schema,
        plan.document,
        context_value=context,
        raw_variable_values=variables,
        operation_name=plan.operation_name,
        is_awaitable=optimized_is_awaitable,  # type: ignore[arg-type]  # as Strawberry passes it
    )
    if isinstance(executor, list):
        return ExecutionResult(None, executor)
    path = Path(None, plan.key, plan.root_type.name)
    info = executor.build_resolve_info(
        plan.field, [d.node for d in plan.details], plan.root_type, path
    )
    node = plan.details[0].node
    try:
        arguments = (
            get_argument_values(plan.field, node, executor.variable_values)
            if plan.field.args or node.arguments
            else {}
        )
        # What Strawberry's own resolver wrapper does: convert, then call the resolver.
        strawberry_info = schema.config.info_class(_raw_info=info, _field=plan.resolver)
        args, kwargs = plan.arguments(arguments, strawberry_info)
        result = await await_maybe(plan.resolver.get_result(None, strawberry_info, args, kwargs))
        try:
            data = plan.serialize(result)
        except Exception:
            data = await _complete(executor, plan, info, path, result)
    except Exception as raw_error:
        try:
            executor.handle_field_error(raw_error, plan.field.type, plan.details, path)
        except GraphQLError as error:  # a non-null root field: the whole data is null
            executor.collected_errors.add(error, None)
            return ExecutionResult(None, executor.collected_errors.errors)
        data = None
    return ExecutionResult({plan.key: data}, executor.collected_errors.errors or None)


async def _complete(executor: Executor[Any], plan: Plan, info: Any, path: Path, result: Any) -> Any:
    """graphql-core's own completion of the result, for what the serializer did not serve."""
    completed = executor.complete_value(plan.field.type, plan.details, info, path, result, None)
    if optimized_is_awaitable(completed):
        completed = await completed
    return completed


def _has_directives(document: DocumentNode) -> bool:
    class Finder(Visitor):
        found = False

        def enter_directive(self, *_: Any) -> Any:
            self.found = True
            return self.BREAK

    finder = Finder()
    visit(document, finder)
    return finder.found
