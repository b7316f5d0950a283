"""Token buckets: how many requests each key (or client address) may still make right now."""

from __future__ import annotations

import time
from collections.abc import Callable

# Enough for every client of a busy server; beyond it, full (idle) buckets are dropped first.
MAX_BUCKETS = 100_000


class RateLimiter:
    """One bucket per name, holding up to a minute's allowance and refilled continuously.

    `per_minute` is the default allowance; `take` may name another for one bucket (a key's own
    limit). 0 means no limit. Buckets live in this process: with several replicas (or `serve
    --workers`) each process grants its own allowance.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float, int]] = {}  # name -> (tokens, as of, limit)

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def take(self, name: str, per_minute: int | None = None) -> float:
        """Spend one token of `name`'s bucket: 0.0 when granted, else the seconds until one refills.

        `per_minute` overrides the default for this bucket; None keeps the default.
        """
        limit = self.per_minute if per_minute is None else per_minute
        if limit <= 0:
            return 0.0
        now = self.clock()
        refill = limit / 60.0
        tokens, as_of, _ = self._buckets.get(name, (float(limit), now, limit))
        tokens = min(float(limit), tokens + (now - as_of) * refill)
        if tokens < 1.0:
            self._buckets[name] = (tokens, now, limit)
            return (1.0 - tokens) / refill
        if name not in self._buckets and len(self._buckets) >= self.max_buckets:
            self._forget_idle(now)
        self._buckets[name] = (tokens - 1.0, now, limit)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled completely carries no information: dropping it changes nothing.
        full = [
            name
            for name, (tokens, as_of, limit) in self._buckets.items()
            if tokens + (now - as_of) * limit / 60.0 >= limit
        ]
        for name in full:
            del self._buckets[name]
        while len(self._buckets) >= self.max_buckets:  # under a flood of addresses: oldest first
            del self._buckets[next(iter(self._buckets))]
