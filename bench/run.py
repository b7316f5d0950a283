"""Runs the suite: for each configuration, fresh servers on a fresh database, then each scenario's load
generator as its own process, sampling the servers' CPU and memory from /proc while it runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import growth
from bench.servers import (
    PostgresSchema,
    Server,
    create_key,
    floor_server,
    machine_busy_seconds,
    migrate,
    sqlite_url,
    taskorch_server,
)
from bench.stats import summary

MATRIX_SCENARIOS = (
    "submit", "claim", "complete", "lifecycle", "lifecycle-logging", "batch-submit", "batch-claim",
    "wakeup", "fanout",
)  # fmt: skip
SCENARIOS = ("floor", *MATRIX_SCENARIOS, "growth")


@dataclass(frozen=True)
class Config:
    name: str
    backend: str
    durability: str
    processes: int
    keys: bool = False  # every request carries an API key and the default rate limit applies
    workers: int = 1  # `serve --workers`: processes behind each server's one port


CONFIGS = {
    c.name: c
    for c in (
        Config("sqlite-full-1p", "sqlite", "full", 1),
        Config("sqlite-full-1p-keys", "sqlite", "full", 1, keys=True),
        Config("sqlite-normal-1p", "sqlite", "normal", 1),
        Config("sqlite-full-2p", "sqlite", "full", 2),
        Config("sqlite-full-2w", "sqlite", "full", 1, workers=2),
        Config("sqlite-normal-2p", "sqlite", "normal", 2),
        Config("postgres-2p", "postgres", "full", 2),
        Config("postgres-2w", "postgres", "full", 1, workers=2),
    )
}
GROWTH_CONFIG = "sqlite-full-1p"


@dataclass(frozen=True)
class Sizes:
    duration: float
    warmup: float
    connections: int
    max_requests: int
    batch: int
    batch_connections: int
    subscribers: int
    growth: tuple[int, int]
    store_samples: int

    def params(self, scenario: str) -> dict[str, Any]:
        return {"fill_seconds": max(2.0, 2 * self.duration), **self._params(scenario)}

    def _params(self, scenario: str) -> dict[str, Any]:
        span = self.duration + self.warmup
        if scenario in ("claim", "complete"):
            return {
                "prefill": max(200, int(4000 * span))
            }  # more than one server can take in `span`
        if scenario == "batch-submit":
            return {"batch": self.batch, "connections": self.batch_connections}
        if scenario == "batch-claim":
            prefill = max(self.batch * 4, int(15_000 * span))
            return {"batch": self.batch, "connections": self.batch_connections, "prefill": prefill}
        if scenario == "fanout":
            return {"subscribers": self.subscribers}
        if scenario == "lifecycle-logging":  # the cost of 100 agents streaming their output
            return {"loggers": 100, "lines_per_second": 10}
        return {}


def sizes(quick: bool, duration: float | None, connections: int | None) -> Sizes:
    if quick:
        base = Sizes(0.5, 0.1, 10, 5_000, 50, 2, 20, (100, 2_000), 20)
    else:
        base = Sizes(5.0, 1.0, 100, 2_000_000, 1000, 10, 1000, (1_000, 1_000_000), 500)
    return Sizes(
        duration if duration is not None else base.duration,
        base.warmup,
        connections if connections is not None else base.connections,
        base.max_requests,
        base.batch,
        base.batch_connections,
        base.subscribers,
        base.growth,
        base.store_samples,
    )


def run_loadgen(
    scenario: str,
    servers: Sequence[Server],
    size: Sizes,
    params: dict[str, Any],
    key: str | None = None,
) -> dict[str, Any]:
    spec = {
        "scenario": scenario,
        "key": key,
        "urls": [s.url for s in servers],
        "connections": size.connections,
        "duration": size.duration,
        "warmup": size.warmup,
        "max_requests": size.max_requests,
        "params": params,
    }
    cpu_before = [s.cpu_seconds() for s in servers]
    peaks = [s.rss_kb() for s in servers]
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    generator = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = started + size.duration + size.warmup + 300
    while generator.poll() is None:
        peaks = [max(p, s.rss_kb()) for p, s in zip(peaks, servers, strict=True)]
        if time.perf_counter() > deadline:
            generator.kill()
        time.sleep(0.05)
    out, err = generator.communicate()
    wall = time.perf_counter() - started
    if generator.returncode != 0:
        raise RuntimeError(f"load generator failed on {scenario}: {err.decode()[-3000:]}")
    outcome: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    cpu = sum(s.cpu_seconds() - b for s, b in zip(servers, cpu_before, strict=True))
    outcome["server_cpu"] = cpu / wall  # cores, averaged over the whole scenario with its setup
    # Anything else running on the machine competes for the same cores: say how much there was.
    generator_cpu = outcome["generator_cpu"] * wall
    other = machine_busy_seconds() - busy_before - cpu - generator_cpu
    outcome["other_cpu"] = max(0.0, other / wall)
    outcome["server_rss_mb"] = max(peaks) / 1024
    outcome["server_rss_total_mb"] = sum(peaks) / 1024
    outcome.setdefault("connections", params.get("connections", size.connections))
    return outcome


def start(servers: Sequence[Server]) -> None:
    for server in servers:
        server.start()
    for server in servers:
        server.wait_ready()


def stop(servers: Sequence[Server]) -> None:
    for server in servers:
        server.stop()


Emit = Callable[[dict[str, Any]], None]


def run_floor(workdir: Path, size: Sizes, emit: Emit) -> None:
    server = floor_server(workdir)
    start([server])
    try:
        for scenario in ("floor-json", "floor-graphql"):
            emit(
                {
                    "config": "floor",
                    "scenario": scenario,
                    **run_loadgen(scenario, [server], size, {}),
                }
            )
    finally:
        stop([server])


def run_config(
    config: Config, scenarios: Sequence[str], workdir: Path, size: Sizes, emit: Emit
) -> None:
    schema = PostgresSchema() if config.backend == "postgres" else None
    url = schema.create() if schema is not None else sqlite_url(workdir)
    servers: list[Server] = []
    try:
        migrate(url)  # once, before several processes open the same database
        key = create_key(url) if config.keys else None
        servers = [
            taskorch_server(url, config.durability, workdir, config.keys, config.workers)
            for _ in range(config.processes)
        ]
        start(servers)
        for scenario in scenarios:
            outcome = run_loadgen(scenario, servers, size, size.params(scenario), key)
            emit({"config": config.name, "scenario": scenario, **outcome})
    finally:
        stop(servers)
        if schema is not None:
            schema.drop()


def run_growth(workdir: Path, size: Sizes, emit: Emit) -> None:
    config = CONFIGS[GROWTH_CONFIG]
    directory = "/bench/growth"
    for waiting in size.growth:
        url = sqlite_url(workdir)
        migrate(url)
        load_seconds = growth.load_waiting(url, waiting, directory, "a task loaded in bulk")
        servers = [taskorch_server(url, config.durability, workdir)]
        start(servers)
        try:
            outcome = run_loadgen("growth", servers, size, {"directory": directory})
        finally:
            stop(servers)
        # The same claim without HTTP and GraphQL in front, so the database's share is visible.
        latencies = asyncio.run(growth.store_claim_latencies(url, directory, size.store_samples))
        outcome["store_claim_ms"] = summary(latencies)
        emit({
            "config": config.name, "scenario": f"growth-{waiting}", "waiting_tasks": waiting,
            "load_seconds": load_seconds, **outcome,
        })  # fmt: skip
        for leftover in workdir.glob(url.rsplit("/", 1)[1] + "*"):
            leftover.unlink()  # a million-row file is not worth keeping
