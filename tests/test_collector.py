"""The server's garbage-collection schedule: startup's objects frozen, no full pass of CPython's
own while serving, full passes on the collector's clock, and everything as it was after stop."""

from __future__ import annotations

import asyncio
import gc

from api.ops.collector import NEVER, Collector


def full_passes() -> int:
    return int(gc.get_stats()[2]["collections"])


async def make_cyclic_garbage() -> None:
    """Enough cycles for many young passes, some of which promote what they find alive."""
    for _ in range(200):
        junk: list[object] = []
        for _ in range(10_000):
            cycle: list[object] = []
            cycle.append(cycle)
            junk.append(cycle)
        del junk
        await asyncio.sleep(0)


async def test_no_full_pass_between_the_collectors_own_and_stop_restores_the_defaults() -> None:
    before = gc.get_threshold()
    collector = Collector(interval=3600)
    collector.start()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (before[0], before[1], NEVER)
        passes = full_passes()
        await make_cyclic_garbage()
        assert gc.get_count()[2] > 0  # young passes ran since the last full one
        assert full_passes() == passes
    finally:
        await collector.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert collector.task is None


async def test_the_collector_makes_a_full_pass_each_interval() -> None:
    collector = Collector(interval=0.05)
    collector.start()
    try:
        passes = full_passes()
        await make_cyclic_garbage()
        for _ in range(100):
            if full_passes() > passes:
                break
            await asyncio.sleep(0.02)
        assert full_passes() > passes
    finally:
        await collector.stop()


async def test_starting_twice_keeps_the_first_schedule() -> None:
    before = gc.get_threshold()
    collector = Collector(interval=60)
    collector.start()
    task = collector.task
    collector.start()
    try:
        assert collector.task is task
    finally:
        await collector.stop()
    assert gc.get_threshold() == before
