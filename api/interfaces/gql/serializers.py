"""Serializers of compiled plans: for one selection of fields, a function from the resolver's
result to plain data for orjson, built once per plan.

An object's serializer is generated Python source: one attribute read per selected field and
one dict display, with the common leaf values (strings, ids, 32-bit ints, booleans, enum
members, datetimes) checked by exact type and passed or converted inline. Any other value goes
through the field's own serializer, built from graphql-core's coercion. Anything unexpected (a
null for a non-null field, a value its scalar refuses) raises, and the plan lets graphql-core
complete the whole result instead."""

from __future__ import annotations

import keyword
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any

from graphql import (
    GraphQLBoolean,
    GraphQLEnumType,
    GraphQLField,
    GraphQLID,
    GraphQLInt,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLString,
    OperationDefinitionNode,
    Undefined,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
)
from graphql.execution.collect_fields import FieldDetailsList, FragmentDetails, collect_subfields
from graphql.execution.values import VariableValues
from strawberry.scalars import JSON
from strawberry.schema.types.base_scalars import isoformat
from strawberry.schema.types.scalar import DEFAULT_SCALAR_REGISTRY
from strawberry.types.field import StrawberryField

# Plain data for orjson, from one value of the resolver's result; raises on anything unexpected.
Serialize = Callable[[Any], Any]

# Fragments have no directives here (a plan is refused with any), so collecting fields at build
# time needs no variable values.
NO_VARIABLES = VariableValues({}, {})


class Unsupported(Exception):
    """The document has a shape plans do not take; the general executor keeps running it."""


class Unexpected(Exception):
    """A value the serializer does not serve as it is; graphql-core completes the result."""


def strawberry_field(field: GraphQLField | None) -> StrawberryField | None:
    found = None if field is None else field.extensions.get("strawberry-definition")
    return found if isinstance(found, StrawberryField) else None


class Serializers:
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
            return leaf(type_)
        if not isinstance(type_, GraphQLObjectType) or type_.is_type_of is not None:
            raise Unsupported("abstract types")
        return self._object(type_, details)

    def _object(self, type_: GraphQLObjectType, details: FieldDetailsList) -> Serialize:
        # graphql-core's own collection: the same response keys, order and merged nodes.
        grouped = collect_subfields(
            self.schema, self.fragments, NO_VARIABLES, self.operation, type_, details
        ).grouped_field_set
        source = _Source()
        reads: list[str] = []
        entries: list[str] = []
        for number, (key, sub_details) in enumerate(grouped.items()):
            name = sub_details[0].node.name.value
            if name == "__typename":
                entries.append(f"{key!r}: {type_.name!r}")
                continue
            field = type_.fields[name]
            definition = strawberry_field(field)
            if definition is None or not definition.is_basic_field:
                raise Unsupported(f"{type_.name}.{name} has its own resolver")
            # Strawberry serves a field without a resolver by getattr on its Python name.
            attribute = definition.python_name
            if not attribute.isidentifier() or keyword.iskeyword(attribute):
                raise Unsupported(f"{type_.name}.{name} is read by a name Python cannot spell")
            value = f"v{number}"
            reads.append(f"    {value} = value.{attribute}")
            entries.append(
                f"{key!r}: {source.inline(field.type, value, self.of(field.type, sub_details))}"
            )
        return source.function([*reads, "    return {" + ", ".join(entries) + "}"])


class _Source:
    """The text and the names of one generated serializer."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}

    def name(self, value: Any) -> str:
        name = f"n{len(self.names)}"
        self.names[name] = value
        return name

    def inline(self, type_: GraphQLOutputType, value: str, serialize: Serialize) -> str:
        """An expression serializing `value` of `type_`: inline for a common leaf value of the
        exact type graphql-core would pass or convert, else a call of `serialize`."""
        call = f"{self.name(serialize)}({value})"
        named = type_.of_type if isinstance(type_, GraphQLNonNull) else type_
        non_null = named is not type_
        fast = self._fast(named, value) if is_leaf_type(named) else []
        if not fast:
            return call
        expression = "(" + " ".join(f"{result} if {check} else" for check, result in fast)
        expression += f" {call})"
        # A null needs no call where it is allowed; where it is not, the call raises.
        return expression if non_null else f"(None if {value} is None else {expression})"

    def _fast(self, type_: Any, value: str) -> list[tuple[str, str]]:
        """(a check, the result when it holds) for values a leaf type serves unchanged or by one
        known conversion, in turn; none when every value takes the serializer."""
        coerce = type_.coerce_output_value
        if type_ is GraphQLID:  # graphql-core writes an int id as its digits
            return [(f"type({value}) is str", value), (f"type({value}) is int", f"str({value})")]
        if type_ in _UNCHANGED:
            return [(_UNCHANGED[type_].format(value), value)]
        if coerce is isoformat:  # Strawberry's DateTime, Date and Time
            return [(f"type({value}) is {self.name(datetime)}", f"{value}.isoformat()")]
        if coerce is _JSON_AS_IT_IS:  # any value but a null, which the call refuses
            return [(f"{value} is not None", value)]
        names = _enum_names(type_)
        if names is not None:
            cls, by_member = names
            # by name: a str's hash is cached, an Enum member's hash is a Python call
            by_name = {member.name: name for member, name in by_member.items()}
            found = f"({value}_name := {self.name(by_name)}.get({value}._name_))"
            return [(f"type({value}) is {self.name(cls)} and {found} is not None", f"{value}_name")]
        return []

    def function(self, body: list[str]) -> Serialize:
        text = "\n".join(
            ["def serialize(value):", "    if value is None:", "        return None", *body]
        )
        scope = dict(self.names)
        exec(text, scope)  # text built above from schema names and repr() keys
        generated: Serialize = scope["serialize"]
        return generated


# Built-in scalars give these values back as they are (a str for String and ID, a bool for
# Boolean, an int in 32 bits for Int): checked by exact type, they skip the coercion call.
_INT_RANGE = range(-(2**31), 2**31)
_UNCHANGED: dict[Any, str] = {
    GraphQLString: "type({0}) is str",
    GraphQLID: "type({0}) is str",
    GraphQLBoolean: "type({0}) is bool",
    GraphQLInt: f"type({{0}}) is int and {_INT_RANGE.start} <= {{0}} < {_INT_RANGE.stop}",
}
# The same checks as functions, for values not inlined (list items, through `leaf`).
_UNCHANGED_CHECKS: dict[Any, Callable[[Any], bool]] = {
    type_: eval(f"lambda value: {check.format('value')}")  # the constants above
    for type_, check in _UNCHANGED.items()
}

# Strawberry's JSON scalar gives every value back as it is.
_JSON_AS_IT_IS = DEFAULT_SCALAR_REGISTRY[JSON].serialize


def leaf(type_: Any) -> Serialize:
    """The serializer of a leaf type: graphql-core's coercion, with the common cases first."""
    coerce = type_.coerce_output_value
    unchanged = _UNCHANGED_CHECKS.get(type_)
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
            raise Unexpected(value)
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
            raise Unexpected("null for a non-null field")
        return serialized

    return serialize


def _list(inner: Serialize) -> Serialize:
    def serialize(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple):  # graphql-core takes any iterable; it decides
            raise Unexpected(value)
        return [inner(item) for item in value]

    return serialize
