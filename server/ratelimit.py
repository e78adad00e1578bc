"""Token buckets, one per key (a source address, a host): `rate` per second, bursts of
`burst`. Memory stays bounded under a spray of keys."""

from __future__ import annotations

import math
import time

MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate) if burst is None else burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.buckets) > MAX_KEYS:
            self.buckets.clear()
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1, now)
        return True

    def retry_after(self, key: str) -> int:
        """Whole seconds until `key` may try again, for a refusal's Retry-After."""
        if self.rate <= 0:  # `--enroll-rate 0`: the bucket never refills
            return 3600
        tokens, _ = self.buckets.get(key, (self.burst, 0.0))
        return max(1, math.ceil((1 - tokens) / self.rate))
