"""REST v1 against its own OpenAPI document: the schemathesis CLI with every check, on a real server.

The CLI (not its pytest plugin, which does not load on pytest 9) runs all its phases (examples,
coverage, fuzzing, stateful) and `--checks all`: not_a_server_error, status_code_conformance,
content_type_conformance, response_headers_conformance, response_schema_conformance,
negative_data_rejection, positive_data_acceptance, missing_required_header, unsupported_method,
allow_header_conformance, use_after_free, ensure_resource_availability, ignored_auth. It exits
non-zero on any failure, and this test prints its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def create_key(database_url: str, scopes: str) -> str:
    command = [sys.executable, "-m", "api.cli", "keys", "create", "--name", "schemathesis"]
    command += ["--scopes", scopes, "--database", database_url]
    return subprocess.run(command, capture_output=True, check=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def rest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    database_url = f"sqlite:///{tmp_path_factory.mktemp('schemathesis') / 'taskorch.db'}"
    key = create_key(database_url, "admin")  # a key exists: the server leaves protected mode
    env = {"TASKORCH_DURABILITY": "normal", "TASKORCH_RATE_LIMIT": "0"}
    server = ServerProcess(database_url, env)
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        for n in range(5):  # some tasks for the generated ids and claims to meet
            body = {"work_directory": "/repo", "prompt": f"task {n}"}
            httpx.post(f"{server.url}/api/v1/tasks", json=body, headers=headers).raise_for_status()
        yield server, key
    finally:
        server.stop()


def test_rest_v1_passes_every_schemathesis_check(
    rest_server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    server, key = rest_server
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
        "run",
        f"{server.url}/api/v1/openapi.json",
        "--checks", "all",
        "--header", f"Authorization: Bearer {key}",
        "--max-examples", "25",
        "--seed", "1",
        "--workers", "1",
        "--request-timeout", "10",
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600, check=False
    )
    report = run.stdout + run.stderr
    # Failing bodies can be megabytes long: keep each line of the report short.
    short = "\n".join(line[:300] for line in report.splitlines()[-400:])
    assert run.returncode == 0, short
    assert "19 selected" in run.stdout or "19 operations" in run.stdout, run.stdout[-3_000:]


def test_the_document_is_served_as_json(rest_server: tuple[ServerProcess, str]) -> None:
    server, key = rest_server
    document = httpx.get(
        f"{server.url}/api/v1/openapi.json", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
