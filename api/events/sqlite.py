"""Events across server processes that share one SQLite file: after each commit a process sends a
datagram to its peers; a peer then reads what changed from the history table. SQLite commits one
writer at a time and numbers history rows in commit order, so reading by id never skips one."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from api.core.domain import EventFilter, TaskEvent
from api.events.bus import LocalBus, cancelled
from api.store.base import TaskStore

log = logging.getLogger("taskorch.events")

PAGE = 1000
# Datagrams between peers: "!" a commit happened; "d<work directory>" a directory's controls
# changed; "L<task id>" a task's log grew.
COMMITTED = b"!"
ANNOUNCE = b"d"
LOGS = b"L"
MAX_MESSAGE = 4096  # a work directory is at most 512 characters
SAFETY_INTERVAL = 1.0  # a datagram can be missed (a peer that started a moment ago); read anyway


def peer_directory(database_path: str) -> Path:
    """Where the processes serving one database file find each other (short: socket paths are)."""
    digest = hashlib.sha256(os.path.abspath(database_path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"taskorch-{digest}"


class SqliteBus(LocalBus):
    """This process's own commits are dispatched straight away when they follow the last event it
    dispatched; anything else (a peer committed in between) is read from the table, in id order."""

    def __init__(self, store: TaskStore, database_path: str) -> None:
        super().__init__()
        self._store = store
        self._directory = peer_directory(database_path)
        self._socket: socket.socket | None = None
        self._address = ""
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.last_seen = 0

    async def start(self) -> None:
        self._directory.mkdir(mode=0o700, exist_ok=True)
        self._address = str(self._directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(self._address)
        self._socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.last_seen = await self._store.last_event_id()
        self._store.listen(self._committed)
        self._runner = asyncio.create_task(self._run(), name="taskorch-sqlite-bus")

    async def stop(self) -> None:
        await cancelled(self._runner)
        self._runner = None
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address)
        await super().stop()

    def _committed(self, events: Sequence[TaskEvent]) -> None:
        if events and events[0].id == self.last_seen + 1:
            self.last_seen = events[-1].id
            self.dispatch(events)
        else:
            self._wake.set()
        self._tell_peers()

    async def announce(self, work_directory: str) -> None:
        self.wake_all(work_directory)
        self._tell_peers(ANNOUNCE + work_directory.encode())

    def logs_appended(self, task_id: str) -> None:
        super().logs_appended(task_id)
        self._tell_peers(LOGS + task_id.encode())

    def _tell_peers(self, message: bytes = COMMITTED) -> None:
        if self._socket is None:
            return
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            return
        for name in names:
            address = str(self._directory / name)
            if address == self._address:
                continue
            try:
                self._socket.sendto(message, address)
            except BlockingIOError:
                pass  # its queue is full: it has been told already
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):  # a process that died
                    with contextlib.suppress(OSError):
                        os.unlink(address)

    def _readable(self) -> None:
        assert self._socket is not None
        events = False
        with contextlib.suppress(BlockingIOError):
            while message := self._socket.recv(MAX_MESSAGE):
                if message.startswith(ANNOUNCE):
                    self.wake_all(message[len(ANNOUNCE) :].decode(errors="replace"))
                elif message.startswith(LOGS):
                    self.wake_log_readers(message[len(LOGS) :].decode(errors="replace"))
                else:
                    events = True
        if events:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: it never loses a cancel
                async with asyncio.timeout(SAFETY_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._catch_up()
            except Exception:
                log.exception("reading events from the history table failed; retrying")

    async def _catch_up(self) -> None:
        while True:
            events = await self._store.events_after(self.last_seen, EventFilter(), PAGE)
            # this process may have dispatched some of them itself while the read was in flight
            fresh = [e for e in events if e.id > self.last_seen]
            if fresh:
                self.last_seen = fresh[-1].id
                self.dispatch(fresh)
            if len(events) < PAGE:
                return
