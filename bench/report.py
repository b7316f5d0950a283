"""Medians across runs, ratios to the floor, the printed table and the JSON document."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import targets
from bench.stats import median

MEDIAN_FIELDS = (
    "throughput", "requests_per_s", "generator_cpu", "server_cpu", "server_rss_mb",
    "server_rss_total_mb", "other_cpu", "errors",
)  # fmt: skip


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def code_version() -> dict[str, Any]:
    """Which server code was measured: the commit, and a digest of api/ as it is on disk."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    digest = hashlib.sha256()
    for path in sorted((root / "api").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return {"commit": commit, "api_sha256": digest.hexdigest()[:16]}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, scenario): the median of each figure over the runs."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for one in rows:
        groups[(one["config"], one["scenario"])].append(one)
    merged: list[dict[str, Any]] = []
    for (config, scenario), runs in groups.items():
        first = runs[0]
        row: dict[str, Any] = {
            "config": config,
            "scenario": scenario,
            "runs": len(runs),
            "unit": first["unit"],
            "connections": first.get("connections"),
            "latency_op": first["latency_op"],
        }
        for key in MEDIAN_FIELDS:
            row[key] = median([float(r.get(key, float("nan"))) for r in runs])
        row["latency_ms"] = {
            q: median([r["latency_ms"][q] for r in runs]) for q in ("p50", "p99", "max")
        }
        row["counters"] = first.get("counters", {})
        if "store_claim_ms" in first:
            row["store_claim_ms"] = {
                q: median([r["store_claim_ms"][q] for r in runs]) for q in ("p50", "p99", "max")
            }
        if "waiting_tasks" in first:
            row["waiting_tasks"] = first["waiting_tasks"]
        row["error_samples"] = [s for r in runs for s in r.get("error_samples", [])][:3]
        merged.append(row)
    floor = next((r for r in merged if r["scenario"] == "floor-graphql"), None)
    for row in merged:
        row["ratio_to_floor"] = (
            row["requests_per_s"] / floor["requests_per_s"] if floor else float("nan")
        )
    return merged


def document(rows: list[dict[str, Any]], settings: dict[str, Any], started: str) -> dict[str, Any]:
    results = aggregate(rows)
    by_key = {(r["config"], r["scenario"]): r for r in results}
    floor_json = by_key.get(("floor", "floor-json"))
    small = next((r for r in results if r["scenario"].startswith("growth-")), None)
    big = [r for r in results if r["scenario"].startswith("growth-")]
    growth_ratio = (
        big[-1]["latency_ms"]["p50"] / small["latency_ms"]["p50"]
        if small and len(big) > 1
        else None
    )
    return {
        "started_at": started,
        "machine": machine(),
        "code": code_version(),
        "settings": settings,
        "generator": {
            "ceiling_requests_per_s": floor_json["requests_per_s"] if floor_json else None,
            "cpu_at_ceiling": floor_json["generator_cpu"] if floor_json else None,
        },
        "growth_p50_ratio": growth_ratio,
        "targets": targets.check(results),
        "results": results,
        "runs": rows,
    }


def _num(value: float, digits: int = 0) -> str:
    if value != value:
        return "-"
    return f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| config | scenario | conns | throughput | req/s | x floor | p50 ms | p99 ms | max ms"
        " | RSS MB | server CPU | gen CPU | other CPU | errors |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in results:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['config']} | {r['scenario']} | {r['connections']} "
            f"| {_num(r['throughput'])} {r['unit']} | {_num(r['requests_per_s'])} "
            f"| {_num(r['ratio_to_floor'], 2)} | {_num(lat['p50'], 1)} | {_num(lat['p99'], 1)} "
            f"| {_num(lat['max'], 1)} | {_num(r['server_rss_mb'])} | {_num(r['server_cpu'], 2)} "
            f"| {_num(r['generator_cpu'], 2)} | {_num(r.get('other_cpu', float('nan')), 2)} "
            f"| {_num(r['errors'])} |"
        )
    return "\n".join(lines)
