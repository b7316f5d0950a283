"""The task model: statuses, priorities, tasks, events, specs, filters and limits. Pure, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

MAX_WORK_DIRECTORY = 512
MAX_PROMPT = 100_000
MAX_TAGS = 20
MAX_TAG = 64
MAX_RETRIES = 100
DEFAULT_MAX_RETRIES = 3
MAX_METADATA_BYTES = 64 * 1024
MAX_RESULT_BYTES = 1024 * 1024
MAX_TEXT = 100_000  # error messages and cancel reasons
MAX_WORKER_ID = 255
MAX_IDEMPOTENCY_KEY = 255
MAX_LEASE_SECONDS = 24 * 3600
DEFAULT_LEASE_SECONDS = 300
MAX_WAIT_SECONDS = 60.0
MAX_RUN_WAIT_SECONDS = 300.0  # longest a blocking run_task call waits for its task
MAX_BATCH = 1000
MAX_PAGE = 1000
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_DEPENDENCIES = 100
# Progress and logs of a held task.
MAX_PROGRESS_MESSAGE = 1000  # characters
MAX_LOG_LINES_PER_CALL = 1000
MAX_LOG_LINE_BYTES = 8192  # UTF-8 bytes of one line
MAX_LOG_LINES_KEPT = 100_000  # per task: older lines are dropped as newer ones arrive


class TaskStatus(enum.Enum):
    BLOCKED = "BLOCKED"  # waits for its dependencies to complete
    WAITING = "WAITING"
    WORKING = "WORKING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    IN_REVIEW = "IN_REVIEW"  # done by its worker, waits for approval

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    @property
    def is_unsuccessful(self) -> bool:
        """Finally failed or cancelled: its dependents can never run."""
        return self in (TaskStatus.FAILED, TaskStatus.CANCELLED)


class TaskPriority(enum.Enum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"

    @property
    def rank(self) -> int:
        """Stored form: a larger rank is claimed first."""
        return _RANKS[self]

    @classmethod
    def from_rank(cls, rank: int) -> TaskPriority:
        return _BY_RANK[rank]


_RANKS = {TaskPriority.LOW: 0, TaskPriority.MEDIUM: 1, TaskPriority.HIGH: 2}
_BY_RANK = {rank: priority for priority, rank in _RANKS.items()}

# Which statuses each operation may start from.
CANCELLABLE = (TaskStatus.BLOCKED, TaskStatus.WAITING, TaskStatus.WORKING, TaskStatus.IN_REVIEW)
RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)
UPDATABLE = (TaskStatus.BLOCKED, TaskStatus.WAITING)


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    work_directory: str
    prompt: str
    priority: TaskPriority
    tags: tuple[str, ...]
    status: TaskStatus
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    result: Any
    error_message: str | None
    retry_count: int
    max_retries: int
    metadata: dict[str, Any]
    version: int
    lease_expires_at: datetime | None
    run_after: datetime | None
    idempotency_key: str | None
    seq: int = 0  # submission order: ties in priority are claimed first-in first-out
    depends_on: tuple[str, ...] = ()  # the tasks that must complete first, as submitted
    blocked_by: tuple[str, ...] = ()  # those of them not COMPLETED yet
    require_review: bool = False  # a completion waits IN_REVIEW for approveTask
    review_feedback: str | None = None  # the last rejection's feedback
    has_dependents: bool = False  # some task depends on this one: its end settles them
    progress: float | None = None  # 0 to 1, as the holder last reported it
    progress_message: str | None = None
    log_line_count: int = 0  # the number of the task's last log line (0: none yet)


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One row of the history table: a status change of one task."""

    id: int
    task_id: str
    work_directory: str
    status: TaskStatus
    previous_status: TaskStatus | None
    worker_id: str | None
    at: datetime
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TaskLogLine:
    """One line of a task's log; lines are numbered per task from 1, in the order stored."""

    line: int
    text: str
    at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key; the raw key is never stored, only its hash."""

    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rate_limit: int | None = None  # requests a minute; None: the server's default


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """An unguessable name for one task, given to the caller that created it through MCP: only
    that caller (`owner`, the identity of its API key) may follow or cancel the task by it."""

    handle: str
    task_id: str
    owner: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A validated request to submit one task."""

    work_directory: str
    prompt: str
    priority: TaskPriority = TaskPriority.MEDIUM
    tags: tuple[str, ...] = ()
    max_retries: int = DEFAULT_MAX_RETRIES
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    run_after: datetime | None = None
    depends_on: tuple[str, ...] = ()
    require_review: bool = False


