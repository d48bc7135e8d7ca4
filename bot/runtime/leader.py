"""The leadership loop: hold or seek the executor lease (bot.ops.leadership says what a tenure
is), and while leading pick up the plans another replica approved or resumed, and take over the
plans a previous leader left running. A background task of the runtime.

It keeps real time, not the context's clock (bot.domain.clock): the lease it renews expires by the
database's clock, so a test that moves the watch's time leaves leadership alone (lease tests use
short leases: `[replicas] lease_seconds`)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.domain.plan import Fence
from bot.ops.context import BotContext
from bot.ops.leadership import LEASE
from bot.ops.lifecycle import pick_up, take_over
from bot.store.base import StoreError

log = logging.getLogger(__name__)
PICKUP_SECONDS = 1.0  # how often the leader looks for plans approved or resumed through another replica


async def lead(ctx: BotContext) -> None:
    """Forever: hold or seek the lease; while leader, pick up plans another
    replica approved or resumed, and on each new tenure take over the plans a
    previous leader left running."""
    me, metrics = ctx.leadership, ctx.metrics
    renew_every = me.ttl / 3
    next_renewal = 0.0
    while True:
        now = time.monotonic()
        if now >= next_renewal:
            next_renewal = now + renew_every
            if await _renew(ctx, now):
                await logged(log, "taking over the plans of the previous leader failed", lambda: take_over(ctx))
        if me.is_leader():
            await logged(log, "picking up approved plans failed", lambda: pick_up(ctx))
        elif me.lost():  # the tenure ran out before a renewal succeeded
            log.warning("leadership expired before it could be renewed", extra={"ctx_replica": me.replica_id})
        metrics.leader.set(1 if me.is_leader() else 0)
        await asyncio.sleep(max(0.0, min(PICKUP_SECONDS, next_renewal - time.monotonic())))


async def logged(log: logging.Logger, failure: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run one job of a background loop, whose failure never ends the loop (it tries again next time): an
    unavailable store is logged in one line (it is not a bug, and nothing is decided without it), anything
    else with its traceback."""
    try:
        await job()
    except StoreError as e:
        log.warning("%s: state store unavailable", failure, extra={"ctx_error": str(e)})
    except Exception:
        log.exception(failure)


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
