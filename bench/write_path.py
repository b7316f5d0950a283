"""The SQLite write path alone, without HTTP and GraphQL: CPU per task of batch submits, batch
claims + completions and concurrent one-task lifecycles through the store, at durability full.

`python -m bench.write_path [--rounds N] [--durability full|normal]`. CPU is the whole process's
(the event loop and the writer thread), so a machine busy with other work changes the wall-clock
figures much more than the CPU ones: compare tasks per CPU-second between two checkouts."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from api.core.domain import Completion, TaskSpec
from api.store.sqlite import SqliteStore

BATCH = 1000
LIFECYCLE_CLIENTS = 100
PROMPT = "summarise the failing tests and propose a fix"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def now() -> datetime:
    return datetime.now(UTC)


async def measured(tasks: int, work: Callable[[], Awaitable[None]]) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    await work()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "tasks": tasks,
        "tasks_per_cpu_s": tasks / cpu,
        "cpu_us_per_task": cpu / tasks * 1e6,
        "tasks_per_s": tasks / wall,
    }


async def run(path: Path, rounds: int, durability: str) -> dict[str, dict[str, float]]:
    store = SqliteStore(f"sqlite:///{path}", durability=durability)
    await store.open()
    try:

        async def submit() -> None:
            for _ in range(rounds):
                await store.submit([TaskSpec("/bench", PROMPT) for _ in range(BATCH)], now())

        async def claim_complete() -> None:
            for _ in range(rounds):
                lease = now() + timedelta(minutes=5)
                tasks = await store.claim("/bench", "worker", BATCH, lease, now())
                items = [Completion(task.id, {"ok": True}) for task in tasks]
                if await store.complete(items, "worker", now()) is None:
                    raise RuntimeError("a batch completion was refused")

        per_client = max(1, rounds * BATCH // 5 // LIFECYCLE_CLIENTS)

        async def client(number: int) -> None:
            directory = f"/lifecycle/{number % 10}"
            for _ in range(per_client):
                await store.submit([TaskSpec(directory, PROMPT)], now())
                lease = now() + timedelta(minutes=5)
                for task in await store.claim(directory, f"w{number}", 1, lease, now()):
                    await store.complete([Completion(task.id, {"ok": 1})], f"w{number}", now())

        async def lifecycles() -> None:
            await asyncio.gather(*(client(n) for n in range(LIFECYCLE_CLIENTS)))

        return {
            "batch-submit": await measured(rounds * BATCH, submit),
            "batch-claim-complete": await measured(rounds * BATCH, claim_complete),
            "lifecycle": await measured(per_client * LIFECYCLE_CLIENTS, lifecycles),
        }
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_path", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help=f"batches of {BATCH} (default 10)")
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: use 1 or more")
    with tempfile.TemporaryDirectory(prefix="taskorch-write-path-") as scratch:
        figures = asyncio.run(run(Path(scratch) / "bench.db", args.rounds, args.durability))
    for name, row in figures.items():
        print(
            f"{name:<22} {row['tasks']:>7,.0f} tasks  {row['tasks_per_cpu_s']:>8,.0f} tasks/CPU-s"
            f"  {row['cpu_us_per_task']:>6.0f} us CPU/task  {row['tasks_per_s']:>8,.0f} tasks/s"
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
