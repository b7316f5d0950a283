"""The load generator, run as its own process: one scenario per run, its result as one JSON line.

`python -m bench.loadgen '<spec json>'`. A spec names the scenario, the server URLs, the number of
connections, the measured duration, a warm-up and a request budget; connections are spread
round-robin over the URLs. Latencies are measured from just before a request is written to just
after its whole response is read."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from api.worker_log import FLUSH_SECONDS
from bench import http
from bench.http import Connection, get_request, graphql_request
from bench.stats import summary

SUBMIT = "mutation Submit($input: SubmitTaskInput!) { submitTask(input: $input) { id } }"
SUBMIT_MANY = (
    "mutation SubmitMany($inputs: [SubmitTaskInput!]!) { submitTasks(inputs: $inputs) { id } }"
)
CLAIM = (
    "mutation Claim($dir: String!, $worker: String!, $wait: Float) {"
    " claimTask(workDirectory: $dir, workerId: $worker, waitSeconds: $wait) { id } }"
)
CLAIM_MANY = (
    "mutation ClaimMany($dir: String!, $worker: String!, $limit: Int!) {"
    " claimTasks(workDirectory: $dir, workerId: $worker, limit: $limit) { id } }"
)
COMPLETE = (
    "mutation Complete($id: ID!, $worker: String!, $result: JSON) {"
    " completeTask(id: $id, workerId: $worker, result: $result) { id } }"
)
COMPLETE_MANY = (
    "mutation CompleteMany($worker: String!, $items: [CompleteItem!]!) {"
    " completeTasks(workerId: $worker, items: $items) { id } }"
)
RELEASE = "mutation Release($id: ID!, $worker: String!) { releaseTask(id: $id, workerId: $worker) { id } }"
EVENTS = (
    "subscription Events($dir: String) { taskEvents(workDirectory: $dir) { id taskId status } }"
)
PROMPT = "summarise the failing tests and propose a fix"
WORKER = "bench-worker"
_ID = re.compile(rb'"id":"([0-9a-f-]{36})"')


class Recorder:
    """Latencies by operation, keeping only requests that started after the warm-up."""

    def __init__(self, warm_until: float) -> None:
        self.warm_until = warm_until
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.sent = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.counters: dict[str, int] = defaultdict(int)
        self.done: dict[str, int] = defaultdict(int)  # successes that finished after the warm-up

    async def request(self, conn: Connection, raw: bytes, op: str) -> bytes | None:
        """Send one request; None when it failed (counted, with the first few bodies kept)."""
        self.sent += 1
        started = time.perf_counter()
        try:
            status, body = await conn.send(raw)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._error(f"{op}: {exc!r}")
            return None
        finished = time.perf_counter()
        if started >= self.warm_until:
            self.samples[op].append(finished - started)
        if status != 200 or b'"errors"' in body:
            self._error(f"{op}: HTTP {status} {body[:300].decode(errors='replace')}")
            return None
        if finished >= self.warm_until:
            self.done[op] += 1
        return body

    def count(self, name: str, amount: int = 1) -> None:
        """Count something that happened now, if the warm-up is over."""
        if time.perf_counter() >= self.warm_until:
            self.counters[name] += amount

    def _error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(message)


Worker = Callable[[int, Connection, Recorder], Awaitable[bool]]


class Run:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.urls: list[str] = spec["urls"]
        self.connections: int = spec["connections"]
        self.duration: float = spec["duration"]
        self.warmup: float = spec.get("warmup", 0.5)
        self.budget: int = spec.get("max_requests", 1_000_000)
        self.params: dict[str, Any] = spec.get("params", {})
        self.deadline = float("inf")  # set by `drive`: when its measured time ends
        self.host = Connection(self.urls[0]).authority

    def raw(self, query: str, variables: dict[str, Any], url_index: int = 0) -> bytes:
        host = Connection(self.urls[url_index % len(self.urls)]).authority
        return graphql_request(host, query, variables)

    async def drive(self, worker: Worker, connections: int | None = None) -> tuple[Recorder, float]:
        """Run `worker` on each connection until the deadline or the budget; the measured time."""
        count = connections or self.connections
        start = time.perf_counter()
        recorder = Recorder(start + self.warmup)
        deadline = self.deadline = start + self.warmup + self.duration

        async def loop(index: int) -> None:
            conn = Connection(self.urls[index % len(self.urls)])
            await conn.open()
            try:
                while time.perf_counter() < deadline and recorder.sent < self.budget:
                    if not await worker(index, conn, recorder):
                        break
            finally:
                await conn.close()

        await asyncio.gather(*(loop(i) for i in range(count)))
        end = time.perf_counter()
        return recorder, max(end - recorder.warm_until, 1e-9)

    async def fill(self, directory: str, count: int, batch: int = 1000) -> None:
        """Queue `count` tasks through submitTasks, untimed; a slow server gets fewer (bounded in
        time), and a scenario that then runs dry is measured over the time it did run."""
        left = count
        stop_at = time.perf_counter() + self.params.get("fill_seconds", 10.0)
        conns = [Connection(url) for url in self.urls]
        try:
            while left > 0 and time.perf_counter() < stop_at:
                size = min(batch, left)
                inputs = [{"workDirectory": directory, "prompt": PROMPT}] * size
                status, body = await conns[0].send(self.raw(SUBMIT_MANY, {"inputs": inputs}))
                if status != 200 or b'"errors"' in body:
                    raise RuntimeError(f"filling {directory} failed: {body[:300]!r}")
                left -= size
        finally:
            for conn in conns:
                await conn.close()

    async def claim_ids(self, directory: str, count: int) -> list[str]:
        """Claim up to `count` tasks through claimTasks, untimed; their ids."""
        conn = Connection(self.urls[0])
        ids: list[str] = []
        try:
            while len(ids) < count:
                limit = min(1000, count - len(ids))
                variables = {"dir": directory, "worker": WORKER, "limit": limit}
                status, body = await conn.send(self.raw(CLAIM_MANY, variables))
                found = [m.decode() for m in _ID.findall(body)]
                if status != 200 or not found:
                    break
                ids.extend(found)
        finally:
            await conn.close()
        return ids


def result(
    run: Run, recorder: Recorder, elapsed: float, headline: str, units: int, unit: str, **extra: Any
) -> dict[str, Any]:
    ops = {op: summary(values) for op, values in recorder.samples.items()}
    every = [v for values in recorder.samples.values() for v in values]
    requests = sum(recorder.done.values())
    ops["all"] = summary(every)
    return {
        "throughput": units / elapsed,
        "unit": unit,
        "requests_per_s": requests / elapsed,
        "latency_op": headline,
        "latency_ms": ops[headline] if headline in ops else summary([]),
        "ops": ops,
        "elapsed_s": elapsed,
        "requests": requests,
        "errors": recorder.errors,
        "error_samples": recorder.error_samples,
        "counters": dict(recorder.counters),
        **extra,
    }


async def single(run: Run, path: str | None, op: str) -> dict[str, Any]:
    """One request shape repeated: floor routes and submit."""
    if path is not None:
        raw = get_request(run.host, path)
    else:
        directory = run.params.get("directory", "/bench/submit")
        raw = run.raw(SUBMIT, {"input": {"workDirectory": directory, "prompt": PROMPT}})

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        await rec.request(conn, raw, op)
        return True

    recorder, elapsed = await run.drive(worker)
    return result(run, recorder, elapsed, op, recorder.done[op], "req/s")


async def claim(run: Run) -> dict[str, Any]:
    directory = "/bench/claim"
    await run.fill(directory, run.params["prefill"])
    raw = run.raw(CLAIM, {"dir": directory, "worker": WORKER, "wait": None})

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        body = await rec.request(conn, raw, "claimTask")
        if body is not None and _ID.search(body) is None:
            rec.count("empty")
            return False  # the prefilled queue ran dry: stop rather than time empty claims
        return True

    recorder, elapsed = await run.drive(worker)
    return result(run, recorder, elapsed, "claimTask", recorder.done["claimTask"], "req/s")


async def complete(run: Run) -> dict[str, Any]:
    directory = "/bench/complete"
    await run.fill(directory, run.params["prefill"])
    ids = await run.claim_ids(directory, run.params["prefill"])

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        if not ids:
            return False
        variables = {"id": ids.pop(), "worker": WORKER, "result": {"ok": True}}
        await rec.request(
            conn, graphql_request(conn.authority, COMPLETE, variables), "completeTask"
        )
        return True

    recorder, elapsed = await run.drive(worker)
    count = recorder.done["completeTask"]
    return result(run, recorder, elapsed, "completeTask", count, "req/s", ran_dry=not ids)


async def lifecycle(run: Run) -> dict[str, Any]:
    """A third of the connections submit; the rest claim and complete. Tasks/s completed.

    With `loggers` (lifecycle-logging), that many more connections each hold a task of their own
    and append `lines_per_second` lines to its log, one call every FLUSH_SECONDS (as the worker
    batches), while the lifecycle runs."""
    directory = "/bench/lifecycle"
    loggers = int(run.params.get("loggers", 0))
    rate = float(run.params.get("lines_per_second", 10))
    held: list[str] = []
    if loggers:
        await run.fill("/bench/logging", loggers)
        held = await run.claim_ids("/bench/logging", loggers)
        if len(held) < loggers:
            raise RuntimeError(f"only {len(held)} of {loggers} logging tasks could be claimed")
    per_call = max(1, round(rate * FLUSH_SECONDS))
    next_append: dict[int, float] = {}
    producers = max(1, run.connections // 3)
    submit = {i: run.raw(SUBMIT, {"input": {"workDirectory": directory, "prompt": PROMPT}}, i)
              for i in range(run.connections)}  # fmt: skip
    claim_raw = {i: run.raw(CLAIM, {"dir": directory, "worker": f"w{i}", "wait": None}, i)
                 for i in range(run.connections)}  # fmt: skip

    async def logger(index: int, conn: Connection, rec: Recorder) -> bool:
        now = time.perf_counter()
        # spread the first ticks over one interval
        due = next_append.setdefault(index, now + FLUSH_SECONDS * (index % 50) / 50)
        if due >= run.deadline:
            return False  # its next call would fall after the run: waiting would stretch it
        if due > now:
            await asyncio.sleep(due - now)
        next_append[index] = due + per_call / rate
        lines = [f"step {index}.{n}: compiling module {n} of the project" for n in range(per_call)]
        body = json.dumps({"worker_id": WORKER, "lines": lines}).encode()
        path = f"/api/v1/tasks/{held[index - run.connections]}/logs"  # as the worker sends them
        if await rec.request(conn, http.post_request(conn.authority, path, body), "appendLog"):
            rec.count("log_lines", per_call)
        return True

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        if index >= run.connections:
            return await logger(index, conn, rec)
        if index % 3 == 0 and index // 3 < producers:
            await rec.request(conn, submit[index], "submitTask")
            return True
        body = await rec.request(conn, claim_raw[index], "claimTask")
        if body is None:
            return True
        found = _ID.search(body)
        if found is None:
            rec.count("empty_claims")
            await asyncio.sleep(0.005)  # a worker backs off briefly when the queue is empty
            return True
        variables = {"id": found.group(1).decode(), "worker": f"w{index}", "result": {"ok": True}}
        raw = graphql_request(conn.authority, COMPLETE, variables)
        if await rec.request(conn, raw, "completeTask") is not None:
            rec.count("completed")
        return True

    recorder, elapsed = await run.drive(worker, run.connections + loggers)
    return result(
        run, recorder, elapsed, "all", recorder.counters["completed"], "tasks/s",
        submitted_per_s=recorder.done["submitTask"] / elapsed, producers=producers,
        log_lines_per_s=recorder.counters["log_lines"] / elapsed, loggers=loggers,
    )  # fmt: skip


async def batch_submit(run: Run) -> dict[str, Any]:
    size = run.params["batch"]
    inputs = [{"workDirectory": "/bench/batch-submit", "prompt": PROMPT}] * size
    raw = run.raw(SUBMIT_MANY, {"inputs": inputs})

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        if await rec.request(conn, raw, "submitTasks") is not None:
            rec.count("tasks", size)
        return True

    recorder, elapsed = await run.drive(worker, run.params["connections"])
    tasks = recorder.counters["tasks"]
    return result(run, recorder, elapsed, "submitTasks", tasks, "tasks/s", batch=size)


async def batch_claim(run: Run) -> dict[str, Any]:
    directory = "/bench/batch-claim"
    size = run.params["batch"]
    await run.fill(directory, run.params["prefill"])

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        variables = {"dir": directory, "worker": f"w{index}", "limit": size}
        body = await rec.request(
            conn, graphql_request(conn.authority, CLAIM_MANY, variables), "claimTasks"
        )
        if body is None:
            return True
        ids = [m.decode() for m in _ID.findall(body)]
        if not ids:
            return False  # the prefilled queue ran dry
        items = [{"id": task_id, "result": {"ok": True}} for task_id in ids]
        raw = graphql_request(
            conn.authority, COMPLETE_MANY, {"worker": f"w{index}", "items": items}
        )
        if await rec.request(conn, raw, "completeTasks") is not None:
            rec.count("completed", len(ids))
        return True

    recorder, elapsed = await run.drive(worker, run.params["connections"])
    return result(
        run, recorder, elapsed, "completeTasks", recorder.counters["completed"], "tasks/s",
        batch=size,
    )  # fmt: skip


async def wakeup(run: Run) -> dict[str, Any]:
    """A claimer waits (waitSeconds) on an empty directory; then a submit: submit sent to claim
    response received, one sample at a time."""
    directory = "/bench/wakeup"
    claimer, submitter = Connection(run.urls[0]), Connection(run.urls[0])
    claim_raw = run.raw(CLAIM, {"dir": directory, "worker": WORKER, "wait": 5.0})
    submit_raw = run.raw(SUBMIT, {"input": {"workDirectory": directory, "prompt": PROMPT}})
    samples: list[float] = []
    missed = 0
    started = time.perf_counter()
    deadline = started + run.warmup + run.duration
    limit = run.params.get("samples", 1000)

    async def claim() -> tuple[float, bytes]:
        _, body = await claimer.send(claim_raw)
        return time.perf_counter(), body

    try:
        while time.perf_counter() < deadline and len(samples) < limit:
            waiting = asyncio.ensure_future(claim())
            await asyncio.sleep(0.02)  # let the claim reach the server and start waiting
            sent = time.perf_counter()
            await submitter.send(submit_raw)
            received, body = await waiting
            if _ID.search(body) is None:
                missed += 1
            elif sent >= started + run.warmup:
                samples.append(received - sent)
    finally:
        await claimer.close()
        await submitter.close()
    elapsed = time.perf_counter() - started
    return {
        "throughput": len(samples) / elapsed,
        "unit": "samples/s",
        "latency_op": "wakeup",
        "latency_ms": summary(samples),
        "ops": {"wakeup": summary(samples)},
        "elapsed_s": elapsed,
        "requests": 2 * len(samples),
        "errors": missed,
        "error_samples": [],
        "counters": {"samples": len(samples), "missed": missed},
        "connections": 2,  # one waiting claimer, one submitter
    }


async def fanout(run: Run) -> dict[str, Any]:
    from bench.fanout import measure_fanout

    return await measure_fanout(run, EVENTS, SUBMIT, PROMPT)


async def growth(run: Run) -> dict[str, Any]:
    """Claim then release, so the number of waiting tasks stays what was loaded."""
    directory = run.params["directory"]
    claim_raw = {i: run.raw(CLAIM, {"dir": directory, "worker": f"w{i}", "wait": None}, i)
                 for i in range(run.connections)}  # fmt: skip

    async def worker(index: int, conn: Connection, rec: Recorder) -> bool:
        body = await rec.request(conn, claim_raw[index], "claimTask")
        found = None if body is None else _ID.search(body)
        if found is None:
            rec.count("empty")
            return body is None
        variables = {"id": found.group(1).decode(), "worker": f"w{index}"}
        await rec.request(conn, graphql_request(conn.authority, RELEASE, variables), "releaseTask")
        return True

    recorder, elapsed = await run.drive(worker)
    return result(run, recorder, elapsed, "claimTask", recorder.done["claimTask"], "claims/s")


SCENARIOS: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "floor-json": lambda run: single(run, "/json", "GET /json"),
    "floor-graphql": lambda run: single(run, None, "submitTask"),
    "submit": lambda run: single(run, None, "submitTask"),
    "claim": claim,
    "complete": complete,
    "lifecycle": lifecycle,
    "lifecycle-logging": lifecycle,
    "batch-submit": batch_submit,
    "batch-claim": batch_claim,
    "wakeup": wakeup,
    "fanout": fanout,
    "growth": growth,
}


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    return await SCENARIOS[spec["scenario"]](Run(spec))


def main() -> None:
    spec = json.loads(sys.argv[1])
    http.authorize(spec.get("key"))
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    outcome: dict[str, Any] = asyncio.run(_run(spec))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    outcome["generator_cpu"] = cpu / (time.perf_counter() - wall)  # cores the generator used
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
