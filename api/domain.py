"""The task model: statuses, priorities, validation and the rules of the lifecycle. Pure, no I/O."""

from __future__ import annotations

import enum
import json
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from api.errors import ValidationError

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
MAX_BATCH = 1000
MAX_PAGE = 1000

_TAG = re.compile(r"^[A-Za-z0-9_.:\-]+$")


class TaskStatus(enum.Enum):
    WAITING = "WAITING"
    WORKING = "WORKING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


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
CANCELLABLE = (TaskStatus.WAITING, TaskStatus.WORKING)
RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)


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
class ApiKey:
    """A stored API key; the raw key is never stored, only its hash."""

    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


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


# --- the lifecycle: each change is decided here, from the task as stored; stores apply it ---


class HistoryReason(enum.StrEnum):
    """The `reason` a history row gives for a change the status alone does not explain. These are
    the stored words: existing databases and the analytics read exactly these strings."""

    RELEASED = "released"
    RETRIED = "retried"
    LEASE_EXPIRED = "lease_expired"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A decided change: the task as it becomes and the history row it owes."""

    task: Task
    previous: TaskStatus
    details: dict[str, Any]
    worker_id: str | None  # the worker the history row names

    @property
    def expected_version(self) -> int:
        """The version the change was decided on: the store's compare-and-set checks it."""
        return self.task.version - 1


def held_by(task: Task, worker_id: str) -> bool:
    return task.status is TaskStatus.WORKING and task.worker_id == worker_id


def _changed(task: Task, now: datetime, **fields: Any) -> Task:
    return replace(task, updated_at=now, version=task.version + 1, lease_expires_at=None, **fields)


def _requeued(task: Task, now: datetime, **fields: Any) -> Task:
    return _changed(
        task, now, status=TaskStatus.WAITING, worker_id=None, started_at=None, completed_at=None,
        **fields,
    )  # fmt: skip


def _attempt_spent(task: Task, now: datetime, error: str, run_after: datetime | None) -> Task:
    """Requeue with one more attempt counted, or fail for good once the retries are spent."""
    if task.retry_count < task.max_retries:
        return _requeued(
            task, now, retry_count=task.retry_count + 1, run_after=run_after, error_message=error
        )
    return _changed(task, now, status=TaskStatus.FAILED, completed_at=now, error_message=error)


def claimable(task: Task, now: datetime) -> bool:
    return task.status is TaskStatus.WAITING and (task.run_after is None or task.run_after <= now)


# claim, heartbeat and complete are the hot path: the stores apply them as one compare-and-set
# statement each, whose WHERE clause is the condition below (a property test holds them equal).
def claim(task: Task, worker_id: str, lease_until: datetime, now: datetime) -> Task | None:
    if not claimable(task, now):
        return None
    return replace(
        task, status=TaskStatus.WORKING, worker_id=worker_id, started_at=now, updated_at=now,
        lease_expires_at=lease_until, version=task.version + 1,
    )  # fmt: skip


def heartbeat(task: Task, worker_id: str, lease_until: datetime, now: datetime) -> Task | None:
    if not held_by(task, worker_id):
        return None
    return replace(task, lease_expires_at=lease_until, updated_at=now, version=task.version + 1)


def complete(task: Task, worker_id: str, result: Any, now: datetime) -> Task | None:
    if not held_by(task, worker_id):
        return None
    return _changed(task, now, status=TaskStatus.COMPLETED, result=result, completed_at=now)


def fail(
    task: Task,
    worker_id: str,
    error: str,
    retry: bool,
    backoff: Backoff,
    jitter: float,
    now: datetime,
) -> Outcome | None:
    """The holder reports a failure: requeue after a backoff while retries remain (and `retry`)."""
    if not held_by(task, worker_id):
        return None
    details: dict[str, Any] = {"error": error, "retry": retry}
    if retry and task.retry_count < task.max_retries:
        run_after = now + backoff.delay(task.retry_count + 1, jitter)
        changed = _attempt_spent(task, now, error, run_after)
        details |= {"runAfter": run_after, "attempt": changed.retry_count}
    else:
        changed = _changed(
            task, now, status=TaskStatus.FAILED, completed_at=now, error_message=error
        )
    return Outcome(changed, TaskStatus.WORKING, details, worker_id)


def expire_lease(task: Task, now: datetime) -> Outcome | None:
    """The holder sent no heartbeat in time: the attempt counts, as a failure would."""
    lease = task.lease_expires_at
    if task.status is not TaskStatus.WORKING or lease is None or not lease < now:
        return None
    error = f"lease expired: worker {task.worker_id} sent no heartbeat before its lease ended"
    changed = _attempt_spent(task, now, error, task.run_after)
    details = {
        "reason": HistoryReason.LEASE_EXPIRED.value,
        "leaseExpiresAt": lease,
        "attempt": changed.retry_count,
    }
    return Outcome(changed, TaskStatus.WORKING, details, task.worker_id)


