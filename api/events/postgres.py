"""The cross-process event bus: PostgreSQL LISTEN/NOTIFY says the stamper positioned events, the
history table says which, so every replica dispatches every committed event in id order, once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import asyncpg

from api.core.domain import EventFilter, TaskEvent
from api.events.bus import LocalBus, cancelled
from api.store.pg_schema import close_dedicated

log = logging.getLogger("taskorch.events")

CHANNEL = "taskorch_events"
DIRECTORY_CHANNEL = "taskorch_directories"  # payload: a work directory whose controls changed
LOGS_CHANNEL = "taskorch_logs"  # a task's log grew; the payload is its id (api/store/sql.py)
PAGE = 1000


class EventSource(Protocol):
    async def events_after(self, after: int, where: EventFilter, limit: int) -> list[TaskEvent]: ...

    async def last_event_id(self) -> int: ...


class PostgresBus(LocalBus):
    """A notification only wakes the reader; the reader takes every event after the last one it
    dispatched from the history table. Only positioned rows are read, and positions are given
    gap-free in increasing order, so reading up to the highest one never skips one, and a
    reconnect catches up the same way."""

    def __init__(
        self,
        url: str,
        store: EventSource,
        *,
        reconnect_delay: float = 0.1,
        reconnect_max: float = 5.0,
        check_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self._url = url
        self._store = store
        self._reconnect_delay = reconnect_delay
        self._reconnect_max = reconnect_max
        self._check_interval = check_interval
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()  # one announcement at a time on the listening connection
        self.last_seen = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the listening connection (operators may look for it)."""
        return self._conn.get_server_pid() if self.connected and self._conn else None

    async def start(self) -> None:
        # LISTEN before reading the high-water mark: an event committed in between is then both
        # announced and after the mark, so it is read; nothing older has a subscriber yet.
        await self._connect()
        self.last_seen = await self._store.last_event_id()
        self._runner = asyncio.create_task(self._run(), name="taskorch-postgres-bus")

    async def stop(self) -> None:
        await cancelled(self._runner)
        self._runner = None
        await self._disconnect()
        await super().stop()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._url, server_settings={"application_name": "taskorch-listener"}
        )
        try:
            await conn.add_listener(CHANNEL, self._notified)
            await conn.add_listener(DIRECTORY_CHANNEL, self._announced)
            await conn.add_listener(LOGS_CHANNEL, self._logs_notified)
        except BaseException:  # a stop arriving now must not leave the connection open
            conn.terminate()
            raise
        conn.add_termination_listener(self._lost)
        self._conn = conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        await close_dedicated(conn)

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _announced(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if isinstance(payload, str):
            self.wake_all(payload)

    async def announce(self, work_directory: str) -> None:
        self.wake_all(work_directory)
        conn = self._conn
        if conn is None or conn.is_closed():
            return  # waiting claims held back re-check their directory on their own, in time
        try:
            async with self._sending:
                await conn.execute("SELECT pg_notify($1, $2)", DIRECTORY_CHANNEL, work_directory)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not announce a change of %s: %s", work_directory, exc)

    def _logs_notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Missed while disconnected? Log readers also poll the table now and then.
        self.wake_log_readers(str(payload))

    def _lost(self, conn: object) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self.connected:
                await self._reconnect()
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives as
            # the wake-up does, and the bus could then never be stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._catch_up()
            except Exception:
                log.exception("reading events failed; retrying")
                await asyncio.sleep(self._reconnect_delay)
                self._wake.set()

    async def _reconnect(self) -> None:
        """Reconnect with growing pauses, then fill the gap from the history table."""
        await self._disconnect()
        delay = self._reconnect_delay
        while True:
            log.warning("event listener connection lost; reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("event listener could not reconnect: %s", exc)
                delay = min(delay * 2, self._reconnect_max)
                continue
            log.info("event listener reconnected; catching up after event %d", self.last_seen)
            self._wake.set()
            return

    async def _catch_up(self) -> None:
        while True:
            events = await self._store.events_after(self.last_seen, EventFilter(), PAGE)
            if not events:
                return
            self.last_seen = events[-1].id
            self.dispatch(events)
            if len(events) < PAGE:
                return
