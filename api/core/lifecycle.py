"""The lifecycle: every change is decided here, from the task as stored; the stores apply it.
Pure, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
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
    UNBLOCKED = "unblocked"  # every dependency completed
    DEPENDENCY_FAILED = "dependency_failed"  # a dependency ended FAILED or CANCELLED
    APPROVED = "approved"
    REJECTED = "rejected"


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
    """The holder is done: COMPLETED, or IN_REVIEW (result kept, still no end) when the task
    requires a review."""
    if not held_by(task, worker_id):
        return None
    if task.require_review:
        return _changed(task, now, status=TaskStatus.IN_REVIEW, result=result)
    return _changed(task, now, status=TaskStatus.COMPLETED, result=result, completed_at=now)


def approve(task: Task, note: str | None, now: datetime) -> Outcome | None:
    """A reviewer accepts the result: the task completes (and only now unblocks its dependents)."""
    if task.status is not TaskStatus.IN_REVIEW:
        return None
    changed = _changed(task, now, status=TaskStatus.COMPLETED, completed_at=now)
    details: dict[str, Any] = {"reason": HistoryReason.APPROVED.value}
    if note is not None:
        details["note"] = note
    return Outcome(changed, TaskStatus.IN_REVIEW, details, task.worker_id)


def reject(task: Task, feedback: str, retry: bool, now: datetime) -> Outcome | None:
    """A reviewer refuses the result: another attempt with the feedback (one retry counted), or
    FAILED when `retry` is false or the retries are spent."""
    if task.status is not TaskStatus.IN_REVIEW:
        return None
    error = f"rejected in review: {feedback}"
    details: dict[str, Any] = {
        "reason": HistoryReason.REJECTED.value, "feedback": feedback, "retry": retry,
    }  # fmt: skip
    if retry and task.retry_count < task.max_retries:
        changed = replace(_attempt_spent(task, now, error, None), result=None)
        details["attempt"] = changed.retry_count
    else:
        changed = _changed(task, now, status=TaskStatus.FAILED, completed_at=now,
                           error_message=error)  # fmt: skip
    return Outcome(replace(changed, review_feedback=feedback), TaskStatus.IN_REVIEW, details,
                   task.worker_id)  # fmt: skip


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


def retry(
    task: Task, now: datetime, unfinished: Mapping[str, TaskStatus] | None = None
) -> Outcome | None:
    """Send a finished, unsuccessful task back to the queue with its attempts reset; a task with
    dependencies goes back to BLOCKED while some are `unfinished` (not COMPLETED), and is refused
    (None) while one of them is FAILED or CANCELLED (`failed_dependency` says which)."""
    unfinished = unfinished or {}
    if task.status not in RETRYABLE or failed_dependency(task, unfinished) is not None:
        return None
    blocked_by = still_blocked_by(task, unfinished)
    changed = _requeued(task, now, retry_count=0, error_message=None, run_after=None,
                        blocked_by=blocked_by)  # fmt: skip
    if blocked_by:
        changed = replace(changed, status=TaskStatus.BLOCKED)
    return Outcome(changed, task.status, {"reason": HistoryReason.RETRIED.value}, None)


# --- dependencies ---


def refuses_dependency(status: TaskStatus | None) -> bool:
    """A new task may not depend on a missing task, nor on one that already failed or was
    cancelled (it could never run)."""
    return status is None or status.is_unsuccessful


def submitted_status(
    depends_on: Sequence[str], statuses: Mapping[str, TaskStatus]
) -> tuple[TaskStatus, tuple[str, ...]]:
    """A new task's status and the dependencies it waits for; COMPLETED ones count as done."""
    blocked_by = tuple(d for d in depends_on if statuses[d] is not TaskStatus.COMPLETED)
    return (TaskStatus.BLOCKED if blocked_by else TaskStatus.WAITING), blocked_by


def still_blocked_by(task: Task, unfinished: Mapping[str, TaskStatus]) -> tuple[str, ...]:
    """The task's dependencies not COMPLETED yet, in the order given at submit."""
    return tuple(d for d in task.depends_on if d in unfinished)


def failed_dependency(task: Task, unfinished: Mapping[str, TaskStatus]) -> str | None:
    """The first dependency that ended FAILED or CANCELLED, if any."""
    return next((d for d in task.depends_on if d in unfinished and unfinished[d].is_unsuccessful),
                None)  # fmt: skip


def unblock(task: Task, unfinished: Mapping[str, TaskStatus], now: datetime) -> Outcome | None:
    """A dependency completed: a BLOCKED task whose dependencies all completed becomes WAITING."""
    if task.status is not TaskStatus.BLOCKED or still_blocked_by(task, unfinished):
        return None
    changed = replace(_changed(task, now, status=TaskStatus.WAITING), blocked_by=())
    return Outcome(changed, TaskStatus.BLOCKED, {"reason": HistoryReason.UNBLOCKED.value}, None)


def dependency_failed(task: Task, dependency: str, now: datetime) -> Outcome | None:
    """A dependency ended FAILED or CANCELLED: a BLOCKED dependent can never run, so it is
    cancelled (and its own dependents after it)."""
    if task.status is not TaskStatus.BLOCKED:
        return None
    changed = _changed(task, now, status=TaskStatus.CANCELLED, completed_at=now)
    details = {"reason": HistoryReason.DEPENDENCY_FAILED.value, "dependency": dependency}
    return Outcome(changed, TaskStatus.BLOCKED, details, None)


def settles_dependents(task: Task) -> bool:
    """Whether this change of `task` decides something for the tasks that depend on it."""
    return task.has_dependents and task.status.is_final


def history_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Details as stored: JSON values, instants as ISO 8601 in UTC."""
    return {
        k: v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v
        for k, v in details.items()
    }