def release(task: Task, worker_id: str, now: datetime) -> Outcome | None:
    """The holder gives the task back without counting an attempt."""
    if not held_by(task, worker_id):
        return None
    details = {"reason": HistoryReason.RELEASED.value}
    return Outcome(_requeued(task, now), TaskStatus.WORKING, details, worker_id)


def cancel(task: Task, reason: str | None, now: datetime) -> Outcome | None:
    if task.status not in CANCELLABLE:
        return None
    changed = _changed(task, now, status=TaskStatus.CANCELLED, completed_at=now)
    details = {} if reason is None else {"reason": reason}
    return Outcome(changed, task.status, details, changed.worker_id)


def retry(task: Task, now: datetime) -> Outcome | None:
    """Send a finished, unsuccessful task back to the queue with its attempts reset."""
    if task.status not in RETRYABLE:
        return None
    changed = _requeued(task, now, retry_count=0, error_message=None, run_after=None)
    return Outcome(changed, task.status, {"reason": HistoryReason.RETRIED.value}, None)


def history_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Details as stored: JSON values, instants as ISO 8601 in UTC."""
    return {
        k: v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v
        for k, v in details.items()
    }


# --- validation: every function raises ValidationError naming the field in snake_case; each
# interface shows the name as its clients spell it ---


def check_work_directory(value: object, field: str = "work_directory") -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, f"{field} is required: give an absolute path such as /repo")
    if "\x00" in value:
        raise ValidationError(field, f"{field} must not contain a NUL character")
    if not value.startswith("/"):
        raise ValidationError(field, f"{field} must be an absolute POSIX path starting with '/'")
    if ".." in value.split("/"):
        raise ValidationError(field, f"{field} must not contain a '..' segment")
    normalised = posixpath.normpath(value)
    if normalised.startswith("//"):  # POSIX keeps a leading double slash; we do not
        normalised = "/" + normalised.lstrip("/")
    if len(normalised) > MAX_WORK_DIRECTORY:
        raise ValidationError(field, f"{field} must be at most {MAX_WORK_DIRECTORY} characters")
    return normalised


def check_prompt(value: object, field: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"{field} must be a non-empty string")
    if len(value) > MAX_PROMPT:
        raise ValidationError(field, f"{field} must be at most {MAX_PROMPT:,} characters")
    if "\x00" in value:
        raise ValidationError(field, f"{field} must not contain a NUL character")
    return value


def check_priority(value: object, field: str = "priority") -> TaskPriority:
    if isinstance(value, TaskPriority):
        return value
    try:
        return TaskPriority(str(value).upper())
    except ValueError:
        raise ValidationError(field, f"{field} must be one of LOW, MEDIUM, HIGH") from None


def check_status(value: object, field: str = "status") -> TaskStatus:
    if isinstance(value, TaskStatus):
        return value
    try:
        return TaskStatus(str(value).upper())
    except ValueError:
        names = ", ".join(s.value for s in TaskStatus)
        raise ValidationError(field, f"{field} must be one of {names}") from None


def check_tags(value: object, field: str = "tags") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValidationError(field, f"{field} must be a list of strings")
    if len(value) > MAX_TAGS:
        raise ValidationError(field, f"{field} may hold at most {MAX_TAGS} tags")
    seen: dict[str, None] = {}
    for item in value:
        seen[check_tag(item, field)] = None
    return tuple(seen)


def check_tag(value: object, field: str = "tag") -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TAG or not _TAG.match(value):
        raise ValidationError(
            field,
            f"{field}: each tag must be 1 to {MAX_TAG} characters of letters, digits and _.:-",
        )
    return value


def check_max_retries(value: object, field: str = "max_retries") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise ValidationError(field, f"{field} must be a whole number from 0 to {MAX_RETRIES}")
    return value


def check_json_size(value: object) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError):
        return -1


def check_metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f'{field} must be a JSON object such as {{"ticket": 42}}')
    size = check_json_size(value)
    if size < 0:
        raise ValidationError(field, f"{field} must hold only JSON values")
    if size > MAX_METADATA_BYTES:
        raise ValidationError(field, f"{field} must be at most 64 KiB of JSON (got {size:,} bytes)")
    return dict(value)


def check_result(value: object, field: str = "result") -> Any:
    size = check_json_size(value)
    if size < 0:
        raise ValidationError(field, f"{field} must be a JSON value")
    if size > MAX_RESULT_BYTES:
        raise ValidationError(field, f"{field} must be at most 1 MiB of JSON (got {size:,} bytes)")
    return value


def check_text(value: object, field: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValidationError(field, f"{field} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise ValidationError(field, f"{field} must be at most {MAX_TEXT:,} characters")
    return value


def check_worker_id(value: object, field: str = "worker_id") -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_WORKER_ID:
        raise ValidationError(field, f"{field} must be 1 to {MAX_WORKER_ID} characters")
    if "\x00" in value:
        raise ValidationError(field, f"{field} must not contain a NUL character")
    return value


def check_idempotency_key(value: object, field: str = "idempotency_key") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_IDEMPOTENCY_KEY:
        raise ValidationError(field, f"{field} must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return value


def check_task_id(value: object, field: str = "id") -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValidationError(field, f"{field} must be a task id (a UUID)") from None


def check_lease_seconds(value: object, field: str = "lease_seconds") -> int:
    if value is None:
        return DEFAULT_LEASE_SECONDS
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"{field} must be a whole number of seconds")
    if not 1 <= value <= MAX_LEASE_SECONDS:
        raise ValidationError(field, f"{field} must be from 1 to {MAX_LEASE_SECONDS} seconds")
    return value


def check_wait_seconds(value: object, field: str = "wait_seconds") -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError(field, f"{field} must be a number of seconds")
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ValidationError(field, f"{field} must be from 0 to {MAX_WAIT_SECONDS:g} seconds")
    return float(value)


MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


def check_version(value: object, field: str = "expected_version") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT32:
        raise ValidationError(field, f"{field} must be a task version: a whole number >= 0")
    return value


def check_event_id(value: object, field: str = "after") -> int:
    """An event id as clients send it: a whole number (or its decimal string) >= 0."""
    try:
        number = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else -1
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_INT64:
        raise ValidationError(field, f"{field} must be an event id (a whole number >= 0)")
    return number


def check_page_size(value: object, field: str = "first", maximum: int = MAX_PAGE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValidationError(field, f"{field} must be from 1 to {maximum}")
    return value


def check_batch(items: Sequence[Any], field: str, maximum: int = MAX_BATCH) -> Sequence[Any]:
    if not 1 <= len(items) <= maximum:
        raise ValidationError(field, f"{field} must hold 1 to {maximum:,} items")
    return items


def check_aware(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise ValidationError(field, f"{field} must include a timezone, e.g. 2030-01-01T00:00:00Z")
    return value


def task_spec(
    *,
    work_directory: object,
    prompt: object,
    priority: object = None,
    tags: object = None,
    max_retries: object = None,
    metadata: object = None,
    idempotency_key: object = None,
    run_after: datetime | None = None,
    prefix: str = "",
) -> TaskSpec:
    """Validate one submission; `prefix` names its place in a batch, e.g. `inputs[3].`."""
    return TaskSpec(
        work_directory=check_work_directory(work_directory, f"{prefix}work_directory"),
        prompt=check_prompt(prompt, f"{prefix}prompt"),
        priority=TaskPriority.MEDIUM
        if priority is None
        else check_priority(priority, f"{prefix}priority"),
        tags=check_tags(tags, f"{prefix}tags"),
        max_retries=DEFAULT_MAX_RETRIES
        if max_retries is None
        else check_max_retries(max_retries, f"{prefix}max_retries"),
        metadata=check_metadata(metadata, f"{prefix}metadata"),
        idempotency_key=check_idempotency_key(idempotency_key, f"{prefix}idempotency_key"),
        run_after=None if run_after is None else check_aware(run_after, f"{prefix}run_after"),
    )


def task_filter(
    *,
    statuses: Iterable[object] = (),
    work_directory: object = None,
    priority: object = None,
    tag: object = None,
) -> TaskFilter:
    """Validate the filters of a task listing; None (or no status) leaves that filter out."""
    return TaskFilter(
        statuses=tuple(check_status(status) for status in statuses),
        work_directory=None if work_directory is None else check_work_directory(work_directory),
        priority=None if priority is None else check_priority(priority),
        tag=None if tag is None else check_tag(tag),
    )


def task_changes(
    *,
    prompt: object = None,
    priority: object = None,
    tags: object = None,
    metadata: object = None,
    max_retries: object = None,
) -> TaskChanges:
    changes = TaskChanges(
        prompt=None if prompt is None else check_prompt(prompt),
        priority=None if priority is None else check_priority(priority),
        tags=None if tags is None else check_tags(tags),
        metadata=None if metadata is None else check_metadata(metadata),
        max_retries=None if max_retries is None else check_max_retries(max_retries),
    )
    if changes.is_empty:
        raise ValidationError("input", "input must change at least one field")
    return changes
