"""GraphiQL from the package itself: its page and the vendored, versioned assets the page loads, so
the IDE works on networks without internet."""

from __future__ import annotations

from collections.abc import MutableMapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).parent
STATIC = HERE / "static"
# The page refers to its assets relative to /graphql, so this is where they must be served.
STATIC_PATH = "/graphiql/static"
GRAPHQL_PATH = "/graphql"


@cache
def graphiql_page() -> str:
    """The IDE's HTML: Strawberry's GraphiQL page with every CDN reference made local."""
    return (HERE / "graphiql.html").read_text(encoding="utf-8")


def graphiql_assets() -> Mount:
    """The route serving the page's scripts, stylesheets and their licences."""
    return Mount(STATIC_PATH, app=StaticFiles(directory=STATIC), name="graphiql-static")


def is_ide_request(scope: MutableMapping[str, Any]) -> bool:
    """A browser opening GraphiQL, or fetching its assets: public files, served without a key even
    once keys exist, since a browser cannot send one when it opens a page. The key goes in the
    page's headers editor, and every operation the page sends is checked as usual."""
    if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
        return False
    path = scope.get("path", "")
    if path.startswith(STATIC_PATH + "/"):
        return True
    if path != GRAPHQL_PATH or "query" in parse_qs(
        scope.get("query_string", b"").decode("latin-1")
    ):
        return False
    accept = next(
        (bytes(v).decode("latin-1") for k, v in scope.get("headers", ()) if k == b"accept"), ""
    )
    # The same test Strawberry's view uses to answer with the IDE instead of running an operation.
    return "text/html" in accept or "*/*" in accept
