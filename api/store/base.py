"""The storage interface every backend implements; it speaks domain objects, never rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from api.core import domain
from api.core.domain import (
    ApiKey,
    Completion,
    DirectoryChanges,
    DirectorySettings,
    Task,
    TaskChanges,
    TaskEvent,
    TaskFilter,
    TaskHandle,
    TaskLogLine,
    TaskPage,
    TaskStatus,
    WorkDirectory,
)

if TYPE_CHECKING:
    from api.store.changes import BulkChunk
from api.core.lifecycle import Outcome

# Called with the events of each committed transaction. On SQLite they carry their ids, in id
# order; on PostgreSQL they have no delivery position yet (id 0): the event bus delivers them.
CommitListener = Callable[[Sequence[TaskEvent]], None]
# Decides a lifecycle change from the task as stored; None when the change does not apply.
Decide = Callable[[Task], Outcome | None]
# A bulk change decides each task with its dependencies that are not COMPLETED, and their status.
BulkDecide = Callable[[Task, Mapping[str, TaskStatus]], Outcome | None]

SCHEMA_VERSION = 8


class RefusedDependency(Exception):
    """Raised inside a submit to roll it back: spec `spec`'s dependency number `index` is missing
    (`status` None) or already failed or cancelled."""

    def __init__(self, spec: int, index: int, task_id: str, status: TaskStatus | None) -> None:
        super().__init__(task_id)
        self.spec, self.index, self.task_id, self.status = spec, index, task_id, status


class TaskStore(Protocol):
    """Each state change is one atomic compare-and-set: it returns the changed task(s), or
    None / an empty list when the task was not in the state the change requires."""

    @property
    def keys(self) -> KeyStore:
        """The API keys kept in the same database."""

    @property
    def handles(self) -> HandleStore:
        """The MCP task handles kept in the same database."""

    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None: ...

    def listen(self, listener: CommitListener) -> None:
        """Have `listener` called with the events of every transaction this process commits."""

    async def ping(self) -> None:
        """Raise when the database does not answer."""

    async def schema_version(self) -> int: ...

    # --- reads ---
    async def get(self, task_id: str) -> Task | None: ...

    async def list_tasks(
        self,
        where: domain.TaskFilter,
        first: int,
        after_seq: int | None,
        offset: int = 0,
        count: bool = True,
    ) -> TaskPage:
        """Up to `first` tasks in submission order, after the cursor `after_seq`, skipping
        `offset` more; with the number of tasks `where` matches, unless `count` is false."""

    async def count_by_status(self, work_directory: str | None) -> dict[TaskStatus, int]: ...

    async def history(self, task_id: str) -> list[TaskEvent]: ...

    async def events_after(
        self, after: int, where: domain.EventFilter, limit: int
    ) -> list[TaskEvent]: ...

    async def last_event_id(self) -> int: ...

    async def next_run_after(self, work_directory: str, now: datetime) -> datetime | None:
        """When the earliest waiting task of this directory that is not yet due becomes due."""

    async def directory(self, work_directory: str) -> DirectorySettings:
        """The directory's controls (the defaults when it was never configured)."""

    async def directories(self, work_directory: str | None = None) -> list[WorkDirectory]:
        """Every known directory (configured, or holding tasks) by name, or only the one named."""

    # --- changes ---
    async def configure(
        self, work_directory: str, changes: DirectoryChanges, now: datetime
    ) -> DirectorySettings:
        """Create or edit a directory's controls; fields the changes leave out keep their value."""

    async def bulk(
        self, where: TaskFilter, after_seq: int, limit: int, decide: BulkDecide
    ) -> BulkChunk:
        """One transaction of a bulk change: up to `limit` matching tasks after `after_seq`."""

    async def bulk_one(self, where: TaskFilter, task_id: str, decide: BulkDecide) -> Task | None:
        """The bulk change of one task a chunk found busy, if it still matches."""

    async def submit(self, specs: Sequence[domain.TaskSpec], now: datetime) -> list[Task]:
        """Insert all or none; an existing idempotency key returns the stored task instead.
        Raises RefusedDependency (nothing stored) for a missing or failed dependency."""

    async def submit_with_handle(
        self, spec: domain.TaskSpec, now: datetime, handle: str, owner: str
    ) -> tuple[Task, TaskHandle]:
        """Submit one task as `submit` does and store `handle` for it, owned by `owner`, in the
        same transaction."""

    async def claim(
        self, work_directory: str, worker_id: str, limit: int, lease_until: datetime, now: datetime
    ) -> list[Task]: ...

    async def heartbeat(
        self, task_id: str, worker_id: str, lease_until: datetime, now: datetime
    ) -> Task | None: ...

    async def complete(
        self, items: Sequence[Completion], worker_id: str, now: datetime
    ) -> list[Task] | None:
        """Complete all the items held by `worker_id`, or none (None) if any is not."""

    async def retry(self, task_id: str, now: datetime) -> Task | None:
        """Retry a failed or cancelled task, deciding on its dependencies as they are once it is
        locked; None when it is in no state to retry or a dependency failed."""

    async def unfinished_dependencies(self, task_id: str) -> dict[str, TaskStatus]:
        """The task's dependencies that are not COMPLETED, with their status."""

    async def change(self, task_id: str, decide: Decide) -> Task | None:
        """Decide a lifecycle change on the task as stored (read under a lock, in the change's
        transaction) and apply it as a compare-and-set on the version decided on; None when the
        task is missing or `decide` found it in no state the change starts from."""

    async def release(self, task_id: str, worker_id: str, now: datetime) -> Task | None:
        """Give a held task back to the queue without counting an attempt."""

    async def update(
        self, task_id: str, expected_version: int, changes: TaskChanges, now: datetime
    ) -> Task | None: ...

    async def report_progress(
        self,
        task_id: str,
        worker_id: str,
        progress: float | None,
        message: str | None,
        lease_until: datetime,
        now: datetime,
    ) -> Task | None:
        """Store the holder's progress (None keeps the stored value) and extend its lease."""

    async def append_logs(
        self, task_id: str, worker_id: str, lines: Sequence[str], now: datetime
    ) -> int | None:
        """Store lines after the task's last one, numbered on; the number of the last line
        stored, or None when `worker_id` does not hold the task. Keeps the newest
        `domain.MAX_LOG_LINES_KEPT` lines."""

    async def logs_after(self, task_id: str, after: int, limit: int) -> list[TaskLogLine]:
        """Up to `limit` stored lines of the task numbered above `after`, in order."""

    async def expire_leases(self, now: datetime, limit: int) -> list[Task]:
        """Requeue (or fail, when retries are spent) working tasks whose lease ran out."""

    async def prune(self, finished_before: datetime, limit: int) -> int:
        """Delete up to `limit` finished tasks (and their history) older than the cut-off."""


class KeyStore(Protocol):
    """API keys: stored by hash, never raw; a name may be reused once its key is revoked."""

    async def create_key(
        self,
        name: str,
        key_hash: str,
        scopes: Sequence[str],
        now: datetime,
        rate_limit: int | None = None,
    ) -> ApiKey | None:
        """Store a key (`rate_limit` None: the server's default); None when the name is taken."""

    async def find_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not."""

    async def list_keys(self) -> list[ApiKey]: ...

    async def revoke_key(self, name: str, now: datetime) -> ApiKey | None:
        """Revoke the unrevoked key of this name; None when there is none."""

    async def touch_key(self, key_hash: str, now: datetime) -> None:
        """Record a use of the key."""

    async def count_active_keys(self) -> int: ...


class HandleStore(Protocol):
    """Task handles: a handle names one task for one owner; handles go when their task does."""

    async def find_handle(self, handle: str) -> TaskHandle | None: ...
