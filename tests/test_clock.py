"""The clock tests move (bot/testing/clock.py): loops sleeping on it wake at their own deadlines, in
order, and each round finishes before time moves on; the system's clock is real time."""
from __future__ import annotations

import asyncio
import time

import pytest

from bot.domain.clock import SYSTEM_CLOCK
from bot.testing.clock import ManualClock


async def test_each_sleeper_wakes_at_its_own_deadline_in_order_and_its_round_ends_before_time_moves_on() -> None:
    clock = ManualClock(start=1000.0)
    started = clock.monotonic()
    seen: list[tuple[str, float]] = []

    async def loop(name: str, every: float) -> None:
        while True:
            await clock.sleep(every)
            await asyncio.sleep(0.01)   # the round's real work (I/O) ...
            seen.append((name, clock.now()))   # ... finished before the next deadline is served

    tasks = [asyncio.create_task(loop("fast", 1.0), name="fast"), asyncio.create_task(loop("slow", 2.5), name="slow")]
    try:
        await asyncio.sleep(0)
        assert sorted(clock.asleep()) == ["fast", "slow"]
        await clock.advance(4.5)
        assert seen == [("fast", 1001.0), ("fast", 1002.0), ("slow", 1002.5), ("fast", 1003.0), ("fast", 1004.0)]
        assert clock.now() == 1004.5 and clock.monotonic() - started == 4.5
        await clock.advance(0.25)   # no deadline within: time moves, nobody wakes
        assert len(seen) == 5 and clock.now() == 1004.75
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert clock.asleep() == []   # a cancelled sleeper leaves the clock


async def test_a_round_that_does_not_end_is_named() -> None:
    clock = ManualClock()
    stuck = asyncio.Event()

    async def loop() -> None:
        await clock.sleep(1.0)
        await stuck.wait()

    task = asyncio.create_task(loop(), name="watch prod")
    try:
        await asyncio.sleep(0)
        with pytest.raises(AssertionError, match=r"still running 0.1s after the clock woke them: \['watch prod'\]"):
            await clock.advance(1.0, settle=0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_sleeping_no_time_returns_at_once_and_the_system_clock_is_real_time() -> None:
    clock = ManualClock()
    await asyncio.wait_for(clock.sleep(0), 1)
    before = time.monotonic()
    await SYSTEM_CLOCK.sleep(0.05)
    assert time.monotonic() - before >= 0.05 and abs(SYSTEM_CLOCK.now() - time.time()) < 1
