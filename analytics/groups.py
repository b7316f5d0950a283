"""Per-group sums of per-task figures, by a column or by tag, without a row per (task, tag) pair:
the answer grouping the plain values would give, from the few distinct groups."""

from __future__ import annotations

import numpy as np
import pandas as pd


def sums(parts: pd.DataFrame, tasks: pd.DataFrame, key: str) -> pd.DataFrame:
    """`parts` (numeric, one row per task) summed per value of the tasks' column `key`, or per tag
    for "tag" (a task counts under each of its tags): indexed by the values, sorted, as a
    groupby over the plain values gives it."""
    if key == "tag":
        return _by_tag(parts, tasks["tags"])
    column = tasks[key]
    if isinstance(column.dtype, pd.CategoricalDtype) and _text(column.cat.categories):
        # Grouped by the integer codes, then labelled and ordered as the plain values would be.
        summed = parts.groupby(column.array, observed=True).sum()
        summed.index = pd.Index(np.asarray(summed.index, dtype=object).tolist(), name=key)
        return summed.sort_index()
    return parts.assign(**{key: column.to_numpy()}).groupby(key, observed=True).sum()


def _text(categories: pd.Index) -> bool:
    return all(isinstance(value, str) for value in categories)


def _by_tag(parts: pd.DataFrame, tags: pd.Series) -> pd.DataFrame:
    # Loaded frames share one list among the tasks with the same tags, so the lists' identities
    # name the few tag sets: sum per set, then count each set's sum under each of its tags.
    values = np.asarray(tags.to_numpy(), dtype=object)
    # An object array's raw contents are its objects' addresses, which are their id()s: read all
    # at once instead of calling id() a million times. The addresses are only compared here, and
    # `values` holds the objects alive meanwhile.
    identities = np.frombuffer(values.tobytes(), dtype=np.intp)
    _, first, inverse = np.unique(identities, return_index=True, return_inverse=True)
    summed = parts.groupby(inverse).sum()
    lists = np.empty(len(first), dtype=object)
    for i, row in enumerate(first):  # one at a time: numpy would read equal-length lists as 2-D
        lists[i] = values[row]
    summed["tag"] = lists[summed.index.to_numpy()]
    exploded = summed.explode("tag")
    exploded = exploded[exploded["tag"].notna()]
    labels = exploded.pop("tag").to_numpy()
    return exploded.assign(tag=labels).groupby("tag", observed=True).sum()
