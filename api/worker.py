"""The reference worker: claims tasks over GraphQL and runs a command for each in its work directory."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from api.worker_log import LogShipper

log = logging.getLogger("taskorch.worker")

TAIL_BYTES = 4096
CLAIM_WAIT_SECONDS = 30.0  # the server answers at once when a task arrives; this only bounds a call
KILL_WAIT_SECONDS = 5.0  # between SIGTERM and SIGKILL of a command's process group
TASK_FIELDS = "id prompt workDirectory version reviewFeedback"

CLAIM = f"""mutation Claim($dir: String!, $worker: String!, $lease: Int, $wait: Float) {{
  claimTask(workDirectory: $dir, workerId: $worker, leaseSeconds: $lease, waitSeconds: $wait) {{
    {TASK_FIELDS}
  }}
}}"""
HEARTBEAT = """mutation Beat($id: ID!, $worker: String!, $lease: Int) {
  heartbeat(id: $id, workerId: $worker, leaseSeconds: $lease) { id }
}"""
COMPLETE = """mutation Complete($id: ID!, $worker: String!, $result: JSON) {
  completeTask(id: $id, workerId: $worker, result: $result) { id }
}"""
FAIL = """mutation Fail($id: ID!, $worker: String!, $error: String!) {
  failTask(id: $id, workerId: $worker, error: $error) { id }
}"""
RELEASE = """mutation Release($id: ID!, $worker: String!) {
  releaseTask(id: $id, workerId: $worker) { id }
}"""
HELD = """query Held($dir: String!) {
  tasks(status: [WORKING], workDirectory: $dir, first: 1000) { edges { node { id workerId } } }
}"""


class ServerError(Exception):
    """The server refused a call; `code` is its error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    server: str
    work_directory: str
    worker_id: str
    command: Sequence[str]
    key: str | None = None
    concurrency: int = 1
    timeout: float | None = None
    lease_seconds: int = 300
    grace_seconds: float = 30.0
    ship_logs: bool = True  # output lines to the task's log, `::progress` lines as progress


@dataclass(frozen=True, slots=True)
class Outcome:
    exit_code: int | None
    duration: float
    stdout: str
    stderr: str
    timed_out: bool = False
    stopped: bool = False  # killed because the worker shut down or lost the task

    def as_result(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "duration_seconds": round(self.duration, 3),
            "stdout_tail": self.stdout,
            "stderr_tail": self.stderr,
        }

    def as_error(self, timeout: float | None) -> str:
        if self.timed_out:
            head = f"command timed out after {timeout:g} s and was killed"
        else:
            head = f"command exited with code {self.exit_code} after {self.duration:.1f} s"
        return f"{head}\n--- stderr (tail) ---\n{self.stderr}\n--- stdout (tail) ---\n{self.stdout}"


