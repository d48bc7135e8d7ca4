"""A clock the test moves (as Home Assistant's tests do with `async_fire_time_changed`): the bot's background
loops sleep on it, and `advance()` wakes each one at its own deadline, in order, letting it run its round
(real I/O: etcd, the store, the Slack stand-in) before time moves on. A watch test then sees twenty rounds
of a one-second interval in the time the rounds themselves take, and can say exactly which round posted.

Only what takes its time from the context follows it (bot.domain.clock); leases keep the database's clock.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

SETTLE_SECONDS = 30.0   # real time a woken loop may take to finish its round and sleep again


@dataclass(order=True)
class _Sleeper:
    deadline: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)
    task: asyncio.Task[object] | None = field(compare=False)


class ManualClock:
    """A Clock (bot.domain.clock) that stands still until `advance()`."""

    def __init__(self, start: float | None = None) -> None:
        self._wall0 = time.time() if start is None else start
        self._mono0 = time.monotonic()
        self._elapsed = 0.0
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._wall0 + self._elapsed

    def monotonic(self) -> float:
        return self._mono0 + self._elapsed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        sleeper = _Sleeper(self._elapsed + seconds, next(self._seq), asyncio.get_running_loop().create_future(),
                           asyncio.current_task())
        self._sleepers.append(sleeper)
        try:
            await sleeper.future
        finally:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    def asleep(self) -> list[str]:
        """The names of the tasks that sleep on this clock now (the watch's: `watch <cluster>`)."""
        return [s.task.get_name() for s in self._sleepers if s.task is not None]

    async def advance(self, seconds: float, settle: float = SETTLE_SECONDS) -> None:
        """Move time `seconds` forward. Every sleeper whose deadline comes within wakes with the clock at its
        deadline, and runs until it sleeps on the clock again or ends (within `settle` real seconds), before
        the clock moves on to the next deadline; a round that needs longer is a failure that says which."""
        target = self._elapsed + seconds
        while due := sorted(s for s in self._sleepers if s.deadline <= target):
            self._elapsed = max(self._elapsed, due[0].deadline)
            woken = [s for s in due if s.deadline <= self._elapsed]
            for sleeper in woken:
                self._sleepers.remove(sleeper)
                if not sleeper.future.done():
                    sleeper.future.set_result(None)
            await self._settled([s.task for s in woken if s.task is not None], settle)
        self._elapsed = target

    async def _settled(self, tasks: list[asyncio.Task[object]], settle: float) -> None:
        """Wait until each of `tasks` sleeps on this clock again, or is done."""
        deadline = time.monotonic() + settle
        while True:
            await asyncio.sleep(0)
            asleep = {s.task for s in self._sleepers}
            busy = [t for t in tasks if not t.done() and t not in asleep]
            if not busy:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"still running {settle:g}s after the clock woke them: "
                                     f"{[t.get_name() for t in busy]}")
            await asyncio.sleep(0.005)
