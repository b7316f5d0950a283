"""Graceful shutdown: SIGTERM lets in-flight requests finish, closes subscriptions, exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets

from api.core.service import TaskService
from api.core.validation import task_spec
from tests.conftest import ServerProcess
from tests.ws import Subscriber

# Longer than the 10 s grace period: only answering waiting claims at shutdown lets it finish.
WAITING_CLAIM = """mutation { claimTask(workDirectory: "/idle", workerId: "w", waitSeconds: 60) {
  id } }"""
BOUND = 15.0  # the grace period (10 s) plus slack


async def wait_exit(server: ServerProcess) -> int:
    deadline = time.monotonic() + BOUND
    while (code := server.process.poll()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not exit within {BOUND}s of SIGTERM")
        await asyncio.sleep(0.05)
    return code


async def test_sigterm_finishes_in_flight_requests_closes_subscriptions_and_exits_0(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'stop.db'}")
    subscriber = await Subscriber.connect(server.ws_url)
    await subscriber.subscribe(dir="/watched")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        claim = asyncio.create_task(http.post("/graphql", json={"query": WAITING_CLAIM}))
        await asyncio.sleep(0.5)  # the claim is now waiting inside the server
        assert not claim.done()
        server.process.send_signal(signal.SIGTERM)
        response = await claim
        code = await wait_exit(server)
    assert response.status_code == 200
    assert response.json() == {"data": {"claimTask": None}}  # answered normally, not cut off
    with pytest.raises(websockets.ConnectionClosed) as closed:  # noqa: PT012 (a loop, not a call)
        while True:  # pings may arrive before the close frame
            await subscriber.message(timeout=BOUND)
    assert closed.value.rcvd is not None  # the server closed the socket with a close frame
    assert code == 0
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")], lines
    assert any("shutdown complete" in line["message"].lower() for line in lines)
    async with httpx.AsyncClient(base_url=server.url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/health")  # nothing listens any more


async def test_stop_waiting_answers_waiting_claims_and_later_claims_do_not_wait(
    service: TaskService,
) -> None:
    waiting = asyncio.create_task(service.claim("/idle", "w1", wait_seconds=60))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    service.stop_waiting()
    assert await asyncio.wait_for(waiting, 10) == []  # long before its 60 s
    later = await asyncio.wait_for(service.claim("/idle", "w2", wait_seconds=60), 10)
    assert later == []
    await service.submit(task_spec(work_directory="/idle", prompt="p"))
    (claimed,) = await service.claim("/idle", "w3", wait_seconds=60)  # work is still handed out
    assert claimed.worker_id == "w3"
