"""Waiting calls over HTTP: abandon the work when the client goes away first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; None if the client disconnects first. A waiting claim whose caller went away
    must take no task: cancelling it makes the service release anything claimed at that moment."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job in done:
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
    return None


async def _disconnected(request: Request) -> None:
    # Once the body is read, the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass
