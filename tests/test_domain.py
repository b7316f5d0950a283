"""Validation rules: each bad input is refused with the field it names."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.core import lifecycle, validation
from api.core.domain import Backoff, Task, TaskPriority, TaskStatus
from api.core.errors import ValidationError
from api.core.lifecycle import HistoryReason
from api.core.validation import task_spec


def refused(field: str, **fields: Any) -> None:
    fields.setdefault("work_directory", "/repo")
    fields.setdefault("prompt", "p")
    with pytest.raises(ValidationError) as caught:
        task_spec(**fields)
    assert caught.value.field == field
    assert caught.value.code == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    "value",
    ["", "relative/path", "/a/../b", "/a/\x00b", "/" + "a" * 512, "..", "/.."],
)
def test_bad_work_directories_are_refused(value: str) -> None:
    refused("work_directory", work_directory=value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/", "/"),
        ("/a/b/", "/a/b"),
        ("//a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/" + "a" * 511, "/" + "a" * 511),
    ],
)
def test_work_directories_are_normalised(value: str, expected: str) -> None:
    assert task_spec(work_directory=value, prompt="p").work_directory == expected


@pytest.mark.parametrize("value", ["", "   ", "x" * 100_001, None, 5])
def test_bad_prompts_are_refused(value: Any) -> None:
    refused("prompt", prompt=value)


def test_prompt_limits() -> None:
    assert len(task_spec(work_directory="/r", prompt="x" * 100_000).prompt) == 100_000


@pytest.mark.parametrize(
    "value",
    [["a"] * 21, [""], ["x" * 65], ["has space"], ["ünïcode"], "not-a-list", [1]],
)
def test_bad_tags_are_refused(value: Any) -> None:
    refused("tags", tags=value)


def test_good_tags_keep_order_and_drop_duplicates() -> None:
    spec = task_spec(work_directory="/r", prompt="p", tags=["b", "a:1", "b", "x.y-z_w", "q" * 64])
    assert spec.tags == ("b", "a:1", "x.y-z_w", "q" * 64)


@pytest.mark.parametrize("value", [-1, 101, 1.5, True, "3"])
def test_bad_max_retries_are_refused(value: Any) -> None:
    refused("max_retries", max_retries=value)


@pytest.mark.parametrize("value", [[1, 2], "text", 5, {"x": "y" * 70_000}, {"x": float("nan")}])
def test_bad_metadata_is_refused(value: Any) -> None:
    refused("metadata", metadata=value)


def test_priority_and_run_after() -> None:
    refused("priority", priority="URGENT")
    refused("run_after", run_after=datetime(2030, 1, 1))  # naive: no timezone
    assert task_spec(work_directory="/r", prompt="p", priority="high").priority is TaskPriority.HIGH


def test_batch_items_name_their_position() -> None:
    with pytest.raises(ValidationError) as caught:
        task_spec(work_directory="/r", prompt="", prefix="inputs[3].")
    assert caught.value.field == "inputs[3].prompt"


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (validation.check_lease_seconds, 0),
        (validation.check_lease_seconds, 86_401),
        (validation.check_wait_seconds, -1),
        (validation.check_wait_seconds, 61),
        (validation.check_wait_seconds, float("nan")),
        (validation.check_worker_id, ""),
        (validation.check_worker_id, "w" * 256),
        (validation.check_task_id, "nope"),
        (validation.check_idempotency_key, ""),
        (validation.check_result, {1, 2}),
    ],
)
def test_operation_arguments_are_checked(check: Any, value: Any) -> None:
    with pytest.raises(ValidationError):
        check(value)


def test_empty_update_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        validation.task_changes()
    assert caught.value.field == "input"


def test_backoff_doubles_with_jitter_and_cap() -> None:
    backoff = Backoff(base_seconds=1, cap_seconds=10)
    assert backoff.delay(1, 1.0).total_seconds() == 1
    assert backoff.delay(3, 1.0).total_seconds() == 4
    assert backoff.delay(3, 0.0).total_seconds() == 2
    assert backoff.delay(50, 1.0).total_seconds() == 10


@given(st.integers(1, 200), st.floats(0, 1), st.floats(0.001, 50), st.floats(0.001, 5000))
def test_backoff_grows_and_stays_within_half_and_all_of_the_cap(
    attempt: int, jitter: float, base: float, cap: float
) -> None:
    backoff = Backoff(base_seconds=base, cap_seconds=cap)
    delay = backoff.delay(attempt, jitter)
    assert timedelta(0) <= delay <= timedelta(seconds=cap)
    assert delay <= backoff.delay(attempt + 1, jitter)


def test_history_reasons_are_the_stored_words() -> None:
    # Existing databases and the analytics read these exact strings.
    assert {r.value for r in HistoryReason} == {
        "released", "retried", "lease_expired", "unblocked", "dependency_failed", "approved",
        "rejected",
    }  # fmt: skip
    assert HistoryReason.LEASE_EXPIRED == "lease_expired"


NOW = datetime(2030, 1, 1, tzinfo=UTC)
HELD = Task(
    id="t", work_directory="/repo", prompt="p", priority=TaskPriority.MEDIUM, tags=(),
    status=TaskStatus.WORKING, worker_id="w", created_at=NOW, started_at=NOW, completed_at=None,
    updated_at=NOW, result=None, error_message=None, retry_count=0, max_retries=1, metadata={},
    version=2, lease_expires_at=NOW + timedelta(seconds=60), run_after=None, idempotency_key=None,
)  # fmt: skip


def test_fail_requeues_after_backoff_then_fails_for_good_when_retries_are_spent() -> None:
    first = lifecycle.fail(HELD, "w", "boom", True, Backoff(2, 60), 1.0, NOW)
    assert first is not None
    assert first.task.status is TaskStatus.WAITING
    assert first.task.retry_count == 1
    assert first.task.run_after == NOW + timedelta(seconds=2)
    assert first.task.worker_id is None
    assert first.task.version == HELD.version + 1
    assert first.details == {"error": "boom", "retry": True, "runAfter": first.task.run_after,
                             "attempt": 1}  # fmt: skip
    spent = lifecycle.fail(replace(HELD, retry_count=1), "w", "boom", True, Backoff(), 1.0, NOW)
    assert spent is not None
    assert spent.task.status is TaskStatus.FAILED
    assert spent.task.completed_at == NOW
    assert spent.task.worker_id == "w"
    assert lifecycle.fail(HELD, "other", "boom", True, Backoff(), 1.0, NOW) is None


def test_lease_expiry_counts_an_attempt_and_names_its_reason() -> None:
    assert lifecycle.expire_lease(HELD, NOW) is None  # the lease still runs
    later = NOW + timedelta(seconds=61)
    outcome = lifecycle.expire_lease(HELD, later)
    assert outcome is not None
    assert outcome.task.status is TaskStatus.WAITING
    assert outcome.details["reason"] == HistoryReason.LEASE_EXPIRED
    assert outcome.worker_id == "w"
    assert outcome.task.retry_count == 1
    assert "worker w sent no heartbeat" in (outcome.task.error_message or "")


def test_release_cancel_and_retry_start_only_from_their_statuses() -> None:
    released = lifecycle.release(HELD, "w", NOW)
    assert released is not None
    assert released.task.retry_count == 0
    assert released.details == {"reason": HistoryReason.RELEASED}
    cancelled = lifecycle.cancel(HELD, "stop", NOW)
    assert cancelled is not None
    assert cancelled.task.status is TaskStatus.CANCELLED
    assert lifecycle.cancel(cancelled.task, None, NOW) is None
    assert lifecycle.retry(HELD, NOW) is None
    retried = lifecycle.retry(cancelled.task, NOW)
    assert retried is not None
    assert retried.task.status is TaskStatus.WAITING
    assert retried.details == {"reason": HistoryReason.RETRIED}
    assert retried.worker_id is None
