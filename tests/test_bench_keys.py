"""The benchmark's configuration with keys on: every request carries a key and none is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_with_keys_on_answers_every_request(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "lifecycle,fanout",
         "--configs", "sqlite-full-1p-keys", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = {r["scenario"]: r for r in json.loads(output.read_text())["results"]}
    assert set(rows) == {"lifecycle", "fanout"}
    for row in rows.values():
        # a key exists, so a request without one would be refused (401) and counted as an error
        assert row["errors"] == 0, row["error_samples"]
        assert row["throughput"] > 0
