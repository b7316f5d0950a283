"""The performance targets, checked against a run's medians: met or missed, and by how much."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Rows = dict[tuple[str, str], dict[str, Any]]
PRIMARY = "sqlite-full-1p"  # the default configuration: one process, durability=full


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measure: Callable[[Rows], tuple[float, str] | None]  # (fraction of the goal reached, figure)


def _get(rows: Rows, config: str, scenario: str) -> dict[str, Any] | None:
    return rows.get((config, scenario))


def _submit_vs_floor(rows: Rows) -> tuple[float, str] | None:
    submit, floor = _get(rows, PRIMARY, "submit"), _get(rows, "floor", "floor-graphql")
    if not submit or not floor:
        return None
    ratio = submit["requests_per_s"] / floor["requests_per_s"]
    return (
        ratio,
        f"{ratio:.0%} of the floor mutation ({submit['requests_per_s']:,.0f} req/s)",
    )


def _best(rows: Rows, scenario: str) -> dict[str, Any] | None:
    found = [r for (c, s), r in rows.items() if s == scenario]
    return max(found, key=lambda r: r["throughput"]) if found else None


def _lifecycle_rate(rows: Rows) -> tuple[float, str] | None:
    best = _best(rows, "lifecycle")
    if not best:
        return None
    return best["throughput"] / 1000, f"{best['throughput']:,.0f} tasks/s ({best['config']})"


def _lifecycle_p99(rows: Rows) -> tuple[float, str] | None:
    best = _best(rows, "lifecycle")
    if not best:
        return None
    p99 = best["latency_ms"]["p99"]
    return 100 / p99, f"p99 {p99:,.0f} ms ({best['config']})"


def _rate(scenario: str, goal: float) -> Callable[[Rows], tuple[float, str] | None]:
    def measure(rows: Rows) -> tuple[float, str] | None:
        best = _best(rows, scenario)
        if not best:
            return None
        return best["throughput"] / goal, f"{best['throughput']:,.0f} tasks/s ({best['config']})"

    return measure


def _latency(
    scenario: str, quantile: str, goal_ms: float
) -> Callable[[Rows], tuple[float, str] | None]:
    def measure(rows: Rows) -> tuple[float, str] | None:
        row = _get(rows, PRIMARY, scenario)
        if not row:
            return None
        value = row["latency_ms"][quantile]
        return goal_ms / value, f"{quantile} {value:,.1f} ms ({PRIMARY})"

    return measure


def _growth(rows: Rows) -> tuple[float, str] | None:
    found = sorted(
        (r for (c, s), r in rows.items() if s.startswith("growth-")),
        key=lambda r: r.get("waiting_tasks", 0),
    )
    if len(found) < 2:
        return None
    small, big = found[0]["latency_ms"]["p50"], found[-1]["latency_ms"]["p50"]
    ratio = big / small
    figure = f"over HTTP p50 {big:,.1f} vs {small:,.1f} ms: {ratio:.2f}x"
    if "store_claim_ms" in found[0] and "store_claim_ms" in found[-1]:
        # The store's own claim, without the HTTP and GraphQL cost in front that hides it.
        s_small, s_big = found[0]["store_claim_ms"]["p50"], found[-1]["store_claim_ms"]["p50"]
        store_ratio = s_big / s_small
        figure += f"; store alone {s_big:,.2f} vs {s_small:,.2f} ms: {store_ratio:.2f}x"
        ratio = max(ratio, store_ratio)
    return 2 / ratio, figure


def _memory(rows: Rows) -> tuple[float, str] | None:
    # Every scenario counts: a thousand subscribers' sockets weigh more than a lifecycle's load.
    found = [r for r in rows.values() if r.get("server_rss_mb")]
    if not found:
        return None
    worst = max(found, key=lambda r: r["server_rss_mb"])
    figure = f"{worst['server_rss_mb']:,.0f} MB ({worst['config']}, {worst['scenario']})"
    return 128 / worst["server_rss_mb"], figure


def _keys(rows: Rows) -> tuple[float, str] | None:
    keyed, anonymous = (
        _get(rows, "sqlite-full-1p-keys", "lifecycle"),
        _get(rows, PRIMARY, "lifecycle"),
    )
    if not keyed or not anonymous:
        return None
    ratio = keyed["throughput"] / anonymous["throughput"]
    return ratio / 0.9, f"with keys at {ratio:.0%} of anonymous"


def _durability(rows: Rows) -> tuple[float, str] | None:
    full, normal = _get(rows, PRIMARY, "lifecycle"), _get(rows, "sqlite-normal-1p", "lifecycle")
    if not full or not normal:
        return None
    ratio = full["throughput"] / normal["throughput"]
    return ratio / 0.75, f"full at {ratio:.0%} of normal"


TARGETS = (
    Target("submit vs floor", ">= 1.0x the bare mutation", _submit_vs_floor),
    Target("lifecycle rate", ">= 1,000 tasks/s", _lifecycle_rate),
    Target("lifecycle p99", "< 100 ms", _lifecycle_p99),
    Target("batch submit", ">= 20,000 tasks/s", _rate("batch-submit", 20_000)),
    Target("batch claim+complete", ">= 10,000 tasks/s", _rate("batch-claim", 10_000)),
    Target("wake-up p50", "<= 5 ms", _latency("wakeup", "p50", 5)),
    Target("wake-up p99", "<= 25 ms", _latency("wakeup", "p99", 25)),
    Target("fan-out p99", "<= 100 ms to 1,000", _latency("fanout", "p99", 100)),
    Target("growth", "claim at 1M within 2x of 1k", _growth),
    Target("memory", "peak RSS <= 128 MB", _memory),
    Target("durability", "full within 25% of normal", _durability),
    Target("keys", "lifecycle with keys within 10% of anonymous", _keys),
)


def check(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: Rows = {(r["config"], r["scenario"]): r for r in results}
    checked = []
    for target in TARGETS:
        outcome = target.measure(rows)
        if outcome is None:
            continue
        reached, figure = outcome
        checked.append({
            "target": target.name, "goal": target.goal, "measured": figure,
            "met": reached >= 1, "reached": reached,
        })  # fmt: skip
    return checked


def table(checked: list[dict[str, Any]]) -> str:
    lines = ["| target | goal | measured | met? |", "|---|---|---|---|"]
    for c in checked:
        verdict = "met" if c["met"] else f"missed ({c['reached']:.0%} of the goal)"
        lines.append(f"| {c['target']} | {c['goal']} | {c['measured']} | {verdict} |")
    return "\n".join(lines)
