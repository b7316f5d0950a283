"""Fan-out: many graphql-transport-ws subscribers on `taskEvents`; from a status change (a submit
sent) to the last subscriber receiving its event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import websockets
from websockets.typing import Subprotocol

from bench.http import Connection, connection_init_payload
from bench.stats import summary

if TYPE_CHECKING:
    from bench.loadgen import Run

ROUND_TIMEOUT = 10.0
LIVE_TIMEOUT = 60.0
_ID = re.compile(rb'"id":"([0-9a-f-]{36})"')


class Deliveries:
    """Arrival times of each task's event over all subscribers, and which subscribers are live."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.complete: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.live: set[int] = set()
        self.all_live = asyncio.Event()

    def receive(self, index: int, task_id: str) -> None:
        times = self.arrivals[task_id]
        times.append(time.perf_counter())
        if len(times) >= self.subscribers:
            self.complete[task_id].set()
        if index not in self.live:
            self.live.add(index)
            if len(self.live) >= self.subscribers:
                self.all_live.set()


async def _subscriber(url: str, query: str, directory: str, ready: list[Any]) -> None:
    socket = await websockets.connect(
        url,
        subprotocols=[Subprotocol("graphql-transport-ws")],
        max_queue=None,
        ping_interval=None,
    )
    init = {"type": "connection_init", "payload": connection_init_payload()}
    await socket.send(json.dumps(init))
    ack = json.loads(await asyncio.wait_for(socket.recv(), 30))
    if ack.get("type") != "connection_ack":
        raise RuntimeError(f"subscriber was refused: {ack}")
    payload = {"query": query, "variables": {"dir": directory}}
    await socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
    ready.append(socket)


async def _listen(socket: Any, index: int, deliveries: Deliveries) -> None:
    try:
        async for raw in socket:
            message = json.loads(raw)
            if message.get("type") == "next":
                deliveries.receive(index, message["payload"]["data"]["taskEvents"]["taskId"])
            elif message.get("type") == "ping":
                await socket.send(json.dumps({"type": "pong"}))
    except websockets.ConnectionClosed:
        pass


async def measure_fanout(
    run: Run, events_query: str, submit_query: str, prompt: str
) -> dict[str, Any]:
    count = run.params.get("subscribers", 1000)
    directory = "/bench/fanout"
    url = run.urls[0].replace("http://", "ws://") + "/graphql"
    sockets: list[Any] = []
    connecting = time.perf_counter()
    for start in range(0, count, 50):  # connect in waves so the listen backlog never overflows
        wave = range(start, min(count, start + 50))
        await asyncio.gather(*(_subscriber(url, events_query, directory, sockets) for _ in wave))
    connect_seconds = time.perf_counter() - connecting
    deliveries = Deliveries(count)
    listeners = [asyncio.ensure_future(_listen(s, i, deliveries)) for i, s in enumerate(sockets)]
    http = Connection(run.urls[0])
    submit = run.raw(submit_query, {"input": {"workDirectory": directory, "prompt": prompt}})
    last: list[float] = []
    every: list[float] = []
    missed = 0
    rounds = run.params.get("rounds", 50)
    started = time.perf_counter()
    try:
        # A subscription is live once the server has processed its subscribe message, which the
        # protocol does not acknowledge: submit until every subscriber has seen an event.
        live_by = started + LIVE_TIMEOUT
        while not deliveries.all_live.is_set() and time.perf_counter() < live_by:
            await http.send(submit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deliveries.all_live.wait(), 0.5)
        if not deliveries.all_live.is_set():
            raise RuntimeError(f"only {len(deliveries.live)} of {count} subscriptions went live")
        await asyncio.sleep(0.5)  # let the warm-up events drain
        deliveries.arrivals.clear()
        started = time.perf_counter()
        deadline = started + run.duration
        while time.perf_counter() < deadline and len(last) < rounds:
            sent = time.perf_counter()
            _, body = await http.send(submit)
            found = _ID.search(body)
            if found is None:
                raise RuntimeError(f"submit failed: {body[:300]!r}")
            task_id = found.group(1).decode()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deliveries.complete[task_id].wait(), ROUND_TIMEOUT)
            times = deliveries.arrivals.pop(task_id, [])
            missed += count - len(times)
            if times:
                last.append(max(times) - sent)
                every.extend(t - sent for t in times)
            await asyncio.sleep(0.05)
    finally:
        await http.close()
        await asyncio.gather(*(socket.close() for socket in sockets), return_exceptions=True)
        for listener in listeners:
            listener.cancel()
    elapsed = time.perf_counter() - started
    return {
        "throughput": len(every) / max(sum(last), 1e-9),
        "unit": "deliveries/s",
        "latency_op": "last subscriber",
        "latency_ms": summary(last),
        "ops": {"last subscriber": summary(last), "each delivery": summary(every)},
        "elapsed_s": elapsed,
        "requests": len(last),
        "errors": missed,
        "error_samples": [],
        "connections": count,
        "counters": {
            "subscribers": count,
            "rounds": len(last),
            "missed_deliveries": missed,
            "connect_seconds": connect_seconds,
        },
    }
