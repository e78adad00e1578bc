"""How fast this server takes reconnecting agents, measured on the machine it runs on.

After a restart every agent reconnects: a TLS handshake and a first check-in each, about
1.5 ms of a core on a fast machine and 2.5 ms on a slow one (bench/README.md). Check-in
answers carry a reconnect window, hosts / this rate: agents cut off spread their retries
over it, so they arrive about as fast as the server takes them and none times out half
done. A constant rate fits one machine only: too low and a fast server idles through a
long storm, too high and a slow one falls behind and the retries cascade.

So the rate is measured. In a second where new connections are many and make at least
half the requests (a cold start, a storm: nothing else costs much then), the process's
CPU time over their count is what one reconnect costs; the rate is the share of a core a
storm may count on over that cost. Until such a second comes, a rate measured on 2 slow
cores shared with the load generators.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_RATE = 400.0  # reconnects per second before any is measured
CPU_SHARE = 0.95  # of the one core the event loop runs on (the CPU measured includes all else)
BUSY = 100  # new connections in a sample for it to measure anything
MIN_RATE, MAX_RATE = 50.0, 5000.0  # what a sample may say: beyond, it measured something else
MIN_WINDOW = 2.0  # seconds


class ReconnectPace:
    """`counts()`: connections made and requests served so far (ConnectionGuard's);
    `cpu()`: the process's CPU seconds so far."""

    def __init__(self, counts: Callable[[], tuple[int, int]],
                 cpu: Callable[[], float] = time.process_time) -> None:
        self._counts, self._cpu = counts, cpu
        self.rate = DEFAULT_RATE
        self.measured = False
        self._last = (*counts(), cpu())

    def sample(self) -> None:
        """Called every second or so: a busy stretch since the last call updates the rate."""
        connections, requests = self._counts()
        used = self._cpu()
        new, served, cpu = (connections - self._last[0], requests - self._last[1],
                            used - self._last[2])
        self._last = (connections, requests, used)
        if new < BUSY or 2 * new < served or cpu <= 0:
            return
        measured = min(MAX_RATE, max(MIN_RATE, CPU_SHARE * new / cpu))
        before = self.rate
        self.rate = (self.rate + measured) / 2 if self.measured else measured
        self.measured = True
        if abs(self.rate - before) > 0.2 * before:
            log.info("this server takes about %.0f reconnects/s (%d new connections used %.2f "
                     "CPU s): agents spread a restart's reconnects by that", self.rate, new, cpu)

    def window(self, hosts: int) -> float:
        """Seconds over which `hosts` agents cut off at once should spread their retries."""
        return max(MIN_WINDOW, hosts / self.rate)
