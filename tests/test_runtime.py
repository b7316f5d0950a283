"""The runtime each process opens: its service follows the settings; jobs run only when serving."""

from __future__ import annotations

import asyncio

import pytest

from api.core.domain import EventFilter
from api.core.errors import NotFound
from api.core.validation import task_spec
from api.events.bus import SlowSubscriber
from api.runtime import runtime
from api.settings import Settings
from tests.conftest import FakeClock, eventually


async def test_service_keeps_the_subscriber_buffer_of_the_settings(database_url: str) -> None:
    settings = Settings(database_url=database_url, subscriber_buffer=2)
    async with runtime(settings) as running:
        events = running.service.events(EventFilter())
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.1)  # subscribed, waiting for the first event
        await running.service.submit_many(
            [task_spec(work_directory="/r", prompt=str(i)) for i in range(3)]
        )
        with pytest.raises(SlowSubscriber, match="more than 2 events behind"):
            await first
        await events.aclose()


async def test_retention_runs_only_as_a_background_job(database_url: str) -> None:
    clock = FakeClock()
    settings = Settings(database_url=database_url, retention="1h")
    async with runtime(settings, serving=False, clock=clock) as running:
        task = await running.service.submit(task_spec(work_directory="/r", prompt="p"))
        await running.service.claim("/r", "w")
        await running.service.complete(task.id, "w", None)
    clock.advance(2 * 3600)

    async with runtime(settings, serving=False, clock=clock) as running:
        await asyncio.sleep(0.3)  # a retention job prunes as soon as it starts
        assert (await running.service.get(task.id)).id == task.id

    async with runtime(settings, clock=clock) as running:

        async def pruned() -> bool:
            try:
                await running.service.get(task.id)
            except NotFound:
                return True
            return False

        await eventually(pruned)
