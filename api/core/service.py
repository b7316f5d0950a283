"""Task lifecycle: checks each request, has the domain decide the change and the store apply it."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from api.core import domain, lifecycle, validation
from api.core.domain import (
    Backoff,
    BulkResult,
    Completion,
    DirectoryChanges,
    DirectorySettings,
    EventFilter,
    Task,
    TaskChanges,
    TaskEvent,
    TaskFilter,
    TaskHandle,
    TaskLogLine,
    TaskPage,
    TaskSpec,
    TaskStatus,
    WorkDirectory,
)
from api.core.errors import Conflict, NotFound, ValidationError
from api.events.bus import EventBus, SlowSubscriber, Waiter
from api.store.base import BulkDecide, RefusedDependency, TaskStore

log = logging.getLogger("taskorch.service")

REPLAY_PAGE = 500
BULK_CHUNK = 500  # tasks a bulk change decides on in one transaction
# A claim its directory's controls hold back is woken by a resume or a freed place; it also looks
# again this often, in case that wake-up was lost (a listener reconnecting, say).
HELD_BACK_RECHECK = 2.0
SWEEP_BATCH = 500
LOG_PAGE = 1000  # lines read at a time by a log subscription
# A log reader re-reads the table this often even without a wake-up (one could be missed while a
# replica's listener reconnects).
LOG_POLL_SECONDS = 1.0
MAX_OFFSET = 10_000  # offset paging reads the skipped rows; cursors (`list_tasks`) do not


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Statistics:
    counts: dict[TaskStatus, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, status: TaskStatus) -> int:
        return self.counts.get(status, 0)

    def summary(self) -> dict[str, int]:
        """`total` and one count per status, by the lower-case names every interface uses."""
        return {"total": self.total, **{s.value.lower(): self[s] for s in TaskStatus}}


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def decode_cursor(cursor: str, field: str = "after") -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind == "seq" and 0 <= int(value) <= domain.MAX_INT64:
            return int(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValidationError(field, f"{field} must be a cursor returned by a previous page")


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        bus: EventBus,
        *,
        clock: Callable[[], datetime] = utc_now,
        backoff: Backoff | None = None,
        subscriber_buffer: int = 10_000,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.bus = bus
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._subscriber_buffer = subscriber_buffer
        self._jitter = jitter
        self._background: set[asyncio.Task[Any]] = set()
        self._waiting: set[Waiter] = set()
        self._stopping = False
        # Directories this process last saw paused or capped: their waiting claims also wake
        # when a task leaves WORKING. A hint only; the claim itself reads the controls.
        self._held_back: set[str] = set()

    # --- producers ---

    async def submit(self, spec: TaskSpec) -> Task:
        (task,) = await self._submit([spec], "")
        return task

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[Task]:
        validation.check_batch(specs, "inputs")
        return await self._submit(specs, "inputs[{}].")

    async def _submit(self, specs: Sequence[TaskSpec], prefix: str) -> list[Task]:
        try:
            return await self.store.submit(specs, self._clock())
        except RefusedDependency as refused:
            raise self._refused(refused, prefix) from None

    def _refused(self, refused: RefusedDependency, prefix: str) -> ValidationError:
        field = f"{prefix.format(refused.spec)}depends_on[{refused.index}]"
        if refused.status is None:
            return ValidationError(
                field, f"{field}: no task with id {refused.task_id}; depend on existing tasks"
            )
        return ValidationError(
            field,
            f"{field}: task {refused.task_id} is {refused.status.value}, so the new task could"
            " never run; retry that task first, or leave it out",
        )

    async def update(self, task_id: str, expected_version: int, changes: TaskChanges) -> Task:
        task_id = validation.check_task_id(task_id)
        expected_version = validation.check_version(expected_version)
        task = await self.store.update(task_id, expected_version, changes, self._clock())
        if task is not None:
            return task
        current = await self.get(task_id)
        if current.status not in domain.UPDATABLE:
            raise Conflict(
                f"task {task_id} is {current.status.value}; only WAITING or BLOCKED tasks can be"
                " updated"
            )
        raise Conflict(
            f"task {task_id} is at version {current.version}, not {expected_version}:"
            " read it again and resend the update with expectedVersion"
            f" {current.version}",
            details={"currentVersion": current.version},
        )

    async def cancel(self, task_id: str, reason: str | None = None) -> Task:
        task_id = validation.check_task_id(task_id)
        reason = validation.check_text(reason, "reason", required=False)
        now = self._clock()
        task = await self.store.change(task_id, lambda t: lifecycle.cancel(t, reason, now))
        if task is None:
            current = await self.get(task_id)
            raise Conflict(
                f"task {task_id} is {current.status.value}; only BLOCKED, WAITING, WORKING or"
                " IN_REVIEW tasks can be cancelled"
            )
        return task

    async def retry(self, task_id: str) -> Task:
        task_id = validation.check_task_id(task_id)
        task = await self.store.retry(task_id, self._clock())
        if task is not None:
            return task
        current = await self.get(task_id)
        if current.status in domain.RETRYABLE:
            unfinished = await self.store.unfinished_dependencies(task_id)
            failed = lifecycle.failed_dependency(current, unfinished)
            if failed is not None:
                raise Conflict(
                    f"cannot retry task {task_id}: its dependency {failed} is"
                    f" {unfinished[failed].value}; retry that task first",
                    details={"dependency": failed},
                )
            raise Conflict(f"task {task_id} changed while retrying it; try again")
        raise Conflict(
            f"task {task_id} is {current.status.value}; only FAILED or CANCELLED tasks can be"
            " retried"
        )

    # --- reviewers ---

    async def approve(self, task_id: str, note: str | None = None) -> Task:
        """Accept the result of a task IN_REVIEW: it completes, and its dependents may run."""
        task_id = validation.check_task_id(task_id)
        note = validation.check_text(note, "note", required=False)
        now = self._clock()
        task = await self.store.change(task_id, lambda t: lifecycle.approve(t, note, now))
        return task or await self._not_in_review(task_id, "approve")

    async def reject(self, task_id: str, feedback: str, retry: bool = True) -> Task:
        """Refuse the result of a task IN_REVIEW: another attempt with the feedback, or FAILED."""
        task_id = validation.check_task_id(task_id)
        text = validation.check_text(feedback, "feedback")
        assert text is not None
        retry = validation.check_bool(retry, "retry")
        now = self._clock()
        task = await self.store.change(task_id, lambda t: lifecycle.reject(t, text, retry, now))
        return task or await self._not_in_review(task_id, "reject")

    async def _not_in_review(self, task_id: str, action: str) -> NoReturn:
        current = await self.get(task_id)
        raise Conflict(
            f"cannot {action} task {task_id}: it is {current.status.value}, not IN_REVIEW (only a"
            " completed task that requires a review waits for one)"
        )

    async def cancel_many(self, where: TaskFilter, reason: str | None = None) -> BulkResult:
        """Cancel every task the filter matches that can be cancelled, a chunk per transaction;
        their dependents are cancelled with them."""
        where = validation.bulk_filter(where, domain.CANCELLABLE, "cancel")
        reason = validation.check_text(reason, "reason", required=False)
        return await self._bulk(where, lambda t, _: lifecycle.cancel(t, reason, self._clock()))

    async def retry_many(self, where: TaskFilter) -> BulkResult:
        """Queue again every FAILED or CANCELLED task the filter matches; one with dependencies
        goes back to BLOCKED while they are unfinished, and is skipped while one has failed."""
        where = validation.bulk_filter(where, domain.RETRYABLE, "retry")
        return await self._bulk(where, lambda t, left: lifecycle.retry(t, self._clock(), left))

    async def _bulk(self, where: TaskFilter, decide: BulkDecide) -> BulkResult:
        matched = 0
        changed: list[str] = []
        skipped: list[str] = []
        after = 0
        while True:
            chunk = await self.store.bulk(where, after, BULK_CHUNK, decide)
            matched += len(chunk.ids)
            done = {t.id for t in chunk.changed}
            for task_id in chunk.busy:  # held elsewhere a moment ago: one at a time, waiting
                if await self.store.bulk_one(where, task_id, decide) is not None:
                    done.add(task_id)
            for task_id in chunk.ids:
                (changed if task_id in done else skipped).append(task_id)
            if len(chunk.ids) < BULK_CHUNK:
                return BulkResult(matched, tuple(changed), tuple(skipped))
            after = chunk.last_seq
            await asyncio.sleep(0)  # let other requests in between chunks

    # --- work directories ---

    async def configure_directory(
        self, work_directory: str, changes: DirectoryChanges
    ) -> WorkDirectory:
        """Set a directory's cap and pause; waiting claims of it wake in every process."""
        work_directory = validation.check_work_directory(work_directory)
        settings = await self.store.configure(work_directory, changes, self._clock())
        self._note(settings)
        await self.bus.announce(work_directory)
        (found,) = await self.store.directories(work_directory) or [WorkDirectory(settings, {})]
        return found

    async def directories(self, work_directory: str | None = None) -> list[WorkDirectory]:
        """Every known work directory (configured or holding tasks), or only the one named."""
        if work_directory is not None:
            work_directory = validation.check_work_directory(work_directory)
            return await self.store.directories(work_directory) or [
                WorkDirectory(DirectorySettings(work_directory), {})
            ]
        return await self.store.directories()

    # --- workers ---

    async def claim(
        self,
        work_directory: str,
        worker_id: str,
        *,
        limit: int = 1,
        lease_seconds: int | None = None,
        wait_seconds: float | None = None,
    ) -> list[Task]:
        """Claim up to `limit` tasks, waiting up to `wait_seconds` for the first one to appear."""
        work_directory = validation.check_work_directory(work_directory)
        worker_id = validation.check_worker_id(worker_id)
        limit = validation.check_page_size(limit, "limit", domain.MAX_BATCH)
        lease = validation.check_lease_seconds(lease_seconds)
        wait = validation.check_wait_seconds(wait_seconds)
        if wait == 0 or self._stopping:
            return await self._claim_now(work_directory, worker_id, limit, lease)
        deadline = time.monotonic() + wait
        while True:
            # Register before trying, so a submit between the try and the wait still wakes us.
            waiter = self.bus.waiter(work_directory)
            waiter.held_back = work_directory in self._held_back
            self._waiting.add(waiter)
            try:
                tasks = await self._claim_now(work_directory, worker_id, limit, lease)
                remaining = deadline - time.monotonic()
                if tasks or remaining <= 0 or self._stopping:
                    return tasks
                settings = await self.store.directory(work_directory)
                self._note(settings)
                if settings.restricts:
                    waiter.held_back = True
                    remaining = min(remaining, HELD_BACK_RECHECK)
                due = await self.store.next_run_after(work_directory, self._clock())
                if due is not None:
                    remaining = min(remaining, max(0.0, (due - self._clock()).total_seconds()))
                await waiter.wait(remaining)
            finally:
                self._waiting.discard(waiter)
                waiter.close()

    def _note(self, settings: DirectorySettings) -> None:
        if settings.restricts:
            self._held_back.add(settings.work_directory)
        else:
            self._held_back.discard(settings.work_directory)

    def stop_waiting(self) -> None:
        """The server is shutting down: waiting claims answer now with what they have (usually
        nothing), and later ones do not wait, so in-flight requests finish within the grace period."""
        self._stopping = True
        for waiter in list(self._waiting):
            waiter.wake()

    async def _claim_now(
        self, work_directory: str, worker_id: str, limit: int, lease: int
    ) -> list[Task]:
        now = self._clock()
        pending = asyncio.ensure_future(
            self.store.claim(work_directory, worker_id, limit, now + timedelta(seconds=lease), now)
        )
        try:
            # Shielded: if the caller goes away mid-claim, the claim still finishes and is released.
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            self._spawn(self._release_abandoned(pending, worker_id))
            raise

    async def _release_abandoned(self, pending: asyncio.Future[list[Task]], worker_id: str) -> None:
        try:
            tasks = await pending
        except Exception:
            return
        for task in tasks:
            log.info("releasing task %s: its claimer went away", task.id)
            await self.store.release(task.id, worker_id, self._clock())

    async def heartbeat(self, task_id: str, worker_id: str, lease_seconds: int | None) -> Task:
        task_id = validation.check_task_id(task_id)
        worker_id = validation.check_worker_id(worker_id)
        lease = validation.check_lease_seconds(lease_seconds)
        now = self._clock()
        task = await self.store.heartbeat(task_id, worker_id, now + timedelta(seconds=lease), now)
        return task or await self._not_held(task_id, worker_id, "heartbeat")

    async def report_progress(
        self,
        task_id: str,
        worker_id: str,
        progress: float | None = None,
        message: str | None = None,
        lease_seconds: int | None = None,
    ) -> Task:
        """Store how far the holder got (0 to 1) and what it is doing; extends the lease like a
        heartbeat. Not a status change: no history row, no task event."""
        task_id = validation.check_task_id(task_id)
        worker_id = validation.check_worker_id(worker_id)
        progress = validation.check_progress(progress)
        message = validation.check_progress_message(message)
        lease = validation.check_lease_seconds(lease_seconds)
        now = self._clock()
        task = await self.store.report_progress(
            task_id, worker_id, progress, message, now + timedelta(seconds=lease), now
        )
        return task or await self._not_held(task_id, worker_id, "report progress of")

    async def append_logs(self, task_id: str, worker_id: str, lines: object) -> int:
        """Append lines to the log of a held task; the number of the last line stored."""
        task_id = validation.check_task_id(task_id)
        worker_id = validation.check_worker_id(worker_id)
        checked = validation.check_log_lines(lines)
        last = await self.store.append_logs(task_id, worker_id, checked, self._clock())
        if last is None:
            await self._not_held(task_id, worker_id, "append to the log of")
        self.bus.logs_appended(task_id)
        return last

    async def log_page(
        self, task_id: str, after: int | None = 0, first: int | None = 100
    ) -> tuple[list[TaskLogLine], bool]:
        """Stored lines numbered above `after`, up to `first`, and whether more follow."""
        task_id = validation.check_task_id(task_id)
        after = validation.check_log_line_number(after)
        first = validation.check_page_size(first)
        lines = await self.store.logs_after(task_id, after, first + 1)
        if not lines:
            await self.get(task_id)  # NOT_FOUND for a task that does not exist
        return lines[:first], len(lines) > first

    async def logs(
        self, task_id: str, after: int | None = None
    ) -> AsyncGenerator[TaskLogLine, None]:
        """The task's stored lines after `after`, then new ones as they are appended: no gap, no
        duplicate. Ends once the task is final and every line it got is sent."""
        task_id = validation.check_task_id(task_id, "task_id")
        last = validation.check_log_line_number(after)
        await self.get(task_id)  # NOT_FOUND before anything streams
        watch = self.bus.watch_logs(task_id)
        try:
            ending = False
            while True:
                watch.arm()  # a wake from now on is kept for the wait below
                lines = await self.store.logs_after(task_id, last, LOG_PAGE)
                for line in lines:
                    last = line.line
                    yield line
                if len(lines) == LOG_PAGE:
                    continue
                if ending:
                    return
                task = await self.store.get(task_id)
                if task is None or task.status.is_final:
                    # A final task gets no more lines: one more read takes those committed
                    # between the read above and the final status.
                    ending = True
                    continue
                await watch.wait(LOG_POLL_SECONDS)
        finally:
            watch.close()

    async def complete(
        self,
        task_id: str,
        worker_id: str,
        result: Any = None,
        *,
        expected_prompt: str | None = None,
    ) -> Task:
        """Complete a held task; with `expected_prompt`, only if the task still has that prompt."""
        task_id = validation.check_task_id(task_id)
        if expected_prompt is not None:
            # A prompt can only change while the task is WAITING, so the prompt read here is the
            # one of the claim being completed (the store's compare-and-set still checks the holder).
            current = await self.get(task_id)
            if current.prompt != expected_prompt:
                raise Conflict(
                    f"task {task_id} has a different prompt from the one sent with the"
                    " completion: it was edited or this is another task; nothing was completed"
                )
        (task,) = await self.complete_many(worker_id, [Completion(task_id, result)])
        return task

    async def complete_many(self, worker_id: str, items: Sequence[Completion]) -> list[Task]:
        worker_id = validation.check_worker_id(worker_id)
        validation.check_batch(items, "items")
        checked = []
        for index, item in enumerate(items):
            field = "result" if len(items) == 1 else f"items[{index}].result"
            checked.append(
                Completion(
                    validation.check_task_id(item.task_id),
                    validation.check_result(item.result, field),
                )
            )
        ids = [item.task_id for item in checked]
        if len(set(ids)) != len(ids):
            raise ValidationError("items", "items must not name the same task twice")
        tasks = await self.store.complete(checked, worker_id, self._clock())
        if tasks is not None:
            return tasks
        for task_id in ids:  # find the first one that blocked the batch, to say why
            current = await self.store.get(task_id)
            if current is None or not lifecycle.held_by(current, worker_id):
                await self._not_held(task_id, worker_id, "complete")
        raise Conflict("the tasks changed while completing them; nothing was completed, try again")

    async def fail(self, task_id: str, worker_id: str, error: str, retry: bool = True) -> Task:
        task_id = validation.check_task_id(task_id)
        worker_id = validation.check_worker_id(worker_id)
        message = validation.check_text(error, "error")
        assert message is not None
        backoff, jitter, now = self._backoff, self._jitter(), self._clock()
        task = await self.store.change(
            task_id, lambda t: lifecycle.fail(t, worker_id, message, retry, backoff, jitter, now)
        )
        return task or await self._not_held(task_id, worker_id, "fail")

    async def release(self, task_id: str, worker_id: str) -> Task:
        task_id = validation.check_task_id(task_id)
        worker_id = validation.check_worker_id(worker_id)
        task = await self.store.release(task_id, worker_id, self._clock())
        return task or await self._not_held(task_id, worker_id, "release")

    async def _not_held(self, task_id: str, worker_id: str, action: str) -> NoReturn:
        current = await self.get(task_id)
        if current.status is not TaskStatus.WORKING:
            raise Conflict(
                f"cannot {action} task {task_id}: it is {current.status.value}, not WORKING"
                " (a task whose lease expired goes back to the queue; claim again)"
            )
        raise Conflict(
            f"cannot {action} task {task_id}: it is held by another worker, not {worker_id!r};"
            " only the worker that claimed it may do this"
        )

    # --- handles (MCP tasks) ---

    async def submit_with_handle(self, spec: TaskSpec, owner: str) -> tuple[Task, TaskHandle]:
        """Submit one task (as `submit`) with a new unguessable handle that only `owner` can
        resolve, stored in the same transaction as the task."""
        try:
            return await self.store.submit_with_handle(
                spec, self._clock(), secrets.token_urlsafe(24), owner
            )
        except RefusedDependency as refused:
            raise self._refused(refused, "") from None

    async def resolve_handle(self, handle: str, owner: str) -> TaskHandle | None:
        """The handle, when it exists and belongs to `owner`; None otherwise, the same either
        way, so another caller learns nothing of it."""
        if not isinstance(handle, str) or not 0 < len(handle) <= 100:
            return None
        found = await self.store.handles.find_handle(handle)
        if found is None or not secrets.compare_digest(found.owner, owner):
            return None
        return found

    async def wait_finished(self, task_id: str, timeout: float) -> Task:
        """The task once it is COMPLETED, FAILED or CANCELLED, or as it is after `timeout`
        seconds. Woken by its own events; re-read at least every second, so an event missed
        (another replica's, before this subscription) costs at most that."""
        deadline = time.monotonic() + timeout
        subscription = self.bus.subscribe(EventFilter(task_id=task_id), 16)
        try:
            while True:
                task = await self.get(task_id)
                remaining = deadline - time.monotonic()
                if task.status.is_final or remaining <= 0 or self._stopping:
                    return task
                wait = min(remaining, 1.0)
                try:
                    async with asyncio.timeout(wait):  # not wait_for: it can lose a cancellation
                        await subscription.next()
                except TimeoutError:
                    pass
                except SlowSubscriber:  # only a re-read matters here: poll from now on
                    await asyncio.sleep(wait)
        finally:
            subscription.close()

    # --- leases and retention ---

    async def expire_leases(self) -> list[Task]:
        """Requeue tasks whose lease ran out; safe to run in every replica at once."""
        expired: list[Task] = []
        while True:
            batch = await self.store.expire_leases(self._clock(), SWEEP_BATCH)
            expired.extend(batch)
            if len(batch) < SWEEP_BATCH:
                return expired

    async def prune(self, older_than: timedelta, batch: int = 1000) -> int:
        cutoff = self._clock() - older_than
        deleted = 0
        while True:
            count = await self.store.prune(cutoff, batch)
            deleted += count
            if count < batch:
                return deleted
            await asyncio.sleep(0)  # let other writes in between batches

    # --- reads ---

    async def find(self, task_id: str) -> Task | None:
        try:
            task_id = validation.check_task_id(task_id)
        except ValidationError:
            return None
        return await self.store.get(task_id)

    async def get(self, task_id: str) -> Task:
        task_id = validation.check_task_id(task_id)
        task = await self.store.get(task_id)
        if task is None:
            raise NotFound(f"no task with id {task_id}; check the id, or list tasks to find it")
        return task

    async def list_tasks(
        self, where: TaskFilter, first: int = 50, after: str | None = None, count: bool = True
    ) -> TaskPage:
        """A page of tasks after the cursor `after`; `count=False` leaves the total out (None),
        for a caller that does not show it: counting reads every task the filter matches."""
        first = validation.check_page_size(first)
        after_seq = None if after is None else decode_cursor(after)
        return await self.store.list_tasks(where, first, after_seq, count=count)

    async def list_page(self, where: TaskFilter, limit: int = 50, offset: int = 0) -> TaskPage:
        """Tasks by position (`offset`) instead of cursor, for clients that page that way; always
        with the total."""
        limit = validation.check_page_size(limit, "limit")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
            raise ValidationError("offset", f"offset must be from 0 to {MAX_OFFSET:,}")
        return await self.store.list_tasks(where, limit, None, offset)

    async def statistics(self, work_directory: str | None = None) -> Statistics:
        if work_directory is not None:
            work_directory = validation.check_work_directory(work_directory)
        return Statistics(await self.store.count_by_status(work_directory))

    async def history(self, task_id: str) -> list[TaskEvent]:
        return await self.store.history(task_id)

    async def event_page(
        self, where: EventFilter, first: int = 100, after: int = 0
    ) -> tuple[list[TaskEvent], bool]:
        """Stored events with an id above `after`, in id order: up to `first`, and whether more
        follow. Paging by the last id seen never skips nor repeats an event."""
        first = validation.check_page_size(first)
        events = await self.store.events_after(after, where, first + 1)
        return events[:first], len(events) > first

    async def events(
        self, where: EventFilter, after: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        """Replay stored events after `after`, then continue live: no gap, no duplicate."""
        subscription = self.bus.subscribe(where, self._subscriber_buffer)
        last = after
        try:
            if after is not None:
                while True:
                    replay = await self.store.events_after(last or 0, where, REPLAY_PAGE)
                    for event in replay:
                        last = event.id
                        yield event
                    if len(replay) < REPLAY_PAGE:
                        break
            while True:
                event = await subscription.next()
                if last is not None and event.id <= last:
                    continue  # already replayed from the table
                last = event.id
                yield event
        finally:
            subscription.close()

    # --- plumbing ---

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background work (releases of abandoned claims) before shutting down."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
