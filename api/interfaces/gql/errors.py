"""Every GraphQL error leaves with an `extensions.code`; unexpected ones are logged and masked."""

from __future__ import annotations

import logging
import re

from graphql import GraphQLError
from strawberry.utils.str_converters import to_camel_case

from api.core.errors import TaskorchError, ValidationError, internal_error

log = logging.getLogger("taskorch.graphql")

# graphql-core names the offending variable, path or argument in its message; pull it out for `field`.
_AT_PATH = re.compile(r"Variable '\$(\w+)' has invalid value at ([^:\s]+)")
_NAMED = re.compile(r"(?:[Vv]ariable '\$|[Aa]rgument '|[Ff]ield ')(\w+)'")


def _field(message: str) -> str | None:
    found = _AT_PATH.search(message)
    if found:
        variable, path = found.groups()
        # `.priority` inside an input object names the field; `[3].prompt` a list item of the variable
        return path.lstrip(".") if path.startswith(".") else variable + path
    named = _NAMED.search(message)
    return named.group(1) if named else None


def classify(error: GraphQLError) -> None:
    """Give `error` its code, in place; mask and log it when it is not the client's doing."""
    original = error.original_error
    if isinstance(original, TaskorchError):
        _graphql_names(error, original)  # graphql-core already copied its extensions (code, field)
        return
    if original is None or error.path is None:
        # The document or its variables are wrong: a client error, never a server one.
        if "code" not in (error.extensions or {}):
            extensions: dict[str, object] = {"code": ValidationError.code}
            field = _field(error.message)
            if field:
                extensions["field"] = field
            error.extensions = extensions
        return
    log.error("unexpected error in %s", ".".join(map(str, error.path)), exc_info=original)
    masked = internal_error()
    error.message = masked.message
    error.extensions = masked.extensions
    error.original_error = None


def _graphql_names(error: GraphQLError, original: TaskorchError) -> None:
    """The domain names fields in snake_case (`inputs[3].work_directory`); GraphQL clients see them
    as the schema spells them (`inputs[3].workDirectory`), in `extensions.field` and the message."""
    field = original.details.get("field")
    if not isinstance(field, str):
        return
    name = to_camel_case(field)
    if name != field:
        error.message = original.message.replace(field, name)
        error.extensions = {**(error.extensions or {}), "field": name}
