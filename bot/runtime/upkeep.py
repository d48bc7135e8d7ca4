"""The leader's upkeep: take the scheduled snapshots and drills as they fall due (looked at every
PICKUP_SECONDS), and every UPKEEP_SECONDS expire the plans nobody approved in time and tidy the alert rows.
One loop on every replica; only the leader acts. It keeps the context's clock (bot.domain.clock), so a
test moves its time instead of waiting for it."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.runtime.leader import PICKUP_SECONDS, logged
from bot.runtime.schedule import Scheduler
from bot.watch.watcher import tidy_alerts

log = logging.getLogger(__name__)
UPKEEP_SECONDS = 30.0


async def upkeep_loop(ctx: BotContext) -> None:
    """Forever, on the leader: the schedules every PICKUP_SECONDS (a scheduled snapshot starts within a
    second of falling due, one indexed query per scheduled cluster), the other jobs at most every
    UPKEEP_SECONDS; a new leader runs them all within PICKUP_SECONDS of its election. A failed job is
    logged and the others still run."""
    scheduler, clock = Scheduler(ctx), ctx.clock
    last = clock.monotonic() - UPKEEP_SECONDS
    while True:
        if ctx.is_leader():
            jobs: list[Callable[[], Awaitable[object]]] = [scheduler.run_due]
            if clock.monotonic() - last >= UPKEEP_SECONDS:
                last = clock.monotonic()
                jobs = [lambda: lifecycle.expire_stale(ctx), lambda: tidy_alerts(ctx), *jobs]
            for job in jobs:
                await logged(log, "upkeep failed", job)
        ctx.metrics.upkeep_passes.inc()
        await clock.sleep(PICKUP_SECONDS)
