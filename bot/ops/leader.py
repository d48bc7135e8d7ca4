"""Leadership: exactly one replica executes plans, schedules and watches.

Every replica serves Slack (proposals, approvals and commands are guarded
writes in the shared store), but only the holder of the store's `executor`
lease runs steps. The lease lives in the bot's own database, never in the
etcd cluster being operated (it fails exactly when it is needed). Each
replica tries to acquire or renew it every ttl/3: the holder renews, the
others take it once it has expired, so a new leader follows a dead one
within ttl + ttl/3 (13.3 s at the default 10 s).

A replica counts itself leader only until `ttl` after it *sent* its last
successful renewal (monotonic clock, so the store's clock never matters):
when a renewal fails or is refused it stops starting steps at once, and a
step it had in flight cannot persist its outcome, because every step write
carries the lease's fencing token and the store refuses a stale one
(LeaseLost). With one SQLite replica the same loop runs; the lease is simply
always won.

A plan approved (or resumed) through a follower is left `approved` in the
store; the leader polls for such plans every second (`pick_up`) rather than
LISTEN/NOTIFY: one query a second costs nothing, works the same on SQLite and
PostgreSQL (one code path), needs no listening connection to re-establish
after a database restart (a lost notification would strand a plan), and a
second is nothing next to a step. When the approval reaches the leader itself
the plan starts at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.store.base import StoreError
from bot.store.records import Fence

if TYPE_CHECKING:
    from bot.ops.context import BotContext

log = logging.getLogger(__name__)
LEASE = "executor"
PICKUP_SECONDS = 1.0  # how often the leader looks for plans approved or resumed through another replica


@dataclass
class Leadership:
    """This replica's standing: the fence of its current tenure, and until when it may trust it."""

    replica_id: str
    ttl: float
    _fence: Fence | None = None
    _until: float = 0.0                  # monotonic: the tenure is trusted until then

    def is_leader(self) -> bool:
        return self._fence is not None and time.monotonic() < self._until

    @property
    def fence(self) -> Fence | None:
        """The fencing token to write steps with, or None when this replica is not the leader."""
        return self._fence if self.is_leader() else None

    def held(self, fence: Fence, sent_at: float) -> bool:
        """Record a won acquisition or renewal; True when it starts a new tenure."""
        new = self._fence is None or self._fence.token != fence.token or time.monotonic() >= self._until
        self._fence, self._until = fence, sent_at + self.ttl
        return new

    def lost(self) -> bool:
        """Drop the tenure; True when there was one."""
        had = self._fence is not None
        self._fence, self._until = None, 0.0
        return had


async def lead(ctx: BotContext) -> None:
    """Forever: hold or seek the lease; while leader, pick up plans another
    replica approved or resumed, and on each new tenure take over the plans a
    previous leader left running."""
    from bot.ops.lifecycle import pick_up, take_over  # lifecycle runs plans; plans read leadership through ctx

    me, metrics = ctx.leadership, ctx.metrics
    renew_every = me.ttl / 3
    next_renewal = 0.0
    while True:
        now = time.monotonic()
        if now >= next_renewal:
            next_renewal = now + renew_every
            if await _renew(ctx, now):
                try:
                    await take_over(ctx)
                except Exception:
                    log.exception("taking over the plans of the previous leader failed")
        if me.is_leader():
            try:
                await pick_up(ctx)
            except Exception:
                log.exception("picking up approved plans failed")
        elif me.lost():  # the tenure ran out before a renewal succeeded
            log.warning("leadership expired before it could be renewed", extra={"ctx_replica": me.replica_id})
        metrics.leader.set(1 if me.is_leader() else 0)
        await asyncio.sleep(max(0.0, min(PICKUP_SECONDS, next_renewal - time.monotonic())))


async def _renew(ctx: BotContext, sent_at: float) -> bool:
    """One acquisition or renewal; True when it begins a new tenure."""
    me, metrics = ctx.leadership, ctx.metrics
    try:
        async with asyncio.timeout(me.ttl / 3):  # a hung database must not hold the loop past a tenure
            lease = await ctx.store.acquire_lease(LEASE, me.replica_id, me.ttl)
    except Exception as e:  # StoreError, a timeout, or a bug: never the end of the loop
        metrics.lease_renewals.labels(outcome="error").inc()
        if not isinstance(e, (StoreError, TimeoutError)):
            log.exception("lease renewal crashed")
        if me.is_leader():  # still within the tenure: keep going, try again at the next tick
            log.warning("lease renewal failed",
                        extra={"ctx_replica": me.replica_id, "ctx_error": str(e) or "timed out"})
        elif me.lost():
            log.warning("leadership lost: the lease could not be renewed",
                        extra={"ctx_replica": me.replica_id, "ctx_error": str(e) or "timed out"})
        return False
    if lease is None and await _release_if_dead(ctx):
        return await _renew(ctx, sent_at)
    if lease is None:
        metrics.lease_renewals.labels(outcome="refused").inc()
        if me.lost():
            log.warning("leadership lost: another replica holds the lease", extra={"ctx_replica": me.replica_id})
        return False
    metrics.lease_renewals.labels(outcome="held").inc()
    new = me.held(Fence(lease.name, lease.holder, lease.token), sent_at)
    if new:
        log.info("elected leader", extra={"ctx_replica": me.replica_id, "ctx_token": lease.token})
    return new


def dead_local_holder(holder: str, hostname: str, alive: Callable[[int], bool]) -> bool:
    """`holder` is a default replica id (`<hostname>-<pid>`) of this host whose process is gone."""
    host, _, pid = holder.rpartition("-")
    return host == hostname and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid))


def process_alive(pid: int) -> bool:
    """A process of this host is running (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process: alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


async def _release_if_dead(ctx: BotContext) -> bool:
    """With SQLite (one host, one file), a bot restarted after a crash finds the lease held by its
    own dead predecessor: release it at once instead of waiting out its ttl (13 s at the default),
    so interrupted plans are reported straight away. Only for SQLite: replicas sharing PostgreSQL may
    run in other PID namespaces, where a live process could look dead; they wait for the expiry."""
    if not isinstance(ctx.config.database, Path):
        return False
    try:
        held = await ctx.store.lease(LEASE)
        if held is None or not dead_local_holder(held.holder, socket.gethostname(), process_alive):
            return False
        await ctx.store.release_lease(LEASE, held.holder)
    except StoreError:
        return False  # the next tick tries again
    log.warning("the lease holder was a dead process on this host: released", extra={"ctx_holder": held.holder})
    return True


async def release(ctx: BotContext) -> None:
    """On a clean stop, once the step in flight has ended: give the lease up so
    another replica takes over at once rather than after the ttl."""
    try:
        await ctx.store.release_lease(LEASE, ctx.leadership.replica_id)
    except StoreError as e:
        log.warning("lease not released; it expires by itself", extra={"ctx_error": str(e)})
