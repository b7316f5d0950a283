"""Configuration: one frozen settings object, read once at start from TASKORCH_* variables and flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from api.database_url import Backend, DatabaseUrlError, backend_of, sqlite_path

DEFAULT_DATABASE_URL = "sqlite:///./taskorch.db"
MCP_PROFILES = ("worker", "producer", "admin", "all")  # the tool sets MCP serves (see mcp.py)
MAX_WORKERS = 64  # each is a whole server with its own connections (11 each on PostgreSQL)


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the key and what to give instead."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8080
    durability: str = "full"  # full: survives power loss; normal: survives a process kill
    lease_sweep_interval: float = 1.0
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    subscriber_buffer: int = 10_000
    log_level: str = "INFO"
    log_format: str = "json"
    graphiql: bool = True
    # Requests a minute per API key (or client address) unless the key has its own; 0: no limit.
    # 60,000 (1,000 a second, a minute's worth in one burst) is about what one process can serve,
    # so a worker fleet sharing one key is not throttled by the default.
    rate_limit: int = 60_000
    max_body_bytes: int = 1024 * 1024
    max_query_depth: int = 10
    max_aliases: int = 30
    max_tokens: int = 10_000
    introspection: bool = True
    # Answer documents already served once by their compiled plan (api/interfaces/gql/compiled.py).
    compiled_execution: bool = True
    retention: str = "off"  # finished tasks older than this are pruned automatically, e.g. 30d
    shutdown_timeout: int = 10  # seconds in-flight requests get to finish on SIGTERM
    workers: int = 1  # server processes sharing the port (`serve --workers`)
    mcp_tools: str = "all"  # the tool profile `/mcp` serves; `/mcp/<profile>` serves each

    def __post_init__(self) -> None:
        problem = _database_url_problem(self.database_url)
        _check(problem is None, "database_url", problem or "")
        _check(1 <= self.port <= 65535, "port", "use a port from 1 to 65535")
        _check(self.durability in ("full", "normal"), "durability", "use full or normal")
        _check(self.lease_sweep_interval > 0, "lease_sweep_interval", "use a positive number")
        _check(self.backoff_base > 0, "backoff_base", "use a positive number of seconds")
        _check(self.backoff_cap >= self.backoff_base, "backoff_cap", "use at least backoff_base")
        _check(self.subscriber_buffer >= 1, "subscriber_buffer", "use a positive whole number")
        _check(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            "log_level",
            "use DEBUG, INFO, WARNING, ERROR or CRITICAL",
        )
        _check(self.log_format in ("json", "text"), "log_format", "use json or text")
        _check(self.rate_limit >= 0, "rate_limit", "use requests a minute, or 0 for no limit")
        for key in ("max_body_bytes", "max_query_depth", "max_aliases", "max_tokens"):
            _check(getattr(self, key) >= 1, key, "use a positive whole number")
        _check(
            self.retention == "off" or _duration_or_none(self.retention) is not None,
            "retention",
            "use off or a duration such as 30d, 12h, 90m or 45s",
        )
        _check(self.mcp_tools in MCP_PROFILES, "mcp_tools", f"use one of {', '.join(MCP_PROFILES)}")
        _check(self.shutdown_timeout > 0, "shutdown_timeout", "use a positive number of seconds")
        _check(
            1 <= self.workers <= MAX_WORKERS, "workers", f"use 1 to {MAX_WORKERS} server processes"
        )

    @property
    def backend(self) -> Backend:
        """Which store, bus and tools this database takes: "sqlite" or "postgres"."""
        return backend_of(self.database_url)

    @property
    def sqlite_path(self) -> str:
        """The SQLite file, as given in the URL; asking on PostgreSQL is a programming error."""
        if self.backend != "sqlite":
            raise SettingsError("database_url is a PostgreSQL URL: there is no SQLite file")
        return sqlite_path(self.database_url)

    @property
    def retention_period(self) -> timedelta | None:
        """How long finished tasks are kept; None keeps them forever."""
        return None if self.retention == "off" else parse_duration(self.retention)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then TASKORCH_<KEY> variables, then explicit overrides (CLI flags) that are not None."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"TASKORCH_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:  # an unknown override key is a programming error
            raise SettingsError(str(exc)) from exc


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> a positive timedelta; ValueError otherwise."""
    duration = _duration_or_none(text)
    if duration is None:
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit, like 30d, 12h or 90m"
        )
    return duration


def _duration_or_none(text: str) -> timedelta | None:
    match = _DURATION.match(text.lower())
    if match is None or float(match.group(1)) <= 0:
        return None
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _database_url_problem(url: str) -> str | None:
    try:
        if backend_of(url) == "sqlite":
            sqlite_path(url)
    except DatabaseUrlError as exc:
        return str(exc)
    return None


def _check(ok: bool, key: str, advice: str) -> None:
    if not ok:
        raise SettingsError(f"invalid setting {key} (TASKORCH_{key.upper()}): {advice}")


def _parse(key: str, raw: str, kind: object) -> Any:
    env = f"TASKORCH_{key.upper()}"
    if kind in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"invalid setting {env}={raw!r}: use a whole number") from None
    if kind in ("float", float):
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"invalid setting {env}={raw!r}: use a number") from None
    if kind in ("bool", bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"invalid setting {env}={raw!r}: use true or false")
    return raw
