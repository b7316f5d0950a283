"""The SQLite writer: one connection, one thread, every write in order, waiting writes committed
together, with the history rows they owe written in one statement per commit."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from api.core.domain import TaskEvent
from api.store.rows import Pending

log = logging.getLogger("taskorch.store")

T = TypeVar("T")

# A unit of work: runs on the writer thread with the connection, returns its value and the history
# rows it owes. Raising rolls back only this unit (a savepoint), never its neighbours in the batch.
Work = Callable[[sqlite3.Connection], tuple[T, Sequence[Pending]]]
# Writes history rows, in order, and returns their events (with their ids).
Record = Callable[[sqlite3.Connection, Sequence[Pending]], list[TaskEvent]]

MAX_BATCH = 512
# How long a commit waits for the other processes' writers before it goes on to SQLite's own lock
# (which then waits out its busy timeout, or fails, as without this lock).
TURN_WAIT_SECONDS = 10.0
TURN_POLL_SECONDS = 0.0002


@dataclass(slots=True)
class _Job(Generic[T]):
    work: Work[T]
    future: asyncio.Future[T]
    reads_history: bool


# A job, and its value or the exception it raised.
_Outcome = tuple[_Job[Any], Any, BaseException | None]


class Writer:
    """Group commit: the thread takes every job waiting in the queue, runs each in a savepoint of one
    transaction, writes the history rows the jobs owe (in job order, so event ids follow the order
    of the changes), commits once, then resolves the callers' futures on their event loop.

    One fsync then covers many writes, which is what makes durability=full affordable; one history
    statement per commit instead of one per change is what keeps the writer thread's share small."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        record: Record,
        on_commit: Callable[[Sequence[TaskEvent]], None],
        turn_path: str | None = None,
    ) -> None:
        self._connect = connect
        self._turn_path = turn_path
        self._record = record
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name="taskorch-sqlite-writer", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def run(self, work: Work[T], *, reads_history: bool = False) -> T:
        """Run `work` in the next commit. A job that `reads_history` (or deletes it) runs after the
        history owed by the jobs before it in that commit is written."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("the SQLite writer is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Job(work, future, reads_history))
        return await future

    def _open(self) -> tuple[sqlite3.Connection, int | None]:
        """The writer's connection and its turn file (None: no turns to take)."""
        conn = self._connect()
        try:
            turn = (
                os.open(self._turn_path, os.O_RDWR | os.O_CREAT, 0o644) if self._turn_path else None
            )
        except BaseException:
            conn.close()
            raise
        return conn, turn

    def _run(self) -> None:
        try:
            conn, turn = self._open()
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                batch: list[_Job[Any]] = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    batch.append(job)
                with _turn(turn):
                    outcomes, events = self._commit(conn, batch)
                # Delivered once the turn is given back: the other processes need not wait on it.
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver, outcomes, events)
        finally:
            conn.close()
            if turn is not None:
                os.close(turn)

    def _commit(
        self, conn: sqlite3.Connection, batch: list[_Job[Any]]
    ) -> tuple[list[_Outcome], list[TaskEvent]]:
        """Run the batch in one transaction: each job's outcome, and the events committed."""
        outcomes: list[_Outcome] = []
        events: list[TaskEvent] = []
        owed: list[Pending] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if job.reads_history and owed:
                    events.extend(self._record(conn, owed))
                    owed = []
                conn.execute("SAVEPOINT job")
                try:
                    value, pending = job.work(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, value, None))
                    owed.extend(pending)
            if owed:
                events.extend(self._record(conn, owed))
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN, history or COMMIT failed: nothing is stored
            log.error("sqlite write batch failed", exc_info=exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(job, None, exc) for job in batch]
            events = []
        return outcomes, events

    def _deliver(self, outcomes: list[_Outcome], events: list[TaskEvent]) -> None:
        # Publish before waking callers, so a subscriber sees a change no later than its author.
        if events:
            try:
                self._on_commit(events)
            except Exception:
                log.exception("commit listener failed")
        for job, value, error in outcomes:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)


@contextlib.contextmanager
def _turn(fd: int | None) -> Iterator[None]:
    """Hold the writers' turn lock of the database file for one commit.

    Server processes sharing a file would otherwise meet at SQLite's write lock, whose busy
    handler sleeps 1, 2, 5, 10 ... 100 ms between attempts: a process that found the file busy
    slept through most of the other's commits. Taking turns at a lock file beside the database
    hands the file over within a fraction of a millisecond. The lock is advisory and only taskorch
    servers take it; SQLite's own locking still decides who may write."""
    if fd is None:
        yield
        return
    deadline = time.monotonic() + TURN_WAIT_SECONDS
    held = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(TURN_POLL_SECONDS)
    try:
        yield
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
