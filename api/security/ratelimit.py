"""Token buckets: how many requests each key (or client address) may still make right now."""

from __future__ import annotations

import time
from collections.abc import Callable

# Enough for every client of a busy server; beyond it, full (idle) buckets are dropped first.
MAX_BUCKETS = 100_000


class RateLimiter:
    """One bucket per name, holding up to `per_minute` tokens and refilled at `per_minute` a minute.

    Buckets live in this process: with several replicas each grants its own allowance.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, as of)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def take(self, name: str) -> float:
        """Spend one token of `name`'s bucket: 0.0 when granted, else the seconds until one refills."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens, as_of = self._buckets.get(name, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - as_of) * self.refill_per_second)
        if tokens < 1.0:
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.refill_per_second
        if name not in self._buckets and len(self._buckets) >= self.max_buckets:
            self._forget_idle(now)
        self._buckets[name] = (tokens - 1.0, now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled completely carries no information: dropping it changes nothing.
        full = [
            name
            for name, (tokens, as_of) in self._buckets.items()
            if tokens + (now - as_of) * self.refill_per_second >= self.capacity
        ]
        for name in full:
            del self._buckets[name]
        while len(self._buckets) >= self.max_buckets:  # under a flood of addresses: oldest first
            del self._buckets[next(iter(self._buckets))]