@dataclass(frozen=True, slots=True)
class TaskChanges:
    """A validated edit of a waiting task; None leaves a field as it is."""

    prompt: str | None = None
    priority: TaskPriority | None = None
    tags: tuple[str, ...] | None = None
    metadata: dict[str, Any] | None = None
    max_retries: int | None = None

    @property
    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (self.prompt, self.priority, self.tags, self.metadata, self.max_retries)
        )


@dataclass(frozen=True, slots=True)
class TaskFilter:
    statuses: tuple[TaskStatus, ...] = ()
    work_directory: str | None = None
    priority: TaskPriority | None = None
    tag: str | None = None
    created_before: datetime | None = None  # created strictly before this instant
    created_after: datetime | None = None  # created strictly after this instant

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every task."""
        return not self.statuses and all(
            value is None
            for value in (
                self.work_directory, self.priority, self.tag, self.created_before,
                self.created_after,
            )
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DirectorySettings:
    """The controls of one work directory. A directory nobody configured has no cap and is not
    paused."""

    work_directory: str
    max_working: int | None = None  # at most this many WORKING tasks at once; None: no cap
    paused: bool = False  # a paused directory hands out no task
    updated_at: datetime | None = None  # None: never configured

    @property
    def restricts(self) -> bool:
        """True when claims must look at the directory's WORKING count or refuse outright."""
        return self.paused or self.max_working is not None


@dataclass(frozen=True, slots=True)
class DirectoryChanges:
    """A validated edit of a directory's controls; a field not `set_` keeps its value."""

    set_max_working: bool = False
    max_working: int | None = None  # with set_max_working: the new cap, or None for no cap
    paused: bool | None = None


@dataclass(frozen=True, slots=True)
class WorkDirectory:
    """A known work directory (configured, or holding tasks): its controls and task counts."""

    settings: DirectorySettings
    counts: dict[TaskStatus, int]

    @property
    def work_directory(self) -> str:
        return self.settings.work_directory

    @property
    def max_working(self) -> int | None:
        return self.settings.max_working

    @property
    def paused(self) -> bool:
        return self.settings.paused

    @property
    def configured(self) -> bool:
        return self.settings.updated_at is not None

    @property
    def updated_at(self) -> datetime | None:
        return self.settings.updated_at

    def count(self, status: TaskStatus) -> int:
        return self.counts.get(status, 0)

    @property
    def waiting(self) -> int:
        return self.count(TaskStatus.WAITING)

    @property
    def working(self) -> int:
        return self.count(TaskStatus.WORKING)

    @property
    def completed(self) -> int:
        return self.count(TaskStatus.COMPLETED)

    @property
    def failed(self) -> int:
        return self.count(TaskStatus.FAILED)

    @property
    def cancelled(self) -> int:
        return self.count(TaskStatus.CANCELLED)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk change did: the tasks the filter matched in a state the change starts from,
    which of them changed (each with its history row), and which were skipped because they had
    changed meanwhile (claimed, finished, edited out of the filter)."""

    matched: int
    changed_ids: tuple[str, ...]
    skipped_ids: tuple[str, ...]

    @property
    def changed(self) -> int:
        return len(self.changed_ids)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)


@dataclass(frozen=True, slots=True)
class EventFilter:
    task_id: str | None = None
    work_directory: str | None = None
    statuses: tuple[TaskStatus, ...] = ()

    def matches(self, event: TaskEvent) -> bool:
        return (
            (self.task_id is None or event.task_id == self.task_id)
            and (self.work_directory is None or event.work_directory == self.work_directory)
            and (not self.statuses or event.status in self.statuses)
        )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits between half and all of base * 2**(n-1)."""

    base_seconds: float = 1.0
    cap_seconds: float = 300.0

    def delay(self, attempt: int, jitter: float) -> timedelta:
        # Whole microseconds, truncated: the resolution both stores keep.
        doublings = min(max(attempt - 1, 0), 30)
        full = min(
            int(self.cap_seconds * 1_000_000), int(self.base_seconds * 1_000_000) << doublings
        )
        return timedelta(microseconds=int(full * (0.5 + 0.5 * jitter)))


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task listing, with the total the filter matches (None: not counted)."""

    tasks: list[Task]
    has_next: bool
    total: int | None


@dataclass(frozen=True, slots=True)
class Completion:
    """One task of a batch completion and its result."""

    task_id: str
    result: Any
