"""Latency summaries (nearest-rank percentiles, in milliseconds) and medians across runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, p50, p99 and max of latencies given in seconds, reported in milliseconds."""
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 0.50) * 1000,
        "p99": percentile(ordered, 0.99) * 1000,
        "max": (ordered[-1] if ordered else float("nan")) * 1000,
    }


def median(values: Sequence[float]) -> float:
    present = [v for v in values if v == v]  # NaN marks a figure a run could not measure
    return statistics.median(present) if present else float("nan")
