"""Validation rules: each bad input is refused with the field it names."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from api import domain
from api.domain import Backoff, TaskPriority, task_spec
from api.errors import ValidationError


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
        (domain.check_lease_seconds, 0),
        (domain.check_lease_seconds, 86_401),
        (domain.check_wait_seconds, -1),
        (domain.check_wait_seconds, 61),
        (domain.check_wait_seconds, float("nan")),
        (domain.check_worker_id, ""),
        (domain.check_worker_id, "w" * 256),
        (domain.check_task_id, "nope"),
        (domain.check_idempotency_key, ""),
        (domain.check_result, {1, 2}),
    ],
)
def test_operation_arguments_are_checked(check: Any, value: Any) -> None:
    with pytest.raises(ValidationError):
        check(value)


def test_empty_update_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        domain.task_changes()
    assert caught.value.field == "input"


def test_backoff_doubles_with_jitter_and_cap() -> None:
    backoff = Backoff(base_seconds=1, cap_seconds=10)
    assert backoff.delay(1, 1.0).total_seconds() == 1
    assert backoff.delay(3, 1.0).total_seconds() == 4
    assert backoff.delay(3, 0.0).total_seconds() == 2
    assert backoff.delay(50, 1.0).total_seconds() == 10
