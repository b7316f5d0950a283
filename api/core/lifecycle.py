"""The lifecycle: every change is decided here, from the task as stored; the stores apply it.
Pure, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from api.core.domain import CANCELLABLE, RETRYABLE, Backoff, DirectorySettings, Task, TaskStatus


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


def claim_allowance(settings: DirectorySettings, working: int, limit: int) -> int:
    """How many of `limit` tasks a claim may take from a directory that has `working` tasks
    WORKING: none while it is paused, and never more than its cap leaves room for."""
    if settings.paused:
        return 0
    if settings.max_working is None:
        return limit
    return max(0, min(limit, settings.max_working - working))


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
