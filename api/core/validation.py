"""Validation of what clients send: each function returns the clean value or raises ValidationError
naming the field in snake_case; each interface shows the name as its clients spell it. Pure."""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from api.core.domain import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_RETRIES,
    MAX_BATCH,
    MAX_DEPENDENCIES,
    MAX_IDEMPOTENCY_KEY,
    MAX_INT32,
    MAX_INT64,
    MAX_LEASE_SECONDS,
    MAX_LOG_LINE_BYTES,
    MAX_LOG_LINES_PER_CALL,
    MAX_METADATA_BYTES,
    MAX_PAGE,
    MAX_PROGRESS_MESSAGE,
    MAX_PROMPT,
    MAX_RESULT_BYTES,
    MAX_RETRIES,
    MAX_RUN_WAIT_SECONDS,
    MAX_TAG,
    MAX_TAGS,
    MAX_TEXT,
    MAX_WAIT_SECONDS,
    MAX_WORK_DIRECTORY,
    MAX_WORKER_ID,
    DirectoryChanges,
    TaskChanges,
    TaskFilter,
    TaskPriority,
    TaskSpec,
    TaskStatus,
)
from api.core.errors import ValidationError

_TAG = re.compile(r"^[A-Za-z0-9_.:\-]+$")


def check_no_nul(value: str, field: str) -> None:
    """PostgreSQL's TEXT cannot hold a NUL character, so no text field may (SQLite alike)."""
    if "\x00" in value:
        raise ValidationError(field, f"{field} must not contain a NUL character")


def check_work_directory(value: object, field: str = "work_directory") -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, f"{field} is required: give an absolute path such as /repo")
    check_no_nul(value, field)
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
    check_no_nul(value, field)
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


# A NUL character in a JSON string: `\u0000` after an even number of backslashes (an odd number
# makes the backslash before `u` a literal one).
_JSON_NUL = re.compile(r"(?:^|[^\\])(?:\\\\)*\\u0000")


def check_json(value: object, field: str, must: str, limit: int) -> None:
    """`value` is JSON without NUL characters (PostgreSQL's jsonb refuses them) within `limit`
    bytes; `must` says what it must be."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise ValidationError(field, f"{field} must {must}") from None
    size = len(text.encode())
    if size > limit:
        most = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit >> 10} KiB"
        raise ValidationError(field, f"{field} must be at most {most} of JSON (got {size:,} bytes)")
    if _JSON_NUL.search(text):
        raise ValidationError(field, f"{field} must not contain a NUL character in any string")


def check_metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(field, f'{field} must be a JSON object such as {{"ticket": 42}}')
    check_json(value, field, "hold only JSON values", MAX_METADATA_BYTES)
    return dict(value)


def check_result(value: object, field: str = "result") -> Any:
    check_json(value, field, "be a JSON value", MAX_RESULT_BYTES)
    return value


def check_text(value: object, field: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValidationError(field, f"{field} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise ValidationError(field, f"{field} must be at most {MAX_TEXT:,} characters")
    check_no_nul(value, field)
    return value


def check_worker_id(value: object, field: str = "worker_id") -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_WORKER_ID:
        raise ValidationError(field, f"{field} must be 1 to {MAX_WORKER_ID} characters")
    check_no_nul(value, field)
    return value


def check_idempotency_key(value: object, field: str = "idempotency_key") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_IDEMPOTENCY_KEY:
        raise ValidationError(field, f"{field} must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    check_no_nul(value, field)
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


def check_run_timeout(value: object, field: str = "timeout_seconds") -> float:
    """How long a blocking run waits for its task; None is the longest."""
    if value is None:
        return MAX_RUN_WAIT_SECONDS
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError(field, f"{field} must be a number of seconds")
    if not 0 <= value <= MAX_RUN_WAIT_SECONDS:
        raise ValidationError(field, f"{field} must be from 0 to {MAX_RUN_WAIT_SECONDS:g} seconds")
    return float(value)


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


def check_depends_on(value: object, field: str = "depends_on") -> tuple[str, ...]:
    """Task ids, at most MAX_DEPENDENCIES; a repeated id counts once (the first place is kept)."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValidationError(field, f"{field} must be a list of task ids")
    if len(value) > MAX_DEPENDENCIES:
        raise ValidationError(field, f"{field} may name at most {MAX_DEPENDENCIES} tasks")
    seen: dict[str, None] = {}
    for index, item in enumerate(value):
        seen[check_task_id(item, f"{field}[{index}]")] = None
    return tuple(seen)


def check_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, f"{field} must be true or false")
    return value


