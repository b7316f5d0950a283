"""Configuration: one frozen settings object, read once at start from TASKORCH_* variables and flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_DATABASE_URL = "sqlite:///./taskorch.db"


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
    subscriber_buffer: int = 1000
    log_level: str = "INFO"
    log_format: str = "json"
    graphiql: bool = True

    def __post_init__(self) -> None:
        _check(
            self.database_url.startswith(("sqlite:", "postgresql://", "postgres://")),
            "database_url",
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB",
        )
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

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
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

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


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