class Tail:
    """The last `limit` bytes of a stream."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= self.limit:
            self.size -= len(self.chunks.popleft())

    def text(self) -> str:
        return b"".join(self.chunks)[-self.limit :].decode("utf-8", errors="replace")


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()  # no new claims
        self.kill_now = asyncio.Event()  # running commands are killed and their tasks released
        headers = {"Authorization": f"Bearer {config.key}"} if config.key else {}
        self.http = httpx.AsyncClient(
            base_url=config.server.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(CLAIM_WAIT_SECONDS + 30, connect=10),
        )
        self.completed = 0
        self.failed = 0

    # --- lifecycle ---

    def stop(self) -> None:
        """First call: finish running commands within the grace period. Second: kill them now."""
        if self.stopping.is_set():
            log.warning("stopping now: killing running commands and releasing their tasks")
            self.kill_now.set()
            return
        log.info(
            "stopping: no new tasks; waiting up to %gs for running ones", self.config.grace_seconds
        )
        self.stopping.set()
        asyncio.get_running_loop().call_later(self.config.grace_seconds, self.kill_now.set)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            slots = [asyncio.create_task(self._slot(n)) for n in range(self.config.concurrency)]
            results = await asyncio.gather(*slots, return_exceptions=True)
            await self._release_leftovers()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.http.aclose()
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            log.error("worker stopped on an error: %s", error)
        log.info("worker stopped: %d completed, %d failed", self.completed, self.failed)
        return 1 if errors else 0

    async def _slot(self, number: int) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                task = await self._claim()
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                log.warning(
                    "cannot reach %s (%s); retrying in %.0fs", self.config.server, exc, backoff
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            except ServerError as exc:
                if exc.code not in ("RATE_LIMITED", "UNAVAILABLE", "INTERNAL_ERROR"):
                    self.stopping.set()  # a bad key or bad flags: no slot can do better
                    raise
                log.warning("claim refused (%s); retrying in %.0fs", exc, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if task is None:
                continue
            if self.stopping.is_set():
                await self._send(RELEASE, id=task["id"], worker=self.config.worker_id)
                return
            log.info("slot %d: running task %s", number, task["id"])
            await self._work(task)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    async def _claim(self) -> dict[str, Any] | None:
        """A waiting claim, abandoned when the worker stops (the server then takes no task)."""
        claim = asyncio.ensure_future(
            self._gql(
                CLAIM,
                dir=self.config.work_directory,
                worker=self.config.worker_id,
                lease=self.config.lease_seconds,
                wait=CLAIM_WAIT_SECONDS,
            )
        )
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not claim.done():
            claim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim
            return None
        task: dict[str, Any] | None = claim.result()["claimTask"]
        return task

    # --- one task ---

    async def _work(self, task: dict[str, Any]) -> None:
        lost = asyncio.Event()
        beats = asyncio.create_task(self._heartbeats(task["id"], lost))
        try:
            outcome = await self._execute(task, lost)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        worker = self.config.worker_id
        if lost.is_set():
            log.warning("task %s was taken away (cancelled or lease lost); dropped", task["id"])
        elif outcome.stopped:
            await self._send(RELEASE, id=task["id"], worker=worker)
            log.info("task %s released for another worker", task["id"])
        elif outcome.exit_code == 0 and not outcome.timed_out:
            await self._send(COMPLETE, id=task["id"], worker=worker, result=outcome.as_result())
            self.completed += 1
            log.info("task %s completed in %.1f s", task["id"], outcome.duration)
        else:
            error = outcome.as_error(self.config.timeout)
            await self._send(FAIL, id=task["id"], worker=worker, error=error)
            self.failed += 1
            log.info("task %s failed: %s", task["id"], error.partition("\n")[0])

    async def _execute(self, task: dict[str, Any], lost: asyncio.Event) -> Outcome:
        started = time.monotonic()
        env = {**os.environ, "TASKORCH_PROMPT": task["prompt"], "TASKORCH_TASK_ID": task["id"]}
        env.pop("TASKORCH_REVIEW_FEEDBACK", None)  # only ever this task's own
        if task.get("reviewFeedback") is not None:
            # A reviewer rejected the last attempt: the next one is told why.
            env["TASKORCH_REVIEW_FEEDBACK"] = task["reviewFeedback"]
        try:
            process = await asyncio.create_subprocess_exec(
                *self.config.command,
                cwd=task["workDirectory"],
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout kills its children too
            )
        except OSError as exc:
            return Outcome(None, time.monotonic() - started, "", f"cannot start the command: {exc}")
        out, err = Tail(), Tail()
        shipper = None
        if self.config.ship_logs:
            shipper = LogShipper(self.http, task["id"], self.config.worker_id)
            shipper.start()
        io = [
            asyncio.create_task(_feed(process, task["prompt"].encode())),
            asyncio.create_task(_drain(process.stdout, out, shipper, "stdout")),
            asyncio.create_task(_drain(process.stderr, err, shipper, "stderr")),
        ]
        exited = asyncio.create_task(process.wait())
        interrupt = [asyncio.create_task(self.kill_now.wait()), asyncio.create_task(lost.wait())]
        try:
            await asyncio.wait(
                {exited, *interrupt},
                timeout=self.config.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in interrupt:
                waiter.cancel()
        timed_out = not exited.done() and not self.kill_now.is_set() and not lost.is_set()
        stopped = not exited.done() and not timed_out
        if not exited.done():
            await _kill(process)
        # A leftover child that still holds the pipes open must not hold up the report.
        _, pending = await asyncio.wait(io, timeout=KILL_WAIT_SECONDS)
        for reader in pending:
            reader.cancel()
        if shipper is not None:
            await shipper.close()  # before the task is completed: a final task takes no lines
        return Outcome(
            process.returncode,
            time.monotonic() - started,
            out.text(),
            err.text(),
            timed_out=timed_out,
            stopped=stopped,
        )

    async def _heartbeats(self, task_id: str, lost: asyncio.Event) -> None:
        interval = max(self.config.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._gql(
                    HEARTBEAT,
                    id=task_id,
                    worker=self.config.worker_id,
                    lease=self.config.lease_seconds,
                )
            except ServerError as exc:
                if exc.code in ("CONFLICT", "NOT_FOUND"):
                    lost.set()
                    return
                log.warning("heartbeat for %s refused: %s", task_id, exc)
            except httpx.HTTPError as exc:
                log.warning("heartbeat for %s failed: %s; trying again", task_id, exc)

    async def _release_leftovers(self) -> None:
        """Give back any task still held under our id (e.g. claimed just as a claim was abandoned)."""
        try:
            data = await self._gql(HELD, dir=self.config.work_directory)
        except (ServerError, httpx.HTTPError) as exc:
            log.warning("could not check for tasks still held: %s", exc)
            return
        for edge in data["tasks"]["edges"]:
            if edge["node"]["workerId"] == self.config.worker_id:
                await self._send(RELEASE, id=edge["node"]["id"], worker=self.config.worker_id)

    # --- talking to the server ---

    async def _gql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables})
        if response.status_code >= 500:
            response.raise_for_status()
        try:
            body = response.json()
        except ValueError:
            response.raise_for_status()
            raise
        if body.get("errors"):
            error = body["errors"][0]
            raise ServerError(error.get("extensions", {}).get("code", "ERROR"), error["message"])
        data: dict[str, Any] = body["data"]
        return data

    async def _send(self, query: str, **variables: Any) -> None:
        """A report that must get through: retried while the server cannot be reached."""
        for attempt in range(6):
            try:
                await self._gql(query, **variables)
                return
            except httpx.TransportError as exc:
                log.warning("report failed (%s); retrying", exc)
                await asyncio.sleep(min(2**attempt, 10))
            except ServerError as exc:
                log.warning("server refused the report for task %s: %s", variables.get("id"), exc)
                return
        log.error("gave up reporting on task %s; its lease will expire", variables.get("id"))


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.close()


async def _drain(
    stream: asyncio.StreamReader | None, tail: Tail, shipper: LogShipper | None, name: str
) -> None:
    assert stream is not None
    while chunk := await stream.read(65536):
        tail.add(chunk)
        if shipper is not None:
            shipper.feed(name, chunk)


async def _kill(process: asyncio.subprocess.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_SECONDS):
                await process.wait()
            return


def run_worker(config: WorkerConfig) -> int:
    # httpx logs every request at INFO; the worker's own INFO lines are task starts and ends.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return asyncio.run(Worker(config).run())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default="http://127.0.0.1:8080", help="server URL (default %(default)s)"
    )
    parser.add_argument(
        "--key", default=os.environ.get("TASKORCH_API_KEY"), help="API key (env TASKORCH_API_KEY)"
    )
    parser.add_argument("--work-directory", required=True, help="claim tasks of this directory")
    parser.add_argument(
        "--worker-id", default=f"{socket.gethostname()}-{os.getpid()}", help="default: host-pid"
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="commands run at once (default 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds before a command is killed and failed (default: none, no time limit)",
    )
    parser.add_argument(
        "--lease-seconds", type=int, default=300, help="lease per heartbeat, seconds (default 300)"
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="on Ctrl-C/SIGTERM, wait this long for running commands before killing them and"
        " releasing their tasks (default 30; a second signal kills at once)",
    )
    parser.add_argument(
        "--no-logs",
        action="store_true",
        help="do not send the command's output lines to the task's log (appendTaskLog), nor its"
        " '::progress FRACTION [MESSAGE]' lines as progress",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")


def command_from_args(args: argparse.Namespace) -> WorkerConfig | str:
    """The worker's configuration, or what is wrong with the flags."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        from api.invocation import command as taskorch

        return f"give the command to run after --, e.g. {taskorch()} work ... -- claude -p"
    if not args.work_directory.startswith("/"):
        return "--work-directory must be an absolute path"
    if args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.timeout is not None and args.timeout <= 0:
        return "--timeout must be a positive number of seconds"
    if not 1 <= args.lease_seconds <= 86400:
        return "--lease-seconds must be from 1 to 86400"
    if args.grace_seconds < 0:
        return "--grace-seconds must be 0 or more"
    return WorkerConfig(
        server=args.server,
        work_directory=args.work_directory,
        worker_id=args.worker_id,
        command=command,
        key=args.key or None,
        concurrency=args.concurrency,
        timeout=args.timeout,
        lease_seconds=args.lease_seconds,
        grace_seconds=args.grace_seconds,
        ship_logs=not args.no_logs,
    )
