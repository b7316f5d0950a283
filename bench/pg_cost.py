"""What a task's lifecycle costs PostgreSQL: the server CPU, statements and round trips of
concurrent one-task lifecycles (submit, claim, complete) through one store and its event bus, as
one `taskorch serve` process runs them, without HTTP and GraphQL.

`python -m bench.pg_cost [--clients 32] [--seconds 5] [--code-b DIR]`. The server CPU is read
from /proc for this run's own backends only (its pool, listener and stamper), so other users of
the PostgreSQL server do not count; WAL writer and autovacuum work are left out. Statements
are counted on the pool's connections (the stamper's and listener's are not). Each request of
an anonymous client also reads the number of active keys, as the server does, so that read is
part of each change here. `--code-b` runs the same measurement on another checkout afterwards
(say, the previous commit), in the same minutes."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CODE = HERE.parent.parent
POSTGRES_URL = os.environ.get(
    "TASKORCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
        except OSError:  # not on this machine, or gone
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(clients: int, seconds: float) -> dict[str, Any]:
    import asyncpg

    from api.core.domain import Completion
    from api.core.validation import task_spec
    from api.events.postgres import PostgresBus
    from api.store.postgres import PostgresStore

    schema = f"bench_cost_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    # The pool's connections carry the schema's name, so this run finds its own backends.
    url = f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}&application_name={schema}"
    store = PostgresStore(url)
    bus = None
    try:
        await store.open()
        bus = PostgresBus(url, store)
        await bus.start()
        sent: collections.Counter[str] = collections.Counter()
        counting = False

        def logged(record: Any) -> None:
            if counting:
                sent[" ".join(record.query.split())[:70]] += 1

        connections = [await store.pool.acquire() for _ in range(store.pool.get_max_size())]
        for conn in connections:
            conn.add_query_logger(logged)
        for conn in connections:
            await store.pool.release(conn)
        for _ in range(100):  # the stamper takes its lock within a moment of opening
            if store.stamper.holding:
                break
            await asyncio.sleep(0.05)
        done = 0

        async def client(number: int, until: float) -> None:
            nonlocal done
            directory, worker = f"/cost/{number}", f"w{number}"
            while time.monotonic() < until:
                await store.keys.count_active_keys()
                now = datetime.now(UTC)
                await store.submit([task_spec(work_directory=directory, prompt="p")], now)
                await store.keys.count_active_keys()
                now = datetime.now(UTC)
                claimed = await store.claim(directory, worker, 1, now + timedelta(seconds=60), now)
                await store.keys.count_active_keys()
                for task in claimed:
                    await store.complete([Completion(task.id, {"ok": True})], worker, now)
                done += 1

        warm = time.monotonic() + 1.0
        await asyncio.gather(*(client(n, warm) for n in range(clients)))
        pids = [
            row["pid"]
            for row in await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1", schema
            )
        ]
        pids += [p for p in (store.stamper.pid, bus.listener_pid) if p is not None]
        done, counting = 0, True
        server, mine, started = backend_cpu(pids), own_cpu(), time.monotonic()
        until = started + seconds
        await asyncio.gather(*(client(n, until) for n in range(clients)))
        await asyncio.sleep(0.2)  # the last positions and deliveries
        wall = time.monotonic() - started
        server, mine = backend_cpu(pids) - server, own_cpu() - mine
        counting = False
        stamper = store.stamper.pid
        return {
            "lifecycles_per_s": done / wall,
            "server_cpu_ms": server / done * 1e3,
            "client_cpu_ms": mine / done * 1e3,
            "statements": sum(sent.values()) / done,
            "by_statement": {text: count / done for text, count in sent.most_common(12)},
            "stamper_is_here": stamper is not None,
        }
    finally:
        if bus is not None:
            await bus.stop()
        await store.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


def show(name: str, result: dict[str, Any]) -> None:
    print(
        f"{name}: {result['lifecycles_per_s']:.0f} lifecycles/s; per lifecycle"
        f" PostgreSQL CPU {result['server_cpu_ms']:.2f} ms, this process's CPU"
        f" {result['client_cpu_ms']:.2f} ms, {result['statements']:.1f} statements on the pool",
        flush=True,
    )
    for text, count in result["by_statement"].items():
        print(f"  {count:5.2f}  {text}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--code-b", help="another checkout of taskorch, measured after this one")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one checkout
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.json:
        print(json.dumps(asyncio.run(measure(args.clients, args.seconds))))
        return 0
    runs = [("this", CODE)] + ([("other", Path(args.code_b))] if args.code_b else [])
    for name, code in runs:
        command = [sys.executable, str(HERE), "--json", "--clients", str(args.clients),
                   "--seconds", str(args.seconds)]  # fmt: skip
        output = subprocess.run(
            command, env={**os.environ, "PYTHONPATH": str(code)}, check=True,
            stdout=subprocess.PIPE, text=True,
        ).stdout  # fmt: skip
        show(f"{name} ({code})", json.loads(output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
