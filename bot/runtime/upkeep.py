"""The leader's upkeep: take the scheduled snapshots and drills as they fall due (looked at every
PICKUP_SECONDS), every RELAY_SECONDS post what was done from a shell (bot.runtime.relay), and every
UPKEEP_SECONDS expire the plans nobody approved in time and tidy the alert rows. One loop on every replica;
only the leader acts. It keeps the context's clock (bot.domain.clock), so a test moves its time instead of
waiting for it."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.runtime.leader import PICKUP_SECONDS, logged
from bot.runtime.relay import RELAY_SECONDS, relay
from bot.runtime.schedule import Scheduler
from bot.watch.watcher import tidy_alerts

log = logging.getLogger(__name__)
UPKEEP_SECONDS = 30.0


async def upkeep_loop(ctx: BotContext) -> None:
    """Forever, on the leader: the schedules every PICKUP_SECONDS (a scheduled snapshot starts within a
    second of falling due, one indexed query per scheduled cluster), the relay at most every RELAY_SECONDS,
    the other jobs at most every UPKEEP_SECONDS; a new leader runs them all within PICKUP_SECONDS of its
    election. A failed job is logged and the others still run."""
    scheduler, clock = Scheduler(ctx), ctx.clock
    last = relayed = clock.monotonic() - max(UPKEEP_SECONDS, RELAY_SECONDS)
    while True:
        if ctx.is_leader():
            jobs: list[Callable[[], Awaitable[object]]] = []
            if clock.monotonic() - relayed >= RELAY_SECONDS:
                relayed = clock.monotonic()
                await logged(log, "relaying what was done from a shell failed", lambda: relay(ctx))
            if clock.monotonic() - last >= UPKEEP_SECONDS:
                last = clock.monotonic()
                jobs = [lambda: lifecycle.expire_stale(ctx), lambda: tidy_alerts(ctx)]
            for job in [*jobs, scheduler.run_due]:
                await logged(log, "upkeep failed", job)
        ctx.metrics.upkeep_passes.inc()
        await clock.sleep(PICKUP_SECONDS)
