"""Several processes writing one SQLite file through the store, as `serve --workers N` does: tasks
completed per second and the latency of each change, per process.

Each process opens its own store on the file and runs `--clients` coroutines, each doing submit ->
claim -> complete on a directory of its own process, at durability full. Without HTTP and GraphQL
in front, the figures show how the processes share the file's write lock. `--code DIR` runs the
processes on another checkout (say, the previous commit), so two versions meet in one run:

    python -m bench.sqlite_processes --processes 2 --seconds 5 --code /tmp/taskorch-previous
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

CODE = Path(__file__).resolve().parent.parent
# Run as a script (the processes are, so that `--code` can name a checkout without this file), its
# own folder would come first on the path, and bench/http.py would hide the standard library's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


async def _writer(url: str, seconds: float, clients: int) -> dict[str, Any]:
    from api.core.domain import Completion
    from api.core.validation import task_spec
    from api.store.sqlite import SqliteStore

    store = SqliteStore(url, durability="full")
    await store.open()
    latencies: list[float] = []
    done = 0
    directory = f"/bench/{os.getpid()}"
    end = time.perf_counter() + seconds

    async def client(number: int) -> None:
        nonlocal done
        worker = f"w{number}"
        while time.perf_counter() < end:
            now = datetime.now(UTC)
            began = time.perf_counter()
            await store.submit([task_spec(work_directory=directory, prompt="p")], now)
            submitted = time.perf_counter()
            claimed = await store.claim(directory, worker, 1, now + timedelta(minutes=5), now)
            latencies.extend((submitted - began, time.perf_counter() - submitted))
            if claimed:
                began = time.perf_counter()
                await store.complete([Completion(claimed[0].id, {"ok": True})], worker, now)
                latencies.append(time.perf_counter() - began)
                done += 1

    try:
        await asyncio.gather(*(client(n) for n in range(clients)))
    finally:
        await store.close()
    latencies.sort()

    def ms(quantile: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * quantile))] * 1000, 1)

    return {"completed": done, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50, help="per process (default 50)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--code", default=str(CODE), help="the checkout the processes run")
    parser.add_argument("--writer", help=argparse.SUPPRESS)  # one process's part: its database URL
    args = parser.parse_args(argv)
    if args.writer:
        print(json.dumps(asyncio.run(_writer(args.writer, args.seconds, args.clients))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        env = {**os.environ, "PYTHONPATH": args.code}
        command = [sys.executable, str(Path(__file__).resolve()), "--writer", url,
                   "--seconds", str(args.seconds), "--clients", str(args.clients)]  # fmt: skip
        # The first process creates the schema alone, so the others start on a migrated file.
        subprocess.run([*command[:-4], "--seconds", "0", "--clients", "1"], env=env, check=True,
                       cwd=CODE, stdout=subprocess.DEVNULL)  # fmt: skip
        running = [
            subprocess.Popen(command, env=env, cwd=CODE, stdout=subprocess.PIPE, text=True)
            for _ in range(args.processes)
        ]
        results = [json.loads(p.communicate()[0]) for p in running]
    total = sum(r["completed"] for r in results) / args.seconds
    print(f"{args.processes} processes, {args.clients} clients each, {args.code}")
    print(f"  {total:,.0f} tasks/s completed")
    for number, r in enumerate(results, start=1):
        print(f"  process {number}: change p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms,"
              f" max {r['max_ms']} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
