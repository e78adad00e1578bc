"""One backoff for every retry loop: capped exponential growth with full jitter.

Jitter spreads a crowd of agents (or reconnects) over the whole window instead of
letting them hit the server in lock-step after an outage.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable


class Backoff:
    def __init__(
        self,
        base: float = 1.0,
        cap: float = 60.0,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rand = rand
        self._sleep = sleep

    def next_delay(self, at_least: float = 0.0) -> float:
        """Delay before the next try after one more failure: uniform in [ceil/2, ceil], or
        `at_least` when that is longer (a server's Retry-After)."""
        ceiling = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return max(at_least, ceiling / 2 + self._rand() * ceiling / 2)

    async def wait(self, at_least: float = 0.0) -> float:
        delay = self.next_delay(at_least)
        await self._sleep(delay)
        return delay

    def reset(self) -> None:
        self.failures = 0
