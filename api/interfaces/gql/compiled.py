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

import operator
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from graphql import (
    DocumentNode,
    ExecutionResult,
    FragmentDefinitionNode,
    GraphQLBoolean,
    GraphQLEnumType,
    GraphQLError,
    GraphQLField,
    GraphQLID,
    GraphQLInt,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLString,
    OperationDefinitionNode,
    OperationType,
    Undefined,
    Visitor,
    get_operation_ast,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    parse,
    visit,
)
from graphql.execution.collect_fields import (
    FieldDetailsList,
    FragmentDetails,
    collect_fields,
    collect_subfields,
)
from graphql.execution.executor import Executor
from graphql.execution.values import VariableValues, get_argument_values
from graphql.pyutils import Path
from strawberry.execution import optimized_is_awaitable
from strawberry.types.field import StrawberryField
from strawberry.utils.await_maybe import await_maybe

from api.interfaces.gql.context import Context
from api.interfaces.gql.conversion import CallArguments, call_arguments
from api.interfaces.gql.security import refusal, refused, root_fields
from api.ops.logs import request_info
from api.ops.metrics import COMPILED_EXECUTIONS, root_label
from api.security.auth import principal_of

# Plain data for orjson, from one value of the resolver's result; raises on anything unexpected.
Serialize = Callable[[Any], Any]

# Fragments have no directives here (a plan is refused with any), so collecting fields at build
# time needs no variable values.
_NO_VARIABLES = VariableValues({}, {})


class Unsupported(Exception):
    """The document has a shape plans do not take; the general executor keeps running it."""


class _Unexpected(Exception):
    """A value the serializer does not serve as it is; graphql-core completes the result."""


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
        graphql_schema, fragments, _NO_VARIABLES, root_type, operation
    ).grouped_field_set
    if len(grouped) != 1:
        raise Unsupported("one root field")
    [(key, details)] = grouped.items()
    field = root_type.fields.get(details[0].node.name.value)
    resolver = _strawberry_field(field)
    if resolver is None or resolver.base_resolver is None or resolver.extensions:
        raise Unsupported("a root field served by its own resolver")
    serializers = _Serializers(graphql_schema, fragments, operation)
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


def _strawberry_field(field: GraphQLField | None) -> StrawberryField | None:
    found = None if field is None else field.extensions.get("strawberry-definition")
    return found if isinstance(found, StrawberryField) else None


def _has_directives(document: DocumentNode) -> bool:
    class Finder(Visitor):
        found = False

        def enter_directive(self, *_: Any) -> Any:
            self.found = True
            return self.BREAK

    finder = Finder()
    visit(document, finder)
    return finder.found


class _Serializers:
    """Builds the serializer of a type and the sub-selection its field nodes make."""

    def __init__(
        self,
        schema: Any,
        fragments: dict[str, FragmentDetails],
        operation: OperationDefinitionNode,
    ) -> None:
        self.schema = schema
        self.fragments = fragments
        self.operation = operation

    def of(self, type_: GraphQLOutputType, details: FieldDetailsList) -> Serialize:
        if is_non_null_type(type_):
            return _non_null(self.of(type_.of_type, details))
        if is_list_type(type_):
            return _list(self.of(type_.of_type, details))
        if is_leaf_type(type_):
            return _leaf(type_)
        if not isinstance(type_, GraphQLObjectType) or type_.is_type_of is not None:
            raise Unsupported("abstract types")
        return self._object(type_, details)

    def _object(self, type_: GraphQLObjectType, details: FieldDetailsList) -> Serialize:
        # graphql-core's own collection: the same response keys, order and merged nodes.
        grouped = collect_subfields(
            self.schema, self.fragments, _NO_VARIABLES, self.operation, type_, details
        ).grouped_field_set
        fields: list[tuple[str, Callable[[Any], Any], Serialize]] = []
        for key, sub_details in grouped.items():
            name = sub_details[0].node.name.value
            if name == "__typename":
                fields.append((key, _constant(type_.name), _same))
                continue
            field = type_.fields[name]
            definition = _strawberry_field(field)
            if definition is None or not definition.is_basic_field:
                raise Unsupported(f"{type_.name}.{name} has its own resolver")
            # Strawberry serves a field without a resolver by getattr on its Python name.
            read = operator.attrgetter(definition.python_name)
            fields.append((key, read, self.of(field.type, sub_details)))

        def serialize(value: Any) -> Any:
            if value is None:
                return None
            return {key: serialize_field(read(value)) for key, read, serialize_field in fields}

        return serialize


# Built-in scalars give these values back as they are (a str for String and ID, a bool for
# Boolean, an int in 32 bits for Int): checked by exact type, they skip the coercion call.
_INT_RANGE = range(-(2**31), 2**31)
_UNCHANGED: dict[Any, Callable[[Any], bool]] = {
    GraphQLString: lambda value: type(value) is str,
    GraphQLID: lambda value: type(value) is str,
    GraphQLBoolean: lambda value: type(value) is bool,
    GraphQLInt: lambda value: type(value) is int and value in _INT_RANGE,
}


def _leaf(type_: Any) -> Serialize:
    coerce = type_.coerce_output_value
    unchanged = _UNCHANGED.get(type_)
    names = _enum_names(type_)

    def serialize(value: Any) -> Any:
        if value is None:
            return None
        if unchanged is not None and unchanged(value):
            return value
        if names is not None and type(value) is names[0]:
            name = names[1].get(value)
            if name is not None:
                return name
        coerced = coerce(value)
        if coerced is None or coerced is Undefined:
            raise _Unexpected(value)
        return coerced

    return serialize


def _enum_names(type_: Any) -> tuple[type[Enum], dict[Any, str]] | None:
    """(the Python enum, member -> GraphQL name) of a Strawberry enum: the name its coercion
    finds by comparing the member's value with each of the enum's values in turn."""
    wrapped = getattr(type_, "wrapped_cls", None)
    if not isinstance(type_, GraphQLEnumType) or not (
        isinstance(wrapped, type) and issubclass(wrapped, Enum)
    ):
        return None
    names: dict[Any, str] = {}
    for member in wrapped:
        for name, value in type_.values.items():
            if member.value == value.value:
                names[member] = name
                break
    return wrapped, names


def _non_null(inner: Serialize) -> Serialize:
    def serialize(value: Any) -> Any:
        serialized = inner(value)
        if serialized is None:
            raise _Unexpected("null for a non-null field")
        return serialized

    return serialize


def _list(inner: Serialize) -> Serialize:
    def serialize(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple):  # graphql-core takes any iterable; it decides
            raise _Unexpected(value)
        return [inner(item) for item in value]

    return serialize


def _constant(value: str) -> Callable[[Any], str]:
    return lambda _: value


def _same(value: Any) -> Any:
    return value
