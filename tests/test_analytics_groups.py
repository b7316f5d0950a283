"""The whole-column helpers behind the metrics give what the row-by-row pandas forms give."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analytics import claims, groups


def test_busy_stretches_merge_overlapping_claims_per_worker() -> None:
    # worker 0: [0, 10) and [5, 20) overlap, [30, 40) apart; worker 1: [0, 5); worker -1: none
    worker = np.array([0, 1, 0, 0, -1])
    lo = np.array([0, 0, 5, 30, 0]) * 1_000_000
    hi = np.array([10, 5, 20, 40, 99]) * 1_000_000
    names, seconds = claims.held(worker, lo, hi)
    assert names.tolist() == [0, 0, 1]
    assert seconds.tolist() == [20.0, 10.0, 5.0]


def test_running_maximum_per_group_also_for_times_too_far_apart_to_lift() -> None:
    group = np.array([0, 0, 0, 1, 1, 2])
    for scale in (1, 2**59):  # the second overflows the lifted form: pandas computes it
        values = np.array([3, 1, 5, 2, 0, 1]) * scale
        expected = pd.Series(values).groupby(group).cummax().to_numpy()
        assert claims._running_max(group, values).tolist() == expected.tolist()


def test_sums_by_tag_equal_the_exploded_rows_whether_lists_are_shared_or_not() -> None:
    shared = ["bug", "ci"]
    tags = pd.Series([shared, shared, ["docs", "ci"], [], ["bug", "ci"]], dtype=object)
    tasks = pd.DataFrame(
        {"tags": tags, "directory": pd.Categorical(["/b", "/a", "/b", "/a", "/a"])}
    )
    parts = pd.DataFrame({"tasks": np.ones(5, dtype="int64"), "n": np.arange(5, dtype="int64")})
    exploded = tasks.explode("tags")
    exploded = exploded[exploded["tags"].notna()]
    expected = (
        parts.loc[exploded.index].assign(tag=exploded["tags"].to_numpy()).groupby("tag").sum()
    )
    pd.testing.assert_frame_equal(groups.sums(parts, tasks, "tag"), expected)
    by_directory = parts.assign(directory=tasks["directory"].to_numpy()).groupby("directory").sum()
    pd.testing.assert_frame_equal(groups.sums(parts, tasks, "directory"), by_directory)
