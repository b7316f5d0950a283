"""Strawberry's conversion of coerced GraphQL arguments to a resolver's arguments (input classes,
Python names, `info`), compiled once per root field for compiled plans.

The steps are those of `strawberry.types.arguments.convert_argument` and
`strawberry.schema.schema_converter.get_arguments`, with every decision that depends on the type
alone taken when the plan is built instead of for every value of every request: converting the
1,000 inputs of a `submitTasks` that way took 70 % of the request. A type whose conversion is
decided by the value or by code of its own (`Maybe`, lazy types, `GlobalID`, inputs with
`from_input`) keeps Strawberry's own conversion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

from strawberry.relay.types import GlobalID
from strawberry.schema.schema_converter import get_arguments
from strawberry.types.arguments import _is_leaf_type, _is_optional_leaf_type
from strawberry.types.base import (
    StrawberryList,
    StrawberryMaybe,
    StrawberryOptional,
    has_object_definition,
)
from strawberry.types.enum import has_enum_definition
from strawberry.types.field import StrawberryField
from strawberry.types.lazy_type import LazyType
from strawberry.types.unset import UNSET

Convert = Callable[[Any], Any]
# (coerced GraphQL arguments, the Strawberry info) -> the resolver's positional and keyword arguments
CallArguments = Callable[[dict[str, Any], Any], tuple[list[Any], dict[str, Any]]]


class _Dynamic(Exception):
    """The conversion of this type is decided per value: Strawberry's own conversion runs."""


def call_arguments(schema: Any, field: StrawberryField) -> CallArguments:
    """How a root field's coerced arguments become its resolver's arguments (the source is None)."""
    config, registry = schema.config, schema.schema_converter.scalar_registry
    try:
        converters = [
            (config.name_converter.from_argument(a), a.python_name, _converter(a.type, schema))
            for a in field.arguments
        ]
    except _Dynamic:

        def generic(values: dict[str, Any], info: Any) -> tuple[list[Any], dict[str, Any]]:
            return get_arguments(
                field=field,
                source=None,
                info=info,
                kwargs=values,
                config=config,
                scalar_registry=registry,
            )

        return generic
    resolver = field.base_resolver
    assert resolver is not None  # plans take only root fields with a resolver
    # get_arguments passes the source (None at the root) to these parameters, and info to its own.
    takes_self = resolver.self_parameter is not None
    sources = [p.name for p in (resolver.parent_parameter, resolver.root_parameter) if p]
    info_name = resolver.info_parameter.name if resolver.info_parameter else None

    def compiled(values: dict[str, Any], info: Any) -> tuple[list[Any], dict[str, Any]]:
        kwargs = {
            python: convert(values[name]) for name, python, convert in converters if name in values
        }
        for name in sources:
            kwargs[name] = None
        if info_name is not None:
            kwargs[info_name] = info
        return ([None] if takes_self else []), kwargs

    return compiled


def _converter(type_: Any, schema: Any) -> Convert:
    """convert_argument for one type, its branches taken in the same order."""
    registry = schema.schema_converter.scalar_registry
    if isinstance(type_, StrawberryMaybe):
        raise _Dynamic
    if isinstance(type_, StrawberryOptional):
        return _converter(type_.of_type, schema)  # each converter passes None on
    if isinstance(type_, StrawberryList):
        item = type_.of_type
        if _is_leaf_type(item, registry, skip_classes=(GlobalID,)) or _is_optional_leaf_type(
            item, registry, skip_classes=(GlobalID,)
        ):
            # copied: graphql-core hands every request the same default list
            return lambda value: value if value is None or value is UNSET else list(value)
        convert_item = _converter(item, schema)
        return lambda value: (
            value if value is None or value is UNSET else [convert_item(v) for v in value]
        )
    if _is_leaf_type(type_, registry):
        if type_ is GlobalID:
            raise _Dynamic
        return _same
    if isinstance(type_, LazyType):
        raise _Dynamic
    if has_enum_definition(type_):
        return _same  # graphql-core already gave the enum member
    if has_object_definition(type_):
        return _input(type_, schema)
    raise _Dynamic


def _input(type_: Any, schema: Any) -> Convert:
    definition = type_.__strawberry_definition__
    if definition.from_input is not None:
        raise _Dynamic
    # An input's nullable fields without a default are None unless given (graphql-core has
    # checked that the required ones are given).
    implicit = (
        {
            f.python_name: None
            for f in definition.fields
            if f.default_value is MISSING and f.default_factory is MISSING
        }
        if definition.is_input
        else {}
    )
    name_of = schema.config.name_converter.from_field
    fields = [
        (
            name_of(f),
            f.python_name,
            _converter(f.resolve_type(type_definition=definition), schema),
        )
        for f in definition.fields
    ]

    def convert(value: Any) -> Any:
        if value is None or value is UNSET:
            return value
        kwargs = dict(implicit)
        for name, python, convert_field in fields:
            if name in value:
                kwargs[python] = convert_field(value[name])
        return type_(**kwargs)

    return convert


def _same(value: Any) -> Any:
    return value
