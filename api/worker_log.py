"""The worker's log shipper: a command's output lines sent to its task's log in batches, and
`::progress` lines sent as progress reports, without ever making the command wait."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from typing import Any

import httpx

from api.core.domain import MAX_LOG_LINE_BYTES, MAX_LOG_LINES_PER_CALL, MAX_PROGRESS_MESSAGE

log = logging.getLogger("taskorch.worker")

# A line waits at most this long before it is sent ... (each send is a request the server pays
# for like a heartbeat; 100 workers sending every 2 s cost the lifecycle about 9 %: README)
FLUSH_SECONDS = 2.0
FLUSH_LINES = 100  # ... or until this many are waiting
MAX_PENDING = 10_000  # lines held while the server is slow or away; older ones are dropped
CLOSE_SECONDS = 10.0  # what is left when the command ends is sent within this, or dropped
STDERR_PREFIX = "[stderr] "
# A line `::progress 0.4 compiling` (a fraction from 0 to 1, then an optional message).
PROGRESS_LINE = re.compile(r"^::progress\s+([0-9]*\.?[0-9]+)(?:\s+(.*))?$")

RETRIED = ("RATE_LIMITED", "UNAVAILABLE", "INTERNAL_ERROR")


class Refused(Exception):
    """The server will not take more (the task is no longer held)."""


def clip(line: bytes) -> str:
    """A line as text of at most MAX_LOG_LINE_BYTES of UTF-8, NUL characters replaced."""
    text = line.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    encoded = text.encode()
    if len(encoded) <= MAX_LOG_LINE_BYTES:
        return text
    marker = " [line cut]"
    return encoded[: MAX_LOG_LINE_BYTES - len(marker)].decode(errors="ignore") + marker


class LogShipper:
    """Collects lines from `feed` (called as output arrives) and sends them from its own task,
    over REST v1: a thin route costs the server about a third of a GraphQL mutation."""

    def __init__(self, http: httpx.AsyncClient, task_id: str, worker_id: str) -> None:
        self._http = http
        self._task_id = task_id
        self._worker_id = worker_id
        self._pending: collections.deque[str] = collections.deque()
        self._partial: dict[str, bytes] = {}
        self._dropped = 0
        self._progress: tuple[float, str | None] | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._refused = False
        self._runner: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    def feed(self, stream: str, chunk: bytes) -> None:
        """Output of `stream` ("stdout" or "stderr"); whole lines are queued, the rest kept."""
        data = self._partial.pop(stream, b"") + chunk
        *lines, rest = data.split(b"\n")
        if len(rest) > MAX_LOG_LINE_BYTES:  # a line with no end yet: cut it now (bounded memory)
            lines.append(rest)
            rest = b""
        if rest:
            self._partial[stream] = rest
        for line in lines:
            self._line(stream, line.removesuffix(b"\r"))

    def _line(self, stream: str, raw: bytes) -> None:
        text = clip(raw)
        if stream == "stdout" and (found := PROGRESS_LINE.match(text)):
            fraction = float(found[1])
            if fraction <= 1:
                self._progress = (fraction, (found[2] or None) and found[2][:MAX_PROGRESS_MESSAGE])
                self._ready.set()
                return
        if stream == "stderr":
            text = clip((STDERR_PREFIX + text).encode())
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append(text)
        if len(self._pending) >= FLUSH_LINES:
            self._ready.set()

    async def close(self) -> None:
        """The command ended: send what is left (its last partial lines too), then stop."""
        for stream, rest in list(self._partial.items()):
            self._line(stream, rest)
        self._partial.clear()
        self._closing = True
        self._ready.set()
        if self._runner is None:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await asyncio.shield(self._runner)
        except TimeoutError:
            log.warning("task %s: %d log lines not sent in time", self._task_id, len(self._pending))
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        while not self._refused:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_SECONDS):
                        await self._ready.wait()
            self._ready.clear()
            try:
                await self._flush()
            except Refused:
                self._refused = True
                self._pending.clear()
                return
            except (httpx.HTTPError, RuntimeError) as exc:
                log.warning(
                    "task %s: sending log lines failed (%s); trying again", self._task_id, exc
                )
                await asyncio.sleep(FLUSH_SECONDS)  # lines keep queueing (bounded) meanwhile
                continue
            if self._closing and not self._pending and self._progress is None:
                return

    async def _flush(self) -> None:
        if self._progress is not None:
            fraction, message = self._progress
            await self._call("progress", progress=fraction, message=message)
            if self._progress == (fraction, message):
                self._progress = None
        while self._pending:
            batch = [
                self._pending[n] for n in range(min(len(self._pending), MAX_LOG_LINES_PER_CALL))
            ]
            if self._dropped:
                batch = [f"[{self._dropped} lines dropped: the server could not keep up]", *batch]
                batch = batch[:MAX_LOG_LINES_PER_CALL]
            await self._call("logs", lines=batch)
            sent = len(batch) - (1 if self._dropped else 0)
            self._dropped = 0
            for _ in range(sent):
                self._pending.popleft()
            self.sent += sent

    async def _call(self, action: str, **body: Any) -> None:
        response = await self._http.post(
            f"/api/v1/tasks/{self._task_id}/{action}", json={"worker_id": self._worker_id, **body}
        )
        if response.status_code == 200:
            return
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = f"HTTP {response.status_code}"
        if code in RETRIED or response.status_code >= 500:
            raise RuntimeError(code)
        raise Refused(code)  # the task is gone, or the server will never take these lines
