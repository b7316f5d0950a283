"""The server's garbage collection: startup's objects frozen out of the passes, CPython's own
schedule kept (it bounds the memory cyclic garbage holds), everything as it was after stop."""

from __future__ import annotations

import gc

from api.ops.collector import Collector


def make_cyclic_garbage() -> None:
    for _ in range(200):
        junk: list[object] = []
        for _ in range(10_000):
            cycle: list[object] = []
            cycle.append(cycle)
            junk.append(cycle)
        del junk


def test_startup_is_frozen_and_full_passes_still_run_on_heap_growth() -> None:
    before = gc.get_threshold()
    collector = Collector()
    collector.start()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == before
        passes = gc.get_stats()[2]["collections"]
        make_cyclic_garbage()
        assert gc.get_stats()[2]["collections"] > passes  # CPython's own full passes ran
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0


def test_starting_twice_freezes_once_and_stop_unfreezes() -> None:
    collector = Collector()
    collector.start()
    frozen = gc.get_freeze_count()
    collector.start()
    try:
        assert gc.get_freeze_count() == frozen
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0
    collector.stop()  # a second stop does nothing
    assert gc.get_freeze_count() == 0
