"""GraphiQL from the package itself: its page and the vendored, versioned assets the page loads, so
the IDE works on networks without internet."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).parent
STATIC = HERE / "static"
# The page refers to its assets relative to /graphql, so this is where they must be served.
STATIC_PATH = "/graphiql/static"


@cache
def graphiql_page() -> str:
    """The IDE's HTML: Strawberry's GraphiQL page with every CDN reference made local."""
    return (HERE / "graphiql.html").read_text(encoding="utf-8")


def graphiql_assets() -> Mount:
    """The route serving the page's scripts, stylesheets and their licences."""
    return Mount(STATIC_PATH, app=StaticFiles(directory=STATIC), name="graphiql-static")
