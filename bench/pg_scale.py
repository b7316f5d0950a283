"""Status-change throughput of PostgreSQL replicas, and how long a committed change takes to reach
a subscriber, with and without added network latency to PostgreSQL; one SQLite process alongside.

Each replica is its own process holding a store and an event bus, as `taskorch serve` does, with
`--writers` coroutines each running submit -> claim -> complete on a directory of its own (three
status changes per lifecycle), measured at the store, so the figures show what the database path
allows, not what GraphQL costs. Latency is added by a TCP proxy on loopback that holds every chunk
for half the given round trip in each direction (the equivalent of netem delay on the path).
`--code DIR` runs the replicas on another checkout of taskorch (say, the previous commit), so two
designs are compared in the same run:

    python -m bench.pg_scale --replicas 1,2,4 --latency 0,10 --code-b /tmp/taskorch-previous
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve()
CODE = HERE.parent.parent
POSTGRES_URL = os.environ.get(
    "TASKORCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


# --- one replica (run as `python bench/pg_scale.py replica ...` with PYTHONPATH set) ---


async def replica(url: str, writers: int, start_at: float, duration: float, pool: int) -> None:
    from api.core.domain import Completion, EventFilter
    from api.core.validation import task_spec

    if url.startswith("sqlite"):
        from api.store.sqlite import SqliteStore

        store: Any = SqliteStore(url, durability="normal")
        bus: Any = None
    else:
        from api.events.postgres import PostgresBus
        from api.store.postgres import PostgresStore

        store = PostgresStore(url, min_size=1, max_size=pool)
    await store.open()
    if not url.startswith("sqlite"):
        bus = PostgresBus(url, store)
        await bus.start()
    committed: dict[tuple[str, str], float] = {}
    delivered: dict[tuple[str, str], float] = {}
    changes = 0
    me = os.getpid()

    async def subscriber() -> None:
        subscription = bus.subscribe(EventFilter(), 10_000_000)
        while True:
            event = await subscription.next()
            delivered[(event.task_id, event.status.value)] = time.time()

    async def writer(index: int) -> None:
        nonlocal changes
        directory = f"/scale/{me}/{index}"
        worker = f"w{me}-{index}"
        while time.time() < start_at + duration:
            now = datetime.now(UTC)
            (task,) = await store.submit([task_spec(work_directory=directory, prompt="p")], now)
            done = time.time()
            committed[(task.id, "WAITING")] = done
            lease = now + timedelta(minutes=5)
            (claimed,) = await store.claim(directory, worker, 1, lease, now)
            committed[(task.id, "WORKING")] = time.time()
            assert await store.complete([Completion(claimed.id, None)], worker, now)
            finished = time.time()
            committed[(task.id, "COMPLETED")] = finished
            if start_at <= done and finished <= start_at + duration:
                changes += 3

    listening = asyncio.create_task(subscriber()) if bus is not None else None
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(writer(i) for i in range(writers)))
    await asyncio.sleep(1.0)  # the last deliveries
    delays = [(delivered[key] - at) * 1000 for key, at in committed.items() if key in delivered]
    if listening is not None:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await bus.stop()
    await store.close()
    print(
        json.dumps(
            {
                "changes": changes,
                "delays_ms": delays,
                "undelivered": (len(committed) - len(delays) if bus is not None else 0),
            }
        )
    )


# --- a loopback TCP proxy that adds latency ---


class DelayProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL, holding each chunk `rtt_ms / 2` each way."""

    def __init__(self, target: tuple[str, int], rtt_ms: float) -> None:
        self.target = target
        self.delay = rtt_ms / 2000
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
        finally:
            queue.put_nowait((loop.time() + self.delay, b""))
            await asyncio.gather(sender, return_exceptions=True)


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


# --- the driver ---


def schema_url(schema: str) -> str:
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"


async def admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def run_replicas(
    code: Path, url: str, replicas: int, args: argparse.Namespace
) -> dict[str, Any]:
    start_at = time.time() + 3.0 + replicas  # every replica open and listening first
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, str(HERE), "replica", url, str(args.writers), str(start_at),
               str(args.duration), str(args.pool)]  # fmt: skip
    processes = [
        await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.PIPE)
        for _ in range(replicas)
    ]
    outputs = [json.loads((await p.communicate())[0]) for p in processes]
    delays = sorted(d for o in outputs for d in o["delays_ms"])
    result: dict[str, Any] = {
        "changes_per_s": sum(o["changes"] for o in outputs) / args.duration,
        "undelivered": sum(o["undelivered"] for o in outputs),
    }
    if delays:
        result["p50_ms"] = statistics.median(delays)
        result["p99_ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return result


async def measure(code: Path, replicas: int, rtt_ms: float, args: argparse.Namespace) -> Any:
    schema = f"bench_scale_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    await admin(f"CREATE SCHEMA {schema}")
    proxy = None
    url = schema_url(schema)
    try:
        if rtt_ms:
            target = urlsplit(POSTGRES_URL)
            proxy = DelayProxy((target.hostname or "127.0.0.1", target.port or 5432), rtt_ms)
            await proxy.start()
            url = through(url, proxy.port)
        return await run_replicas(code, url, replicas, args)
    finally:
        if proxy is not None:
            await proxy.stop()
        await admin(f"DROP SCHEMA {schema} CASCADE")


async def main(args: argparse.Namespace) -> None:
    designs = [("this", CODE)] + ([("other", Path(args.code_b))] if args.code_b else [])
    if args.sqlite:
        with tempfile.TemporaryDirectory() as scratch:
            url = f"sqlite:///{scratch}/scale.db"
            sqlite = await run_replicas(CODE, url, 1, args)
        print(f"sqlite 1 process (normal): {sqlite['changes_per_s']:.0f} changes/s", flush=True)
    for rtt in args.latency:
        for replicas in args.replicas:
            for name, code in designs:
                r = await measure(code, replicas, rtt, args)
                delay = (
                    f"commit->delivery p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms"
                    if "p50_ms" in r
                    else ""
                )
                print(
                    f"{name:5} +{rtt:g} ms rtt, {replicas} replica(s): "
                    f"{r['changes_per_s']:.0f} changes/s  {delay}"
                    f"{'  undelivered ' + str(r['undelivered']) if r['undelivered'] else ''}",
                    flush=True,
                )


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pg_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--latency", type=numbers, default=[0.0, 10.0], help="added round trip, ms")
    parser.add_argument("--writers", type=int, default=32, help="writing coroutines per replica")
    parser.add_argument("--pool", type=int, default=40, help="connections per replica")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--code-b", help="another taskorch checkout to compare, run the same way")
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_false")
    return parser.parse_args(argv)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "replica":
    _, _, db, n, at, seconds, pool_size = sys.argv
    asyncio.run(replica(db, int(n), float(at), float(seconds), int(pool_size)))
elif __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
