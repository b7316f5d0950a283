"""`python -m bench`: run the benchmark suite, print the table and write the JSON file."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report, targets
from bench.run import (
    CONFIGS,
    GROWTH_CONFIG,
    MATRIX_SCENARIOS,
    SCENARIOS,
    run_config,
    run_floor,
    run_growth,
    sizes,
)
from bench.servers import scratch_dir

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "latest.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all, tiny counts")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated: {','.join(CONFIGS)}"
    )
    parser.add_argument("--duration", type=float, help="measured seconds per scenario (default 5)")
    parser.add_argument("--connections", type=int, help="concurrent connections (default 100)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; figures are their medians")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    args = parser.parse_args(argv)
    for key, known in (("scenarios", SCENARIOS), ("configs", tuple(CONFIGS))):
        chosen = [name for name in getattr(args, key).split(",") if name]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"--{key}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        setattr(args, key, chosen)
    if args.repeat < 1:
        parser.error("--repeat: use 1 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Stopped with SIGTERM, still stop the servers and remove the scratch files (finally blocks).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    size = sizes(args.quick, args.duration, args.connections)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    code_at_start = report.code_version()  # the document records it again at the end
    rows: list[dict[str, Any]] = []
    workdir = scratch_dir()

    current = {"run": 0}

    def emit(row: dict[str, Any]) -> None:
        run = row["run"] = current["run"]
        rows.append(row)
        lat = row["latency_ms"]
        print(
            f"  run {run} {row['config']:<16} {row['scenario']:<16} {row['throughput']:>10,.0f}"
            f" {row['unit']:<13} p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms"
            f"  errors {row['errors']}",
            flush=True,
        )

    matrix = [s for s in MATRIX_SCENARIOS if s in args.scenarios]
    try:
        for run in range(1, args.repeat + 1):
            current["run"] = run
            if "floor" in args.scenarios:
                run_floor(workdir, size, emit)
            for name in args.configs:
                if matrix:
                    run_config(CONFIGS[name], matrix, workdir, size, emit)
            if "growth" in args.scenarios and GROWTH_CONFIG in args.configs:
                run_growth(workdir, size, emit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    settings = {
        "quick": args.quick, "duration_s": size.duration, "warmup_s": size.warmup,
        "connections": size.connections, "repeat": args.repeat, "scenarios": args.scenarios,
        "configs": args.configs, "batch": size.batch, "batch_connections": size.batch_connections,
        "subscribers": size.subscribers, "growth_sizes": list(size.growth),
        "code_at_start": code_at_start,
    }  # fmt: skip
    doc = report.document(rows, settings, started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False))
    print()
    print(report.table(doc["results"]))
    generator = doc["generator"]
    if generator["ceiling_requests_per_s"] is not None:
        print(
            f"\nload generator ceiling (bare Starlette route): {generator['ceiling_requests_per_s']:,.0f}"
            f" req/s using {generator['cpu_at_ceiling']:.2f} of a core"
        )
    if doc["growth_p50_ratio"] is not None:
        print(f"claim p50 at the largest vs smallest queue: {doc['growth_p50_ratio']:.2f}x")
    if doc["targets"]:
        print()
        print(targets.table(doc["targets"]))
    print(f"\nwrote {args.output}")
    return 0


def _finite(value: Any) -> Any:
    """NaN (a figure a run could not measure) becomes null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
