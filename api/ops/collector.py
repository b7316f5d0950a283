"""When the server's cyclic garbage collector makes its full passes: on a clock, not on heap growth.

Every socket holds about 250 objects the collector tracks (the ASGI stack's coroutines, the
protocol, Strawberry's handler, the subscription), so 1,000 subscribers make a heap of ~300,000.
CPython makes a full pass each time the long-lived heap grows by a quarter: six passes while 1,000
sockets connect, each holding the event loop for 150-550 ms on 2 cores, and a fan-out caught by
one reaches its last subscriber that much later. The server keeps the young generations as they
are (they find most cyclic garbage, in a few milliseconds), freezes what startup built (the
schema, the modules: never garbage, never traversed again) and makes the full pass itself, at most
once a minute, when a young pass ran since the last one. What it costs: cyclic garbage that
outlived two young passes waits for the next full one; after 1,000 sockets connected that was
~7,500 objects (about 7 a socket), and collecting them left the RSS where it was (128 MB)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

log = logging.getLogger("taskorch.collector")

FULL_PASS_INTERVAL = 60.0  # seconds: cyclic garbage that reached the old generation waits this long
NEVER = 2**31 - 1  # young passes before CPython would consider a full pass itself: never


class Collector:
    """Full passes for one server process, from `start()` (once startup is done) to `stop()`."""

    def __init__(self, interval: float = FULL_PASS_INTERVAL) -> None:
        self.interval = interval
        self.thresholds: tuple[int, int, int] | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.thresholds is not None:
            return
        gc.collect()  # startup's garbage is freed, not frozen
        gc.freeze()
        young, middle, old = gc.get_threshold()
        self.thresholds = (young, middle, old)
        gc.set_threshold(young, middle, NEVER)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="taskorch-collector")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.thresholds is not None:
            gc.set_threshold(*self.thresholds)
            gc.unfreeze()
            self.thresholds = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # Young passes since the last full one; none means nothing can have been promoted.
            if gc.get_count()[2]:
                started = time.perf_counter()
                found = gc.collect(2)
                elapsed = (time.perf_counter() - started) * 1000
                log.debug("full collection: %d unreachable objects, %.0f ms", found, elapsed)
