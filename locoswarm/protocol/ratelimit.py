"""A token bucket that caps what a node sends, in bytes per second, over all its calls; and a
limiter for log lines that a peer can trigger."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable


class TokenBucket:
    """``await bucket.take(n)`` returns when ``n`` more bytes fit under the rate.

    Callers reserve before they send, so concurrent senders queue behind one another's debt and
    the total rate holds. ``burst_bytes`` is how much may go out at once after an idle spell.
    """

    def __init__(self, bytes_per_s: float, burst_bytes: float | None = None) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s}")
        self.rate = float(bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else bytes_per_s / 10)
        self._tokens = self.burst
        self._last = time.monotonic()

    def reserve(self, num_bytes: int, *, now: float | None = None) -> float:
        """Take ``num_bytes`` now; return how many seconds the caller must wait before sending."""
        now = time.monotonic() if now is None else now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= num_bytes
        return max(0.0, -self._tokens / self.rate)

    async def take(self, num_bytes: int) -> None:
        wait_s = self.reserve(num_bytes)
        if wait_s > 0:
            try:
                await asyncio.sleep(wait_s)
            except asyncio.CancelledError:
                self._tokens += num_bytes  # nothing was sent: give the reservation back
                raise


class LogLimiter:
    """At most one log line per key per ``interval_s``; the next one counts what was skipped.
    A hostile peer's garbage must not flood the log."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, key: str, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._last.get(key, -math.inf) < self.interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += f" ({skipped} more like it in the last {self.interval_s:.0f}s)"
        self.logger.info(msg, *args)
