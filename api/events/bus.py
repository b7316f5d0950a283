"""The event bus: committed status changes fanned out to subscribers, and wake-ups for waiting claims.

`LocalBus` serves one process. A cross-process bus (PostgreSQL LISTEN/NOTIFY) subclasses it and feeds
`dispatch` with events committed anywhere, so callers never assume they share a process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from api.core.domain import EventFilter, TaskEvent, TaskStatus
from api.core.errors import TaskorchError

log = logging.getLogger("taskorch.events")


class SlowSubscriber(TaskorchError):
    code = "SLOW_SUBSCRIBER"
    http_status = 409


def slow_subscriber(buffer: int, resume_after: int) -> SlowSubscriber:
    return SlowSubscriber(
        f"this subscription fell more than {buffer} events behind and was closed;"
        f' subscribe again with after: "{resume_after}" to resume without missing events',
        details={"resumeAfter": str(resume_after)},
    )


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, where: EventFilter, buffer: int) -> Subscription: ...

    def waiter(self, work_directory: str) -> Waiter: ...

    async def announce(self, work_directory: str) -> None:
        """The directory's controls changed: wake its waiting claims in every process."""
        ...

    def watch_logs(self, task_id: str) -> LogWatch: ...

    def logs_appended(self, task_id: str) -> None:
        """This process stored log lines of the task: wake its readers, here and elsewhere."""

    @property
    def subscriber_count(self) -> int: ...


class Subscription:
    """One subscriber's live events: a bounded buffer. Overflow closes it instead of slowing anyone."""

    def __init__(self, bus: LocalBus, where: EventFilter, buffer: int) -> None:
        self._bus = bus
        self.where = where
        self._buffer = buffer
        self._events: collections.deque[TaskEvent] = collections.deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.resume_after: int | None = None
        self.closed = False

    def push(self, event: TaskEvent) -> None:
        if self.overflowed or not self.where.matches(event):
            return
        if len(self._events) >= self._buffer:
            self.overflowed = True
            # Everything before the oldest undelivered event reached the subscriber.
            self.resume_after = (self._events[0].id if self._events else event.id) - 1
            self._events.clear()  # free the memory now; the subscriber resumes from the history table
        else:
            self._events.append(event)
        self._ready.set()

    async def next(self) -> TaskEvent:
        while not self._events:
            if self.overflowed:
                raise slow_subscriber(self._buffer, self.resume_after or 0)
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._subscriptions.discard(self)
            self._events.clear()


class Waiter:
    """A claim waiting for work in one directory. Woken at most once; a wake it did not use (it
    claimed something else, timed out or went away at that moment) is handed to the next waiter."""

    def __init__(self, bus: LocalBus, work_directory: str) -> None:
        self._bus = bus
        self.work_directory = work_directory
        self._event = asyncio.Event()
        self._used = False
        # Set by a claim its directory's controls held back (paused, or at its cap): such a claim
        # also wakes when a task of the directory leaves WORKING, since that frees a place.
        self.held_back = False

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):  # not wait_for, which can lose a cancellation
                await self._event.wait()
        except TimeoutError:
            return False
        self._used = True
        return True

    def close(self) -> None:
        queue = self._bus._waiters.get(self.work_directory)
        if queue is not None and self in queue:
            queue.remove(self)
            if not queue:
                del self._bus._waiters[self.work_directory]
        elif self._event.is_set() and not self._used:
            self._bus.wake(self.work_directory, 1)


class LogWatch:
    """A reader of one task's log, woken when lines are appended or the task changes status
    (anywhere the bus hears of it). A wake between `arm` and `wait` is kept, never lost."""

    def __init__(self, bus: LocalBus, task_id: str) -> None:
        self._bus = bus
        self.task_id = task_id
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    def arm(self) -> None:
        """Call before reading the log: wakes after this make the next `wait` return at once."""
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        watches = self._bus._log_watches.get(self.task_id)
        if watches is not None:
            watches.discard(self)
            if not watches:
                del self._bus._log_watches[self.task_id]


