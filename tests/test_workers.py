"""`taskorch serve --workers 2` on one port, on each backend: both processes answer, events and
claims cross between them, /metrics adds them up, and SIGTERM stops them all with exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from api.cli.main import main
from tests.conftest import GraphQLClient, ServerProcess, eventually
from tests.ws import Subscriber

SUBMIT = 'mutation($dir: String!) { submitTask(input: {workDirectory: $dir, prompt: "p"}) { id } }'
SUBMIT_MANY = "mutation($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
CLAIM = (
    "mutation($dir: String!, $w: String!) { claimTask(workDirectory: $dir, workerId: $w) { id } }"
)
TASKS = 60
CONNECTIONS = 12
WORKERS = 2  # every test here starts `serve --workers 2`
ENV = {"TASKORCH_RATE_LIMIT": "0", "TASKORCH_LOG_LEVEL": "WARNING"}


@contextlib.asynccontextmanager
async def pinned_clients(url: str, count: int) -> AsyncIterator[list[tuple[int, GraphQLClient]]]:
    """At least `count` clients of one keep-alive connection each, so each talks to one worker: its
    pid. The server answers as soon as its first worker listens, so connections are opened (up to
    a bound) until every one of the `WORKERS` has answered one; the kernel then spreads them."""
    limits = httpx.Limits(max_connections=1, keepalive_expiry=30)
    async with contextlib.AsyncExitStack() as stack:
        pinned: list[tuple[int, GraphQLClient]] = []
        deadline = time.monotonic() + 30
        while len(pinned) < count or (
            len({pid for pid, _ in pinned}) < WORKERS and time.monotonic() < deadline
        ):
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
            )
            pid = (await http.get("/health")).json()["pid"]
            pinned.append((pid, GraphQLClient(http)))
            if len(pinned) >= count:
                await asyncio.sleep(0.1)  # a worker still starting
        yield pinned


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_the_port_events_and_claims(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(database_url, ENV, "--workers", "2")
    async with pinned_clients(server.url, CONNECTIONS) as clients:
        by_pid = dict(clients)
        assert len(by_pid) == 2, "both workers answer on the one port"
        (pid_a, a), (pid_b, b) = by_pid.items()

        # A subscriber (wherever it landed) sees the submits handled by each worker.
        subscriber = await Subscriber.connect(server.ws_url)
        try:
            await subscriber.subscribe(dir="/watched", after="0")
            submitted = {
                (await a.ok(SUBMIT, dir="/watched"))["submitTask"]["id"],
                (await b.ok(SUBMIT, dir="/watched"))["submitTask"]["id"],
            }
            seen = {event["taskId"] for event in await subscriber.events(2)}
            assert seen == submitted
        finally:
            await subscriber.close()

        # Claims through both workers at once: every task once, none twice.
        inputs = [{"workDirectory": "/work", "prompt": f"t{i}"} for i in range(TASKS)]
        await a.ok(SUBMIT_MANY, inputs=inputs)

        async def claim_all(index: int, client: GraphQLClient) -> list[str]:
            ids = []
            while task := (await client.ok(CLAIM, dir="/work", w=f"w{index}"))["claimTask"]:
                ids.append(task["id"])
            return ids

        claims = await asyncio.gather(*(claim_all(i, c) for i, (_, c) in enumerate(clients)))
        every = [task_id for ids in claims for task_id in ids]
        assert len(every) == TASKS
        assert len(set(every)) == TASKS
        claimed_by = {pid for (pid, _), ids in zip(clients, claims, strict=True) if ids}
        assert claimed_by == {pid_a, pid_b}

        # Any worker's /metrics counts what every worker committed.
        for _, client in clients[:4]:
            text = (await client.http.get("/metrics")).text
            assert re.search(rf"^task_created_total {TASKS + 2}\.0$", text, re.M), text

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert gone(pid_a)
    assert gone(pid_b)


def test_a_bad_worker_count_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    assert main(["serve", "--workers", "0", "--database", url]) == 2
    assert "workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--workers", "many", "--database", url])
    assert "--workers" in capsys.readouterr().err


async def test_sigterm_drains_every_worker(
    database_url: str, start_server: Callable[..., ServerProcess]
) -> None:
    """A claim waiting for work on each worker is answered (null) and each worker exits cleanly."""
    server = start_server(database_url, ENV, "--workers", "2")
    wait_claim = (
        'mutation { claimTask(workDirectory: "/none", workerId: "w", waitSeconds: 30) { id } }'
    )
    async with pinned_clients(server.url, CONNECTIONS) as clients:
        by_pid = dict(clients)
        assert len(by_pid) == 2
        waiting = [asyncio.ensure_future(c.ok(wait_claim)) for c in by_pid.values()]
        await asyncio.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 20)
        assert [answer["claimTask"] for answer in answers] == [None, None]
    assert await asyncio.to_thread(server.process.wait, 30) == 0

    async def all_gone() -> bool:
        return all(gone(pid) for pid in by_pid)

    await eventually(all_gone, timeout=5)


async def test_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'w.db'}", ENV, "--workers", "2")
    async with pinned_clients(server.url, CONNECTIONS) as clients:
        pids = {pid for pid, _ in clients}
    assert len(pids) == 2
    server.process.kill()  # SIGKILL: the supervisor cannot pass anything on
    server.process.wait(10)

    async def all_gone() -> bool:
        return all(gone(pid) for pid in pids)

    await eventually(all_gone, timeout=20)


def test_a_second_set_of_workers_on_a_taken_port_is_refused(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first = start_server(url, ENV, "--workers", "2")
    second = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--workers", "2", "--port", str(first.port),
         "--database", url],
        capture_output=True, text=True, timeout=30, env={**os.environ, **ENV},
    )  # fmt: skip
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
