"""The PostgreSQL history stamper: while this process holds the stamper lock it gives committed
history rows their delivery positions (the event ids every replica reads); every other process
keeps trying the lock, so a stamper that dies is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from api.store.pg_schema import STAMP, STAMPER_LOCK, close_dedicated

log = logging.getLogger("taskorch.store")

BATCH = 1000
# Rows that committed behind a transaction still running are stamped once it ends; a writer's
# commit wakes the stamper at once, this is for transactions that announce nothing.
BEHIND_POLL = 0.002
# Under load every commit wakes the stamper; a stamp per wake-up would cost a statement, a
# notification and a read on every replica for a row or two. Stamps follow each other at least
# this far apart instead, each taking every row committed meanwhile; the first stamp after a
# quiet moment runs at once.
GATHER = 0.004
IDLE_POLL = 1.0  # notifications can be lost with a connection; an idle check stamps those rows
RETRY = 1.0  # how often a process without the lock tries it, and a lost connection reconnects


class Stamper:
    def __init__(
        self,
        url: str,
        key: int,
        *,
        wake_channel: str,
        event_channel: str,
        retry: float = RETRY,
        idle_poll: float = IDLE_POLL,
    ) -> None:
        self._url = url
        self._key = key
        self._wake_channel = wake_channel
        self._event_channel = event_channel
        self._retry = retry
        self._idle_poll = idle_poll
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._last_stamp = -GATHER
        self.holding = False
        # Set after each stamp of this process; readers waiting for a row's position watch it.
        self.stamped = asyncio.Event()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="taskorch-history-stamper")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        await self._disconnect()

    def wake(self) -> None:
        self._wake.set()

    @property
    def pid(self) -> int | None:
        """The server process id of the stamper's connection (tests terminate it)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self._url, server_settings={"application_name": "taskorch-stamper"}
        )
        try:
            await conn.add_listener(self._wake_channel, self._notified)
        except BaseException:  # a stop arriving now must not leave the connection open
            conn.terminate()
            raise
        conn.add_termination_listener(self._lost)
        return conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self.holding = False
        await close_dedicated(conn)

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _lost(self, conn: object) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception as exc:
                # A lost or confused connection is dropped; the session lock goes with it, so
                # another process may take it now.
                log.warning("history stamper failed (%r); reconnecting", exc)
                await self._disconnect()
                await asyncio.sleep(self._retry)

    async def _step(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self.holding = False
            self._conn = await self._connect()
        conn = self._conn
        if not self.holding:
            self.holding = bool(
                await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", STAMPER_LOCK, self._key)
            )
            if not self.holding:
                await asyncio.sleep(self._retry)  # writers' wake-ups are for the holder
                return
            log.info("this process now stamps history positions")
        self._wake.clear()
        loop = asyncio.get_running_loop()
        gather = self._last_stamp + GATHER - loop.time()
        if gather > 0:
            await asyncio.sleep(gather)
        self._last_stamp = loop.time()
        while True:
            row = await conn.fetchrow(STAMP, BATCH, self._event_channel)
            if row["stamped"]:
                self.stamped.set()
                self.stamped = asyncio.Event()
            if row["stamped"] < BATCH:
                break
        behind = row["unstamped"] > row["stamped"]
        await self._pause(BEHIND_POLL if behind else self._idle_poll)

    async def _pause(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for, which in 3.11 can swallow a cancellation (see the bus).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
