"""Schemathesis hooks for the REST v1 run: keep waiting claims short."""

from __future__ import annotations

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
