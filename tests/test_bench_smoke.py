"""The benchmark suite runs end to end in its quick mode and writes the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str) -> str:
    """`python -m module args` from the project's root; its standard output, once it succeeded."""
    finished = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def test_quick_bench_writes_results_for_each_scenario(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    stdout = run_bench(
        "bench", "--quick", "--scenarios", "floor,submit,lifecycle",
        "--configs", "sqlite-normal-1p", "--output", str(output),
    )  # fmt: skip
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
    assert "| sqlite-normal-1p | submit |" in stdout


def test_write_path_bench_prints_cpu_per_task_of_each_path() -> None:
    stdout = run_bench("bench.write_path", "--rounds", "1", "--durability", "normal")
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert set(figures) == {"batch-submit", "batch-claim-complete", "lifecycle"}
    for row in figures.values():
        assert row["tasks"] > 0
        assert row["tasks_per_cpu_s"] > 0
        assert row["cpu_us_per_task"] > 0


def test_pg_cost_bench_prints_server_cpu_and_statements_per_lifecycle(postgres_url: str) -> None:
    stdout = run_bench("bench.pg_cost", "--clients", "4", "--seconds", "0.5")
    first, *statements = stdout.strip().splitlines()
    assert "lifecycles/s; per lifecycle PostgreSQL CPU" in first, stdout
    # Three changes and three reads of the active keys per lifecycle, at the least.
    assert float(first.split(", ")[-1].split()[0]) >= 6
    assert any("count(*) AS count FROM api_keys" in line for line in statements)


def test_sqlite_processes_bench_prints_throughput_and_each_process_latency() -> None:
    stdout = run_bench("bench.sqlite_processes", "--processes", "2", "--clients", "4",
                       "--seconds", "0.5")  # fmt: skip
    lines = stdout.strip().splitlines()
    completed = lines[1].split()[0].replace(",", "")
    assert lines[1].endswith("tasks/s completed"), stdout
    assert float(completed) > 0, stdout
    assert [line.split(":")[0].strip() for line in lines[2:]] == ["process 1", "process 2"]
    assert all(" p99 " in line for line in lines[2:])


def test_analytics_bench_prints_each_step_and_each_target(tmp_path: Path) -> None:
    stdout = run_bench("bench.analytics_bench", "--tasks", "2000", "--server-tasks", "300",
                       "--database", str(tmp_path / "bench.db"), "--repeat", "3")  # fmt: skip
    assert "sqlite: 2,000 tasks" in stdout, stdout
    assert "server: 300 tasks" in stdout, stdout
    assert "medians of 3 runs" in stdout, stdout
    steps = {line.split("  ")[1].strip(): line for line in stdout.splitlines() if " cores" in line}
    # every run's wall time after the median's columns: three of them
    assert len(steps["sqlite load (all)"].split("cores")[1].split(",")) == 3, stdout
    targets = stdout.split("targets (wall time):")[1].strip().splitlines()
    assert [t.strip().split("  ")[0] for t in targets] == [
        "sqlite load (all)", "sqlite all metrics", "server load (all)", "peak memory",
    ], stdout  # fmt: skip
