"""Schemathesis hooks for the REST v1 run: keep waiting claims short, and depend only on tasks
that exist."""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis

SHORT_WAIT = 0.05


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    # A valid wait blocks up to a minute when nothing is claimable; a shorter one is just as valid
    # and keeps the run short. Invalid waits are left alone: the server must refuse them.
    wait = (case.query or {}).get("wait_seconds")
    try:
        seconds = float(wait) if isinstance(wait, int | float | str) else None
    except ValueError:
        seconds = None
    if seconds is not None and SHORT_WAIT < seconds <= 60 and case.query is not None:
        case.query["wait_seconds"] = SHORT_WAIT
    # A well-formed list of random task ids names tasks that do not exist, which the server must
    # refuse (400, naming the item); generated ids cannot name real tasks, so a schema-valid list
    # is sent empty. Malformed lists are left alone: the server must refuse those too.
    body = case.body
    if case.method == "POST" and case.path.endswith("/tasks") and isinstance(body, dict):
        depends_on = body.get("depends_on")
        if (
            isinstance(depends_on, list)
            and len(depends_on) <= 100
            and all(map(_is_uuid, depends_on))
        ):
            body["depends_on"] = []


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)
