"""Export: the loaded `tasks` and `events` frames written as Parquet or CSV files, for offline
analysis in any tool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from analytics.load import TimeLike, load
from analytics.sources import SourceError

Format = Literal["parquet", "csv"]
FORMATS: tuple[Format, ...] = ("parquet", "csv")


@dataclass(frozen=True)
class Exported:
    tasks: int
    events: int
    files: tuple[Path, Path]


def export(
    source: str,
    output: str | Path,
    format: str = "parquet",
    since: TimeLike = None,
    until: TimeLike = None,
) -> Exported:
    """Write `tasks.<format>` and `events.<format>` under `output` (created when missing) from
    `analytics.load(source, since, until)`. Parquet keeps every dtype (categories, UTC times, tag
    lists); CSV writes times as ISO 8601 and tags as a JSON list."""
    if format not in FORMATS:
        raise SourceError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    directory = Path(output)
    if directory.exists() and not directory.is_dir():
        raise SourceError(f"output must be a directory, and {directory} is a file")
    data = load(source, since, until)
    directory.mkdir(parents=True, exist_ok=True)
    tasks_file, events_file = directory / f"tasks.{format}", directory / f"events.{format}"
    if format == "parquet":
        data.tasks.to_parquet(tasks_file, index=False)
        data.events.to_parquet(events_file, index=False)
    else:
        _csv(data.tasks.assign(tags=data.tasks["tags"].map(json.dumps)), tasks_file)
        _csv(data.events, events_file)
    return Exported(len(data.tasks), len(data.events), (tasks_file, events_file))


def _csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ")
