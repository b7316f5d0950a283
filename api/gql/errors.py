"""Every GraphQL error leaves with an `extensions.code`; unexpected ones are logged and masked."""

from __future__ import annotations

import logging
import re

from graphql import GraphQLError

from api.errors import TaskorchError

log = logging.getLogger("taskorch.graphql")

INTERNAL_MESSAGE = (
    "internal error: the server logged the details; try again or contact the operator"
)

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
        return  # graphql-core already copied its extensions (code, field)
    if original is None or error.path is None:
        # The document or its variables are wrong: a client error, never a server one.
        if "code" not in (error.extensions or {}):
            extensions: dict[str, object] = {"code": "VALIDATION_ERROR"}
            field = _field(error.message)
            if field:
                extensions["field"] = field
            error.extensions = extensions
        return
    log.error("unexpected error in %s", ".".join(map(str, error.path)), exc_info=original)
    error.message = INTERNAL_MESSAGE
    error.extensions = {"code": "INTERNAL_ERROR"}
    error.original_error = None