async def cancelled(runner: asyncio.Task[None] | None) -> None:
    """Cancel a bus's background task and wait until it has ended."""
    if runner is not None:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


class LocalBus:
    """In-process bus. `dispatch` must be called with committed events in event-id order."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._waiters: dict[str, collections.deque[Waiter]] = {}
        self._log_watches: dict[str, set[LogWatch]] = {}
        self._stopped = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._stopped = True
        for queue in self._waiters.values():
            for waiter in queue:
                waiter.wake()
        self._waiters.clear()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, where: EventFilter, buffer: int) -> Subscription:
        subscription = Subscription(self, where, buffer)
        self._subscriptions.add(subscription)
        return subscription

    def waiter(self, work_directory: str) -> Waiter:
        waiter = Waiter(self, work_directory)
        self._waiters.setdefault(work_directory, collections.deque()).append(waiter)
        return waiter

    def watch_logs(self, task_id: str) -> LogWatch:
        watch = LogWatch(self, task_id)
        self._log_watches.setdefault(task_id, set()).add(watch)
        return watch

    def logs_appended(self, task_id: str) -> None:
        self.wake_log_readers(task_id)

    def wake_log_readers(self, task_id: str) -> None:
        for watch in self._log_watches.get(task_id, ()):
            watch.wake()

    def wake(self, work_directory: str, count: int) -> None:
        queue = self._waiters.get(work_directory)
        while queue and count > 0:
            queue.popleft().wake()
            count -= 1
        if queue is not None and not queue:
            del self._waiters[work_directory]

    def wake_held_back(self, work_directory: str, count: int) -> None:
        queue = self._waiters.get(work_directory)
        for waiter in [w for w in queue or () if w.held_back][:count]:
            queue.remove(waiter)  # type: ignore[union-attr]
            waiter.wake()
        if queue is not None and not queue:
            del self._waiters[work_directory]

    def wake_all(self, work_directory: str) -> None:
        queue = self._waiters.get(work_directory)
        if queue is not None:
            self.wake(work_directory, len(queue))

    async def announce(self, work_directory: str) -> None:
        self.wake_all(work_directory)

    def dispatch(self, events: Sequence[TaskEvent]) -> None:
        for subscription in list(self._subscriptions):
            for event in events:
                subscription.push(event)
        if self._log_watches:  # a log reader ends when its task does
            for event in events:
                self.wake_log_readers(event.task_id)
        self._wake_for(events)

    def _wake_for(self, events: Sequence[TaskEvent]) -> None:
        ready: collections.Counter[str] = collections.Counter()
        freed: collections.Counter[str] = collections.Counter()
        loop = asyncio.get_running_loop()
        now = loop.time()
        for event in events:
            if (
                event.previous_status is TaskStatus.WORKING
                and event.status is not TaskStatus.WORKING
            ):
                freed[event.work_directory] += 1
            if event.status is not TaskStatus.WAITING:
                continue
            due = _due_in(event)
            if due > 0:
                loop.call_at(now + due, self._wake_later, event.work_directory)
            else:
                ready[event.work_directory] += 1
        for directory, count in ready.items():
            self.wake(directory, count)
        for directory, count in freed.items():
            if directory in self._waiters:
                self.wake_held_back(directory, count)

    def _wake_later(self, work_directory: str) -> None:
        if not self._stopped:
            self.wake(work_directory, 1)


def _due_in(event: TaskEvent) -> float:
    """Seconds until a task that just became WAITING may be claimed (0 when it may be now)."""
    raw = event.details.get("runAfter")
    if not isinstance(raw, str):
        return 0.0
    try:
        due = datetime.fromisoformat(raw)
    except ValueError:
        return 0.0
    return max(0.0, (due - event.at).total_seconds())
