"""Shared fixtures: real databases (a SQLite file; PostgreSQL when reachable), the app in-process over
ASGI, and a real `taskorch serve` process for what crosses the network."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.core.domain import Backoff, TaskSpec
from api.core.service import TaskService
from api.events.bus import LocalBus
from api.settings import Settings
from api.store import open_store
from api.store.base import TaskStore

POSTGRES_URL = os.environ.get(
    "TASKORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("TASKORCH_REQUIRE_POSTGRES", "") not in ("", "0", "false")


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def backends() -> list[str]:
    names = ["sqlite"]
    try:
        import api.store.postgres  # noqa: F401
    except ImportError:
        return names
    return [*names, "postgres"]


@pytest.fixture(params=backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'taskorch.db'}"
        return
    if not postgres_available():
        if REQUIRE_POSTGRES:
            pytest.fail(
                "PostgreSQL is required (TASKORCH_REQUIRE_POSTGRES) but 127.0.0.1:5432 is closed"
            )
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    from tests.pg import fresh_schema_url

    with fresh_schema_url(POSTGRES_URL) as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL, for what only PostgreSQL does (replicas, NOTIFY)."""
    if not postgres_available():
        if REQUIRE_POSTGRES:
            pytest.fail(
                "PostgreSQL is required (TASKORCH_REQUIRE_POSTGRES) but 127.0.0.1:5432 is closed"
            )
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    from tests.pg import fresh_schema_url

    with fresh_schema_url(POSTGRES_URL) as url:
        yield url


class FakeClock:
    """Injected time: tests move it past a lease instead of sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TaskStore]:
    store = open_store(Settings(database_url=database_url, durability="normal"))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def service(store: TaskStore, clock: FakeClock) -> AsyncIterator[TaskService]:
    bus = LocalBus()
    store.listen(bus.dispatch)
    await bus.start()
    service = TaskService(store, bus, clock=clock, backoff=Backoff(1.0, 300.0), jitter=lambda: 1.0)
    yield service
    await bus.stop()
    await service.drain()


@pytest.fixture
def submit_task(service: TaskService) -> Callable[..., Awaitable[Any]]:
    async def submit(**fields: Any) -> Any:
        fields.setdefault("work_directory", "/repo")
        fields.setdefault("prompt", "fix the bug")
        from api.core.validation import task_spec

        spec: TaskSpec = task_spec(**fields)
        return await service.submit(spec)

    return submit


class GraphQLClient:
    """Posts GraphQL to an app or server; `ok` asserts there were no errors."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables})
        assert response.status_code in (200, 400), response.text
        body: dict[str, Any] = response.json()
        return body

    async def ok(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self(query, **variables)
        assert not body.get("errors"), body["errors"]
        data: dict[str, Any] = body["data"]
        return data

    async def error(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self(query, **variables)
        assert body.get("errors"), body
        error: dict[str, Any] = body["errors"][0]
        return error


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.fixture
async def gql(database_url: str) -> AsyncIterator[GraphQLClient]:
    """The app in-process over ASGI on a fresh database of each backend."""
    settings = Settings(database_url=database_url, durability="normal", lease_sweep_interval=0.2)
    async with running_app(settings) as http:
        yield GraphQLClient(http)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, database_url: str, env: dict[str, str] | None = None, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/graphql"
        self.log = Path(f"/tmp/taskorch-test-{uuid.uuid4().hex[:8]}.log")
        command = [
            sys.executable, "-m", "api.cli", "serve", "--port", str(self.port),
            "--database", database_url, *args,
        ]  # fmt: skip
        full_env = {**os.environ, "TASKORCH_LEASE_SWEEP_INTERVAL": "0.2", **(env or {})}
        self._out = self.log.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, env=full_env
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        self.log.unlink(missing_ok=True)


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def start(database_url: str, env: dict[str, str] | None = None, *args: str) -> ServerProcess:
        server = ServerProcess(database_url, env, *args)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(database_url: str, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A real `taskorch serve` process on a fresh database of each backend."""
    return start_server(database_url)


@pytest.fixture
async def remote(server: ServerProcess) -> AsyncIterator[GraphQLClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield GraphQLClient(http)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
