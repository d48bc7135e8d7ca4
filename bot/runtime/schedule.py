"""Scheduled snapshots: `every = "6h"` per cluster.

The last scheduled snapshot's time lives in the database, so a restart
neither skips nor doubles one. A failure is posted loudly to the cluster's
first channel and retried after a shorter pause, never in a tight loop (so
is a drill that found no snapshot to drill).
"""
from __future__ import annotations

import logging

from bot.config import ClusterConfig
from bot.domain.errors import Refusal
from bot.domain.snapshot import SnapshotFailed
from bot.ops.context import BotContext
from bot.ops.notify import NotifyFailed
from bot.ops.snapshots import NotNeeded, take_snapshot
from bot.output import blocks

log = logging.getLogger(__name__)
REASON = "scheduled"
RETRY_AFTER_FAILURE = 600.0
SCHEDULER = "the schedule"  # recorded as the requester of scheduled snapshots


def is_due(every: float, last_success: float | None, last_failure: float | None, now: float) -> bool:
    """Pure: due when `every` has passed since the last success, and a
    failure is not more recent than the retry pause."""
    if last_failure is not None and now - last_failure < min(every, RETRY_AFTER_FAILURE):
        return False
    return last_success is None or now - last_success >= every


class Scheduler:
    def __init__(self, ctx: BotContext):
        self.ctx = ctx
        self.failures: dict[str, float] = {}          # cluster -> when its scheduled snapshot last failed
        self.drill_failures: dict[str, float] = {}    # cluster -> when its drill last found nothing to drill

    async def run_due(self, now: float | None = None) -> list[str]:
        """Take (and drill) what is due, one cluster after another. A leader deposed during the pass
        (one snapshot can take minutes) starts nothing more: the new leader's pass takes over from
        the shared catalog, and two replicas would otherwise snapshot the same cluster for one tick."""
        now = now or self.ctx.clock.now()
        ran = []
        for cluster in self.ctx.config.clusters:
            if not self.ctx.is_leader():
                break
            if await self._snapshot_due(cluster, now) and await self._take(cluster, now):
                ran.append(cluster.name)
            drill_every = cluster.snapshots.drill_every_seconds
            if not drill_every or not self.ctx.is_leader():  # (deposed while taking the snapshot)
                continue
            if is_due(drill_every, await self.ctx.store.last_drill_at(cluster.name, SCHEDULER),
                      self.drill_failures.get(cluster.name), now):
                await self._drill(cluster, now)
                ran.append(f"{cluster.name} drill")
        return ran

    async def _snapshot_due(self, cluster: ClusterConfig, now: float) -> bool:
        every = cluster.snapshots.every_seconds
        if not every:
            return False
        return is_due(every, await self.ctx.store.last_snapshot_at(cluster.name, REASON),
                      self.failures.get(cluster.name), now)

    async def _drill(self, cluster: ClusterConfig, now: float) -> None:
        """Drill the newest snapshot; the result goes to the cluster's first channel (a failure loudly)."""
        from bot.ops.drill import drill
        try:
            result = await drill(self.ctx, cluster, None, SCHEDULER)
        except Refusal as e:  # no snapshot yet: nothing to drill, said once per retry pause in the log
            self.drill_failures[cluster.name] = now
            log.warning("no snapshot to drill", extra={"ctx_cluster": cluster.name, "ctx_error": e.reason})
            return
        self.drill_failures.pop(cluster.name, None)
        if cluster.channels:
            try:
                await self.ctx.notifier.channel_message(cluster.channels[0], blocks.drill_reply(result, SCHEDULER))
            except NotifyFailed as e:
                log.error("cannot post the drill result", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})

    async def _take(self, cluster: ClusterConfig, now: float) -> bool:
        """Take the tick's snapshot and post the result; False when another replica took it meanwhile."""
        channel = cluster.channels[0] if cluster.channels else None
        started = self.ctx.clock.monotonic()
        try:
            saved = await take_snapshot(self.ctx, cluster, requested_by=SCHEDULER, reason=REASON, channel=channel or "",
                                        still_wanted=lambda: self._snapshot_due(cluster, now))
            self.failures.pop(cluster.name, None)
            reply = blocks.snapshot_reply(saved, SCHEDULER, title="Scheduled snapshot")
        except NotNeeded as e:  # a deposed leader's snapshot ran on while this replica took over
            log.info("the scheduled snapshot was taken by another replica", extra={"ctx_cluster": cluster.name,
                                                                                  "ctx_detail": str(e)})
            return False
        except SnapshotFailed as e:
            # When it failed, on the clock run_due judges by (its `now`), so the retry pause holds.
            self.failures[cluster.name] = now + (self.ctx.clock.monotonic() - started)
            await self.ctx.store.audit("snapshot_failed", cluster=cluster.name, channel=channel or "",
                                       detail={"reason": str(e), "scheduled": True})
            log.error("scheduled snapshot failed", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
            reply = blocks.snapshot_failed_reply(cluster.name, str(e), scheduled=True)
        if channel:
            try:
                await self.ctx.notifier.channel_message(channel, reply)
            except NotifyFailed as e:
                log.error("cannot post the scheduled snapshot result",
                          extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
        return True
