"""Operations: health, metrics, structured logs and configuration errors, on real servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import __version__
from api.ops.logs import JsonFormatter, TextFormatter
from api.settings import Settings
from tests.conftest import (
    POSTGRES_URL,
    REQUIRE_POSTGRES,
    GraphQLClient,
    ServerProcess,
    eventually,
    postgres_available,
    running_app,
)

SUBMIT = """mutation Submit($input: SubmitTaskInput!) { submitTask(input: $input) { id } }"""
CLAIM = """mutation Claim($dir: String!, $worker: String!, $lease: Int) {
  claimTask(workDirectory: $dir, workerId: $worker, leaseSeconds: $lease) { id } }"""
COMPLETE = """mutation Complete($id: ID!, $worker: String!) {
  completeTask(id: $id, workerId: $worker, result: {ok: true}) { status } }"""
FAIL = """mutation Fail($id: ID!, $worker: String!) {
  failTask(id: $id, workerId: $worker, error: "boom", retry: false) { status } }"""


def app_settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, durability="normal", lease_sweep_interval=0.2)


async def submit(gql: GraphQLClient, directory: str = "/ops") -> str:
    data = await gql.ok(SUBMIT, input={"workDirectory": directory, "prompt": "p"})
    task_id: str = data["submitTask"]["id"]
    return task_id


async def claim(gql: GraphQLClient, worker: str = "w1", lease: int = 60) -> str:
    data = await gql.ok(CLAIM, dir="/ops", worker=worker, lease=lease)
    task_id: str = data["claimTask"]["id"]
    return task_id


# --- health ---


async def test_health_reports_version_uptime_database_and_queue(database_url: str) -> None:
    opened = time.monotonic()
    async with running_app(app_settings(database_url)) as http:
        await check_health_reports(http, opened)


async def check_health_reports(app_http: httpx.AsyncClient, opened: float) -> None:
    """`opened`: a time.monotonic() taken before the app started."""
    serving = time.monotonic()  # the app is up: it started before this
    gql = GraphQLClient(app_http)
    for _ in range(3):
        await submit(gql)
    await claim(gql)

    async def counted() -> bool:
        body = (await app_http.get("/health")).json()
        return bool(body["queue"]["waiting"] == 2 and body["queue"]["working"] == 1)

    await eventually(counted)  # queue counts are cached for about a second
    asked = time.monotonic()
    response = await app_http.get("/health")
    answered = time.monotonic()
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"] == __version__
    # seconds since the app started, to the millisecond
    assert asked - serving - 0.0005 <= body["uptime_s"] <= answered - opened + 0.0005
    database = body["components"]["database"]
    assert database["status"] == "healthy"
    assert 0 < database["response_time_ms"] <= (answered - asked) * 1000 + 0.0005
    assert body["queue"] == {
        "blocked": 0,
        "waiting": 2,
        "working": 1,
        "in_review": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }


async def test_health_is_503_when_sqlite_connections_are_gone(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}", durability="normal")
    async with running_app(settings) as http:
        assert (await http.get("/health")).status_code == 200
        app = http._transport.app  # type: ignore[attr-defined]
        await app.state.service.store.close()  # the database connections are lost
        response = await http.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"
        assert body["components"]["database"]["status"] == "unhealthy"
        assert "queue" not in body


class Proxy:
    """A TCP proxy to PostgreSQL that the test can cut, like a network partition."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not postgres_available():
        if REQUIRE_POSTGRES:
            pytest.fail("PostgreSQL is required (TASKORCH_REQUIRE_POSTGRES) but is not reachable")
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    from tests.pg import fresh_schema_url

    with fresh_schema_url(POSTGRES_URL) as url:
        yield url


