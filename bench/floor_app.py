"""The floor: a bare Starlette JSON route and a bare Strawberry mutation with no database work, served
by uvicorn exactly as `taskorch serve` serves the real app (loop=asyncio, the same GraphQL caches)."""

from __future__ import annotations

import argparse
import uuid

import strawberry
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from strawberry.asgi import GraphQL
from strawberry.extensions import ParserCache, ValidationCache


@strawberry.input
class SubmitTaskInput:
    work_directory: str
    prompt: str


@strawberry.type
class Task:
    id: strawberry.ID
    work_directory: str
    prompt: str


@strawberry.type
class Query:
    @strawberry.field
    def hello(self) -> str:
        return "hello"


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def submit_task(self, input: SubmitTaskInput) -> Task:
        # Shaped like taskorch's submitTask (an input object in, a task out) so the difference
        # between the two is what taskorch does beyond GraphQL itself.
        return Task(
            id=strawberry.ID(str(uuid.uuid4())),
            work_directory=input.work_directory,
            prompt=input.prompt,
        )


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def create_app() -> Starlette:
    schema = strawberry.Schema(
        query=Query, mutation=Mutation, extensions=[ParserCache, ValidationCache]
    )
    return Starlette(
        routes=[
            Route("/json", hello, methods=["GET"]),
            Route("/health", hello, methods=["GET"]),
            Route("/graphql", GraphQL(schema, graphql_ide=None), methods=["GET", "POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same uvicorn settings as api.cli.main.cmd_serve.
    uvicorn.Server(
        uvicorn.Config(
            create_app(),
            host=args.host,
            port=args.port,
            loop="asyncio",
            log_config=None,
            log_level="warning",
            access_log=False,
        )
    ).run()


if __name__ == "__main__":
    main()