def check_progress(value: object, field: str = "progress") -> float | None:
    """A fraction of the work done: from 0 to 1 (0.25 is a quarter); None leaves it as it is."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValidationError(field, f"{field} must be a number from 0 to 1 (0.5 is half done)")
    return float(value)


def check_progress_message(value: object, field: str = "message") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_PROGRESS_MESSAGE:
        raise ValidationError(
            field, f"{field} must be a string of at most {MAX_PROGRESS_MESSAGE:,} characters"
        )
    check_no_nul(value, field)
    return value


def check_log_lines(value: object, field: str = "lines") -> list[str]:
    """1 to MAX_LOG_LINES_PER_CALL lines of at most MAX_LOG_LINE_BYTES UTF-8 bytes each; a batch
    with one bad line is refused whole, naming the line (`lines[3]`)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValidationError(field, f"{field} must be a list of strings")
    if not 1 <= len(value) <= MAX_LOG_LINES_PER_CALL:
        raise ValidationError(field, f"{field} must hold 1 to {MAX_LOG_LINES_PER_CALL:,} lines")
    for index, line in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(line, str):
            raise ValidationError(name, f"{name} must be a string")
        try:
            size = len(line.encode())
        except UnicodeEncodeError:
            raise ValidationError(name, f"{name} must be valid Unicode text") from None
        if size > MAX_LOG_LINE_BYTES:
            raise ValidationError(
                name, f"{name} must be at most {MAX_LOG_LINE_BYTES:,} bytes of UTF-8 (got {size:,})"
            )
        check_no_nul(line, name)
    return list(value)


def check_log_line_number(value: object, field: str = "after") -> int:
    """A log line number as clients send it: a whole number >= 0 (0: from the first line)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT32:
        raise ValidationError(
            field, f"{field} must be a log line number: a whole number from 0 to {MAX_INT32}"
        )
    return value


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
    depends_on: object = None,
    require_review: object = None,
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
        depends_on=check_depends_on(depends_on, f"{prefix}depends_on"),
        require_review=False
        if require_review is None
        else check_bool(require_review, f"{prefix}require_review"),
    )


def check_instant(value: object, field: str) -> datetime:
    """An aware datetime, or its ISO 8601 text (as REST and MCP clients send it)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValidationError(field, f"{field} must be an ISO 8601 time, e.g. 2030-01-01T00:00:00Z")
    return check_aware(value, field)


def task_filter(
    *,
    statuses: Iterable[object] = (),
    work_directory: object = None,
    priority: object = None,
    tag: object = None,
    created_before: object = None,
    created_after: object = None,
    prefix: str = "",
) -> TaskFilter:
    """Validate the filters of a task listing or bulk change; None (or no status) leaves that
    filter out. `prefix` names where the filter sits, e.g. `filter.`."""
    return TaskFilter(
        statuses=tuple(
            check_status(status, f"{prefix}statuses" if prefix else "status") for status in statuses
        ),
        work_directory=None
        if work_directory is None
        else check_work_directory(work_directory, f"{prefix}work_directory"),
        priority=None if priority is None else check_priority(priority, f"{prefix}priority"),
        tag=None if tag is None else check_tag(tag, f"{prefix}tag"),
        created_before=None
        if created_before is None
        else check_instant(created_before, f"{prefix}created_before"),
        created_after=None
        if created_after is None
        else check_instant(created_after, f"{prefix}created_after"),
    )


def bulk_filter(
    where: TaskFilter, starts: Sequence[TaskStatus], operation: str, field: str = "filter"
) -> TaskFilter:
    """The filter of a bulk change, limited to the statuses the change starts from. An empty
    filter is refused, so that nobody changes every task by accident: naming the statuses
    (all of `starts`) is how to mean every task."""
    names = ", ".join(s.value for s in starts)
    if where.is_empty:
        raise ValidationError(
            field,
            f"{field} must narrow the tasks to {operation}: give at least one of statuses,"
            f" work_directory, priority, tag, created_before, created_after (to {operation} every"
            f" task it can, give statuses {names})",
        )
    wrong = [s.value for s in where.statuses if s not in starts]
    if wrong:
        raise ValidationError(
            f"{field}.statuses",
            f"{field}.statuses may only hold {names}, the statuses {operation} starts from"
            f" (not {wrong[0]})",
        )
    statuses = where.statuses or tuple(starts)
    return TaskFilter(
        statuses=tuple(dict.fromkeys(statuses)),
        work_directory=where.work_directory,
        priority=where.priority,
        tag=where.tag,
        created_before=where.created_before,
        created_after=where.created_after,
    )


NO_CAP = 0  # as max_working: remove the cap (an explicit null says the same)


def check_max_working(value: object, field: str = "max_working") -> int | None:
    """A cap on WORKING tasks: a whole number >= 1, or None / 0 for no cap."""
    if value is None or (value == NO_CAP and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT32:
        raise ValidationError(
            field,
            f"{field} must be a whole number from 1 to {MAX_INT32:,}, or null (or 0) for no cap",
        )
    return value


def directory_changes(
    *, max_working: object = None, set_max_working: bool, paused: object
) -> DirectoryChanges:
    """Validate an edit of a directory's controls; `set_max_working` False (the argument was
    left out) keeps the cap, and `paused` None keeps the pause as it is."""
    if paused is not None and not isinstance(paused, bool):
        raise ValidationError("paused", "paused must be true or false")
    return DirectoryChanges(
        set_max_working=set_max_working,
        max_working=check_max_working(max_working) if set_max_working else None,
        paused=paused,
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