async def test_health_is_503_while_postgresql_is_unreachable_and_recovers(
    postgres_url: str,
) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy(parts.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    async with running_app(Settings(database_url=via_proxy)) as http:
        assert (await http.get("/health")).status_code == 200
        await proxy.cut()
        response = await http.get("/health")
        assert response.status_code == 503, response.text
        assert response.json()["components"]["database"]["status"] == "unhealthy"
        await proxy.start()  # the network is back, on the same port

        async def healthy() -> bool:
            return (await http.get("/health")).status_code == 200

        await eventually(healthy)
        await proxy.cut()


# --- metrics ---


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class Samples:
    def __init__(self, text: str) -> None:
        self.samples = scrape(text)

    def __call__(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.samples.get((name, tuple(sorted((labels or {}).items()))), 0.0)


async def metric_values(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Samples(response.text)


async def test_metrics_move_as_tasks_flow(database_url: str) -> None:
    async with running_app(app_settings(database_url)) as http:
        await check_metrics_move(http)


async def check_metrics_move(app_http: httpx.AsyncClient) -> None:
    gql = GraphQLClient(app_http)
    before = await metric_values(app_http)
    assert (await app_http.get("/health")).status_code == 200
    ids = [await submit(gql) for _ in range(4)]
    done, failed, expiring = await claim(gql), await claim(gql), await claim(gql, "w2", lease=1)
    await gql.ok(COMPLETE, id=done, worker="w1")
    await gql.ok(FAIL, id=failed, worker="w1")
    assert expiring in ids

    async def moved() -> bool:
        after = await metric_values(app_http)
        return after("lease_expiries_total") - before("lease_expiries_total") == 1 and (
            after("waiting_tasks") == 2
        )

    await eventually(moved)  # the lease sweep requeues the expired one; gauges refresh each second
    after = await metric_values(app_http)
    for name, delta in [
        ("task_created_total", 4),
        ("task_completed_total", 1),
        ("task_failed_total", 1),
        ("task_retried_total", 1),
    ]:
        assert after(name) - before(name) == delta, name
    assert after("active_tasks") == 0
    assert after("waiting_tasks") == 2
    assert after("tasks", {"status": "completed"}) == 1
    submits = {"operation": "graphql:submitTask"}
    count = "response_time_seconds_count"
    assert after(count, submits) - before(count, submits) == 4
    for operation, delta in [("graphql:completeTask", 1), ("GET /health", 1)]:
        labels = {"operation": operation}
        assert after(count, labels) - before(count, labels) == delta, operation
    assert "rate_limited_requests_total" in (await app_http.get("/metrics")).text


async def test_metrics_labels_do_not_take_the_clients_method(tmp_path: Path) -> None:
    async with running_app(app_settings(f"sqlite:///{tmp_path / 't.db'}")) as http:
        before = await metric_values(http)
        for method in ("FOO", "BREW", "FOO"):
            response = await http.request(method, "/api/v1/tasks")
            assert response.status_code == 405
        after = await metric_values(http)
    labels = {
        operation for (_, pairs) in after.samples for key, operation in pairs if key == "operation"
    }
    assert not [label for label in labels if "FOO" in label or "BREW" in label]
    count = "response_time_seconds_count"
    other = {"operation": "OTHER /api/v1/tasks"}
    assert after(count, other) - before(count, other) == 3


async def test_metrics_add_up_across_processes_in_multiprocess_mode(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    url = f"sqlite:///{tmp_path / 'multi.db'}"
    first, second = start_server(url, env), start_server(url, env)
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        gql = GraphQLClient(http)
        for _ in range(3):
            await submit(gql)
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        value = await metric_values(http)  # the other process did the work
        assert value("task_created_total") == 3
        assert value("response_time_seconds_count", {"operation": "graphql:submitTask"}) == 3

        async def gauge_seen() -> bool:
            return (await metric_values(http))("waiting_tasks") == 3

        await eventually(gauge_seen)


# --- logs ---


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = server.log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]  # every line must be JSON


async def test_each_request_is_one_json_line_with_its_request_id(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'logs.db'}", {"TASKORCH_LOG_FORMAT": "json"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        body = {
            "query": SUBMIT,
            "operationName": "Submit",
            "variables": {"input": {"workDirectory": "/ops", "prompt": "p"}},
        }
        given = await http.post("/graphql", json=body, headers={"X-Request-ID": "req-42"})
        round_trip_ms = given.elapsed.total_seconds() * 1000  # the server's part is within it
        assert given.headers["x-request-id"] == "req-42"
        generated = await http.get("/health")
        generated_id = generated.headers["x-request-id"]
        assert len(generated_id) == 32

    def access() -> list[dict[str, Any]]:
        return [line for line in log_lines(server) if line["logger"] == "taskorch.access"]

    await eventually(lambda: asyncio.sleep(0, len(access()) >= 2))
    lines = {line["request_id"]: line for line in access()}
    submit_line = lines["req-42"]
    assert submit_line["method"] == "POST"
    assert submit_line["path"] == "/graphql"
    assert submit_line["operation"] == "Submit"
    assert submit_line["status"] == 200
    assert 0 < submit_line["duration_ms"] <= round_trip_ms + 0.0005
    assert submit_line["client"].startswith("127.0.0.1:")
    assert submit_line["level"] == "INFO"
    assert "ts" in submit_line
    assert "prompt" not in json.dumps(submit_line)  # bodies are never logged
    health_line = lines[generated_id]
    assert health_line["path"] == "/health"
    assert "operation" not in health_line
    assert sum(1 for line in access() if line["request_id"] == "req-42") == 1
    assert not any(line["logger"] == "uvicorn.access" for line in log_lines(server))


def test_startup_says_where_every_interface_answers_and_how_to_create_a_key(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    database = f"sqlite:///{tmp_path / 'start.db'}"
    server = start_server(database, {"TASKORCH_LOG_FORMAT": "json"})
    messages = [line["message"] for line in log_lines(server)]
    listed = [m for m in messages if m.startswith("endpoints: ")]
    assert len(listed) == 1, messages  # once
    urls = dict(
        entry.split(" http://", 1) for entry in listed[0].removeprefix("endpoints: ").split("; ")
    )
    assert set(urls) == {"GraphQL and GraphiQL", "MCP", "REST", "health", "metrics"}
    assert urls["REST"] == f"{server.url[7:]}/api/v1 (OpenAPI: {server.url}/api/v1/openapi.json)"
    for name, path, method in (
        ("GraphQL and GraphiQL", "/graphql", "GET"),
        ("health", "/health", "GET"),
        ("metrics", "/metrics", "GET"),
        ("MCP", "/mcp", "POST"),
    ):
        assert f"http://{urls[name]}" == f"{server.url}{path}"
        answer = httpx.request(method, f"{server.url}{path}", params={"query": "{ __typename }"})
        assert answer.status_code != 404, (name, answer.status_code)
    assert httpx.get(f"{server.url}/api/v1/openapi.json").status_code == 200

    # The protected-mode hint is a command that works when pasted into a shell, here, as it is.
    (hint,) = [m for m in messages if "Create a key with: " in m]
    pasted = hint.split("Create a key with: ", 1)[1].replace("NAME", "first")
    assert not pasted.startswith("taskorch ") or shutil.which("taskorch"), pasted
    created = subprocess.run(pasted, shell=True, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, (pasted, created.stderr)
    assert created.stdout.strip().startswith("tko_")


def record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    entry = logging.LogRecord("taskorch.test", logging.WARNING, __file__, 1, message, args, None)
    entry.__dict__.update(extra)
    return entry


def test_log_formatters_redact_secrets() -> None:
    entry = record(
        "auth %s for %s",
        "Bearer tko_live_abcdef123",
        "postgresql://admin:hunter2@db:5432/taskorch",
        api_key="tko_other",
        headers={"authorization": "Bearer xyz", "accept": "json"},
    )
    line = json.loads(JsonFormatter().format(entry))
    text = json.dumps(line)
    for secret in ("tko_live_abcdef123", "hunter2", "tko_other", "xyz"):
        assert secret not in text
    assert line["headers"]["accept"] == "json"
    assert line["level"] == "WARNING"
    assert "admin:[REDACTED]@db" in line["message"]
    human = TextFormatter().format(entry)
    assert "WARNING" in human
    assert "hunter2" not in human
    assert "tko_other" not in human


def test_redactor_masks_keys_but_not_the_placeholder_in_our_own_hints() -> None:
    hint = "missing API key: send the header 'Authorization: Bearer KEY'"
    for message in (hint, 'headers: {"Authorization": "Bearer YOUR_KEY"}'):
        assert json.loads(JsonFormatter().format(record(message)))["message"] == message
        assert TextFormatter().format(record(message)).endswith(message)
    for secret in ("KEYS123", "key", "KEY.abc", "tko_KEY", "eyJhbGciOi.KEY"):
        line = json.loads(JsonFormatter().format(record("Authorization: Bearer %s", secret)))
        assert line["message"] == "Authorization: Bearer [REDACTED]", secret


# --- configuration ---


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKORCH_PORT", "eighty"),
        ("TASKORCH_RETENTION", "forever"),
        ("TASKORCH_LOG_FORMAT", "xml"),
        ("TASKORCH_SHUTDOWN_TIMEOUT", "0"),
    ],
)
def test_serve_exits_non_zero_naming_a_bad_setting(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--database", f"sqlite:///{tmp_path / 'x.db'}"],
        env={**os.environ, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert variable in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.db").exists()  # refused before touching anything


async def test_response_time_labels_are_route_templates_never_raw_paths(tmp_path: Path) -> None:
    from api.interfaces.rest import PREFIX

    async with running_app(app_settings(f"sqlite:///{tmp_path / 'labels.db'}")) as http:
        before = scrape((await http.get("/metrics")).text)
        created = await http.post(f"{PREFIX}/tasks", json={"work_directory": "/l", "prompt": "p"})
        assert created.status_code == 201
        task_id = created.json()["data"]["id"]
        assert (await http.get(f"{PREFIX}/tasks/{task_id}")).status_code == 200
        await http.get(f"/no/such/{task_id}")
        await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        text = (await http.get("/metrics")).text
    value = scrape(text)
    count = "response_time_seconds_count"
    for operation in (f"GET {PREFIX}/tasks/{{id}}", f"POST {PREFIX}/tasks"):
        key = (count, (("operation", operation),))
        assert value[key] - before.get(key, 0) == 1
    assert (count, (("operation", "mcp"),)) in value
    assert (count, (("operation", "unmatched"),)) in value
    assert task_id not in text


@pytest.mark.parametrize(("fmt", "is_json"), [("json", True), ("text", False)])
def test_log_level_and_format_apply_to_every_logger(fmt: str, is_json: bool) -> None:
    script = (
        f"import logging; from api.ops import logs; logs.configure('WARNING', {fmt!r});"
        "logging.getLogger('taskorch.x').info('hidden');"
        "logging.getLogger('uvicorn.error').warning('from uvicorn');"
        "logging.getLogger('taskorch.x').error('shown', extra={'task_id': 't1'})"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert "hidden" not in result.stderr, result.stderr
    if is_json:
        first, second = (json.loads(line) for line in lines)
        assert first["logger"] == "uvicorn.error"
        assert first["level"] == "WARNING"
        assert second["message"] == "shown"
        assert second["task_id"] == "t1"
    else:
        assert lines[1].endswith("shown task_id=t1")
        assert "ERROR" in lines[1]
