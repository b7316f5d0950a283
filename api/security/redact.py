"""Secret redaction for anything that leaves the process as text: logs, error details."""

from __future__ import annotations

import functools
import re
from typing import Any

MASK = "[REDACTED]"

# Keys whose values are secrets whatever they look like (compared lower-cased, - and _ ignored).
_SECRET_KEY = re.compile(
    r"pass(word|wd)?|token|secret|apikey|authorization|credential|cookie|privatekey|accesskey"
)

# The placeholders our own hints and docs put where a key goes ("send 'Authorization: Bearer KEY'");
# masking them would turn the advice into nonsense, and none of them can be a real key.
PLACEHOLDERS = ("KEY", "YOUR_KEY", "API_KEY", "TOKEN")
_PLACEHOLDER = "|".join(PLACEHOLDERS)

_PATTERNS = (
    # `Bearer <token>` anywhere in a string (headers echoed into messages, connection params)
    (
        re.compile(
            rf"(?i)\b(bearer)\s+(?!(?-i:{_PLACEHOLDER})(?![A-Za-z0-9._~+/=-]))[A-Za-z0-9._~+/=-]+"
        ),
        rf"\1 {MASK}",
    ),
    # taskorch API keys
    (re.compile(r"\btko_[A-Za-z0-9_-]+"), MASK),
    # passwords inside URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]+):[^@/\s]+@"), rf"\1:{MASK}@"),
    # key=value / key: value pairs in free text
    (
        re.compile(
            r"(?i)\b((?:password|passwd|token|secret|api[_-]?key|authorization|credentials?)"
            r"[\"']?\s*[=:]\s*[\"']?)(?!bearer\b)[^\s\"',;&}]+"
        ),
        rf"\1{MASK}",
    ),
)


# Text none of the patterns can match lacks all of these: one search clears most strings (every
# access log line has half a dozen) instead of one substitution per pattern.
_MAY_HOLD_SECRET = re.compile(r"(?i)bearer|tko_|://|pass|token|secret|api|authorization|credential")


@functools.lru_cache(maxsize=4096)  # asked for every field of every log line; names are few
def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.lower().replace("-", "").replace("_", "")))


def redact(value: Any) -> Any:
    """A copy of `value` with secrets masked: strings by pattern, dict values by key name."""
    if isinstance(value, str):
        if _MAY_HOLD_SECRET.search(value) is None:
            return value
        for pattern, replacement in _PATTERNS:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and is_secret_key(k) and v is not None else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    return value
