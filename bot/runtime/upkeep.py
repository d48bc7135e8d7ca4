"""The leader's upkeep, every UPKEEP_SECONDS: expire plans nobody approved in time, tidy the alert rows, and
take the scheduled snapshots and drills that are due. One loop on every replica; only the leader acts. It
keeps the context's clock (bot.domain.clock), so a test moves its time instead of waiting for it."""
from __future__ import annotations

import logging

from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.runtime.leader import PICKUP_SECONDS
from bot.runtime.schedule import Scheduler
from bot.watch.watcher import tidy_alerts

log = logging.getLogger(__name__)
UPKEEP_SECONDS = 30.0


async def upkeep_loop(ctx: BotContext) -> None:
    """Forever: on the leader, the jobs at most every UPKEEP_SECONDS; a new leader runs them within
    PICKUP_SECONDS of its election. A failed job is logged and the others still run."""
    scheduler, clock = Scheduler(ctx), ctx.clock
    last = clock.monotonic() - UPKEEP_SECONDS
    while True:
        if ctx.is_leader() and clock.monotonic() - last >= UPKEEP_SECONDS:
            last = clock.monotonic()
            for job in (lambda: lifecycle.expire_stale(ctx), lambda: tidy_alerts(ctx), scheduler.run_due):
                try:
                    await job()
                except Exception:
                    log.exception("upkeep failed")
        await clock.sleep(PICKUP_SECONDS)
