"""API keys: scopes, how raw keys are made and hashed, and issuing, listing and revoking them."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import datetime

from api.core.domain import ApiKey
from api.core.errors import Conflict, NotFound, ValidationError
from api.store.base import KeyStore

READ = "read"
SUBMIT = "submit"
WORK = "work"
REVIEW = "review"
ADMIN = "admin"
SCOPES = (READ, SUBMIT, WORK, REVIEW, ADMIN)

KEY_PREFIX = "tko_"
MAX_NAME = 64
MAX_RATE_LIMIT = 2**31 - 1  # fits the INTEGER column on both backends
_NAME = re.compile(r"^[A-Za-z0-9_.:@\-]+$")


def parse_scopes(value: str | Iterable[str], field: str = "scopes") -> tuple[str, ...]:
    """`submit,work,read` -> ('read', 'submit', 'work'); an unknown scope is named in the error."""
    items = value.split(",") if isinstance(value, str) else list(value)
    scopes = {item.strip().lower() for item in items if item.strip()}
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValidationError(
            field, f"unknown scope {', '.join(map(repr, unknown))}: use {', '.join(SCOPES)}"
        )
    if not scopes:
        raise ValidationError(field, f"{field} must name at least one of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


def check_key_name(name: str, field: str = "name") -> str:
    if not 1 <= len(name) <= MAX_NAME or not _NAME.match(name):
        raise ValidationError(
            field,
            f"{field} must be 1 to {MAX_NAME} characters of letters, digits and _ . : @ -",
        )
    return name


def new_raw_key() -> str:
    """256 random bits: far beyond guessing, so a plain SHA-256 is a safe way to store it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def check_rate_limit(value: int | None, field: str = "rate_limit") -> int | None:
    """A key's own requests a minute: None keeps the server's default, 0 means no limit."""
    if value is not None and (isinstance(value, bool) or not 0 <= value <= MAX_RATE_LIMIT):
        raise ValidationError(
            field,
            f"{field} must be a whole number of requests a minute from 0 (no limit) to"
            f" {MAX_RATE_LIMIT:,}; leave it out for the server's default",
        )
    return value


async def issue_key(
    keys: KeyStore,
    name: str,
    scopes: str | Iterable[str],
    now: datetime,
    rate_limit: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns what is stored and the raw key, which is shown once and never stored."""
    name = check_key_name(name)
    granted = parse_scopes(scopes)
    limit = check_rate_limit(rate_limit)
    raw = new_raw_key()
    key = await keys.create_key(name, hash_key(raw), granted, now, limit)
    if key is None:
        raise Conflict(f"an active key named {name!r} exists; revoke it first or pick another name")
    return key, raw


async def revoke_key(keys: KeyStore, name: str, now: datetime) -> ApiKey:
    key = await keys.revoke_key(name, now)
    if key is None:
        raise NotFound(f"no active key is named {name!r}")
    return key
