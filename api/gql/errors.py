"""Every GraphQL error leaves with an `extensions.code`; unexpected ones are logged and masked."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension

from api.errors import TaskorchError

log = logging.getLogger("taskorch.graphql")

INTERNAL_MESSAGE = "internal error: the server logged the details; try again or contact the operator"

# graphql-core names the offending variable or argument in its message; pull it out for `field`.
_FIELD = re.compile(r"""(?:at '[^']*?\.?([A-Za-z_][\w]*)'|[Aa]rgument '([A-Za-z_]\w*)'|"""
                    r"""[Vv]ariable '\$([A-Za-z_]\w*)'|[Ff]ield '([A-Za-z_]\w*)')""")


def classify(error: GraphQLError) -> GraphQLError:
    original = error.original_error
    if isinstance(original, TaskorchError):
        return error  # graphql-core already copied its extensions (code, field)
    if original is None or error.path is None:
        # The document or its variables are wrong: a client error, never a server one.
        if "code" not in (error.extensions or {}):
            extensions: dict[str, object] = {"code": "VALIDATION_ERROR"}
            found = _FIELD.search(error.message)
            if found:
                extensions["field"] = next(g for g in found.groups() if g)
            error.extensions = extensions
        return error
    log.error("unexpected error in %s", ".".join(map(str, error.path)), exc_info=original)
    return GraphQLError(
        INTERNAL_MESSAGE,
        nodes=error.nodes,
        path=error.path,
        extensions={"code": "INTERNAL_ERROR"},
    )


class ErrorCodes(SchemaExtension):
    def on_operation(self) -> Iterator[None]:
        yield
        result = self.execution_context.result
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = [classify(e) for e in errors]  # type: ignore[union-attr]
