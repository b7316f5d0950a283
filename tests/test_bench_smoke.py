"""The benchmark suite runs end to end in its quick mode and writes the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_results_for_each_scenario(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--scenarios",
            "floor,submit,lifecycle",
            "--configs",
            "sqlite-normal-1p",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    doc = json.loads(output.read_text())
    assert {"machine", "settings", "generator", "results", "runs"} <= doc.keys()
    assert doc["settings"]["quick"] is True
    rows = {(r["config"], r["scenario"]): r for r in doc["results"]}
    assert set(rows) == {
        ("floor", "floor-json"),
        ("floor", "floor-graphql"),
        ("sqlite-normal-1p", "submit"),
        ("sqlite-normal-1p", "lifecycle"),
    }
    for row in rows.values():
        assert {
            "throughput",
            "unit",
            "requests_per_s",
            "ratio_to_floor",
            "server_rss_mb",
        } <= row.keys()
        assert {"p50", "p99", "max"} <= row["latency_ms"].keys()
        assert row["errors"] == 0, row["error_samples"]
        assert row["throughput"] > 0
    assert rows[("sqlite-normal-1p", "lifecycle")]["unit"] == "tasks/s"
    assert rows[("floor", "floor-graphql")]["ratio_to_floor"] == 1.0
    assert "| sqlite-normal-1p | submit |" in finished.stdout


def test_write_path_bench_prints_cpu_per_task_of_each_path() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.write_path", "--rounds", "1", "--durability", "normal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    assert set(figures) == {"batch-submit", "batch-claim-complete", "lifecycle"}
    for row in figures.values():
        assert row["tasks"] > 0
        assert row["tasks_per_cpu_s"] > 0
        assert row["cpu_us_per_task"] > 0


def test_pg_cost_bench_prints_server_cpu_and_statements_per_lifecycle(postgres_url: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.pg_cost", "--clients", "4", "--seconds", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    first, *statements = finished.stdout.strip().splitlines()
    assert "lifecycles/s; per lifecycle PostgreSQL CPU" in first, finished.stdout
    # Three changes and three reads of the active keys per lifecycle, at the least.
    assert float(first.split(", ")[-1].split()[0]) >= 6
    assert any("count(*) AS count FROM api_keys" in line for line in statements)
