"""Time as the background loops see it: the wall clock, a monotonic clock and a sleep, taken from the context
(`BotContext.clock`) so that a test moves time instead of waiting for it (bot.testing.clock.ManualClock).

Leases are no part of it: they expire by the database's clock, so the leadership loop keeps real time.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (what `time.time()` says)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals)."""

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""


class SystemClock:
    """The real time of the machine."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
