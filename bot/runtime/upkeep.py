"""The leader's upkeep, every UPKEEP_SECONDS: expire plans nobody approved in time, tidy the alert rows, and
take the scheduled snapshots and drills that are due; every RELAY_SECONDS, post what was done from a shell
(bot.runtime.relay). One loop on every replica; only the leader acts."""
from __future__ import annotations

import asyncio
import logging
import time

from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.runtime.leader import PICKUP_SECONDS
from bot.runtime.relay import RELAY_SECONDS, relay
from bot.runtime.schedule import Scheduler
from bot.watch.watcher import tidy_alerts

log = logging.getLogger(__name__)
UPKEEP_SECONDS = 30.0


async def upkeep_loop(ctx: BotContext) -> None:
    """Forever: on the leader, the jobs at most every UPKEEP_SECONDS; a new leader runs them within
    PICKUP_SECONDS of its election. A failed job is logged and the others still run."""
    scheduler, last, relayed = Scheduler(ctx), -UPKEEP_SECONDS, -RELAY_SECONDS
    while True:
        if ctx.is_leader() and time.monotonic() - relayed >= RELAY_SECONDS:
            relayed = time.monotonic()
            try:
                await relay(ctx)
            except Exception:
                log.exception("relaying what was done from a shell failed")
        if ctx.is_leader() and time.monotonic() - last >= UPKEEP_SECONDS:
            last = time.monotonic()
            for job in (lambda: lifecycle.expire_stale(ctx), lambda: tidy_alerts(ctx), scheduler.run_due):
                try:
                    await job()
                except Exception:
                    log.exception("upkeep failed")
        await asyncio.sleep(PICKUP_SECONDS)
