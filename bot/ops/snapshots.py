"""Snapshots as the bot takes them: pick a member, save, record, audit, prune.

Shared by `/etcd snapshot`, the pre-change step of every plan and the
schedule, so all three record the same facts the same way. One snapshot of a
cluster runs at a time: a request while one runs joins it (single flight) and
gets its result, instead of streaming the same database twice.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot.config import ClusterConfig, SnapshotPolicy
from bot.etcd.health import ClusterHealth, check_cluster
from bot.etcd.model import EtcdError
from bot.etcd.snapshots import SavedSnapshot, SnapshotFailed, save_snapshot, to_prune
from bot.ops.context import BotContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningSnapshot:
    """The snapshot of a cluster being taken; its result is (the file, its row id)."""

    cluster: str
    requested_by: str
    channel: str
    started_at: float
    result: asyncio.Future[tuple[SavedSnapshot, int]]


async def take_snapshot(ctx: BotContext, cluster: ClusterConfig, *, requested_by: str, reason: str,
                        channel: str = "", health: ClusterHealth | None = None, prefer: str | None = None,
                        plan_id: str | None = None,
                        on_join: Callable[[RunningSnapshot], Awaitable[object]] | None = None) -> SavedSnapshot:
    """Snapshot a healthy member (a follower if possible), record it, apply retention.
    While another snapshot of the cluster runs, wait for that one instead
    (`on_join` is told at once) and return its result. `plan_id`: this is that
    plan's pre-change snapshot, which retention keeps."""
    running = ctx.running_snapshots.get(cluster.name)
    if running is not None:
        return await _join(ctx, running, requested_by=requested_by, channel=channel, plan_id=plan_id, on_join=on_join)
    future: asyncio.Future[tuple[SavedSnapshot, int]] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # no joiner: nobody else reads a failure
    ctx.running_snapshots[cluster.name] = RunningSnapshot(cluster.name, requested_by, channel, time.time(), future)
    try:
        saved, snapshot_id = await _take(ctx, cluster, requested_by=requested_by, reason=reason, channel=channel,
                                         health=health, prefer=prefer, plan_id=plan_id)
    except BaseException as e:
        future.set_exception(e if isinstance(e, Exception) else
                             SnapshotFailed(f"the snapshot of {cluster.name} was stopped before it finished"))
        raise
    finally:
        del ctx.running_snapshots[cluster.name]
    future.set_result((saved, snapshot_id))
    return saved


async def _join(ctx: BotContext, running: RunningSnapshot, *, requested_by: str, channel: str, plan_id: str | None,
                on_join: Callable[[RunningSnapshot], Awaitable[object]] | None) -> SavedSnapshot:
    await ctx.store.audit("snapshot_joined", user=requested_by, channel=channel, cluster=running.cluster,
                          detail={"started_by": running.requested_by, "started_at": running.started_at,
                                  "plan": plan_id})
    if on_join is not None:
        await on_join(running)
    saved, snapshot_id = await asyncio.shield(running.result)  # one waiter leaving does not stop the snapshot
    if plan_id is not None:
        await ctx.store.snapshot_for_plan(snapshot_id, plan_id)
    return saved


async def _take(ctx: BotContext, cluster: ClusterConfig, *, requested_by: str, reason: str, channel: str,
                health: ClusterHealth | None, prefer: str | None, plan_id: str | None) -> tuple[SavedSnapshot, int]:
    client = ctx.client(cluster)
    if health is None:
        try:
            health = await check_cluster(client, cluster.name)
        except EtcdError as e:
            raise SnapshotFailed(f"cannot read cluster {cluster.name}: {e}") from None
    source = health.find(prefer) if prefer else None
    if source is None or not source.healthy:
        source = health.snapshot_source()
    if source is None or source.status is None:  # (a healthy member always has a status)
        raise SnapshotFailed(f"no healthy member of {cluster.name} to take a snapshot from")
    try:
        saved = await save_snapshot(client, source.status.endpoint, source.member.name, ctx.config.snapshot_dir,
                                    cluster.name, cluster.snapshots.age_recipients)
    except SnapshotFailed as e:
        # The member died mid-stream: once, from another healthy member.
        if not e.source_failed:
            raise
        try:
            health = await check_cluster(client, cluster.name)
        except EtcdError:
            raise e from None
        other = next((h for h in health.members if h.healthy and h.member.id != source.member.id
                      and h.member.client_urls), None)
        if other is None or other.status is None:
            raise
        log.warning("snapshot source failed; trying another member",
                    extra={"ctx_cluster": cluster.name, "ctx_failed": source.member.name, "ctx_error": str(e)})
        saved = await save_snapshot(client, other.status.endpoint, other.member.name, ctx.config.snapshot_dir,
                                    cluster.name, cluster.snapshots.age_recipients)
        saved = replace(saved, failed_over_from=source.member.name)
    snapshot_id = await record_snapshot(ctx, saved, requested_by=requested_by, reason=reason, channel=channel,
                                        plan_id=plan_id)
    return replace(saved, pruned=tuple(await prune(ctx, cluster))), snapshot_id


async def record_snapshot(ctx: BotContext, saved: SavedSnapshot, *, requested_by: str, reason: str,
                          channel: str = "", plan_id: str | None = None) -> int:
    st = saved.status
    snapshot_id = await ctx.store.record_snapshot({
        "cluster": saved.cluster, "path": str(saved.path), "member": saved.member, "revision": st.revision,
        "hash": st.hash_hex, "total_keys": st.total_keys, "live_keys": st.live_keys, "total_size": st.total_size,
        "file_size": saved.file_size, "sha256": saved.sha256, "encrypted": int(saved.encrypted),
        "requested_by": requested_by, "reason": reason, "duration": round(saved.duration, 3),
        "created_at": saved.created_at, "plan_id": plan_id,
    })
    ctx.metrics.snapshot_seconds.labels(cluster=saved.cluster).observe(saved.duration)
    ctx.metrics.snapshot_bytes.labels(cluster=saved.cluster).set(saved.file_size)
    await ctx.store.audit("snapshot", user=requested_by, channel=channel, cluster=saved.cluster,
                          detail={"id": snapshot_id, "file": saved.path.name, "member": saved.member,
                                  "revision": st.revision, "hash": st.hash_hex, "sha256": saved.sha256,
                                  "encrypted": saved.encrypted, "reason": reason, "plan": plan_id})
    return snapshot_id


REMOTE_DELETE_DEADLINE = 30.0   # one object and its manifest


def local_to_prune(rows: list[dict[str, Any]], policy: SnapshotPolicy, keep_local: int | None, now: float,
                   open_plan: str | None) -> list[dict[str, Any]]:
    """Local copies to delete: those the policy no longer keeps, and, with a store, the verified-remotely
    ones beyond the newest `keep_local` local copies (the store keeps them by the policy). A plan's
    pre-change snapshot stays as the policy says."""
    local = [r for r in rows if r.get("pruned_at") is None]
    drop = to_prune(local, policy.keep_last, policy.keep_days, now, policy.keep_plan_snapshots_days, open_plan)
    if keep_local is not None:
        plan_kept = {r["id"] for r in local} - {r["id"] for r in to_prune(
            local, 0, None, now, policy.keep_plan_snapshots_days, open_plan)}
        newest = sorted(local, key=lambda r: (r["created_at"], r["id"]), reverse=True)
        drop += [r for r in newest[keep_local:] if r.get("remote_state") == "verified"
                 and r["id"] not in plan_kept and r not in drop]
    return drop


def remote_to_prune(rows: list[dict[str, Any]], policy: SnapshotPolicy, now: float,
                    open_plan: str | None) -> list[dict[str, Any]]:
    """Remote copies the policy no longer keeps; never the newest verified one (the last off-site backup)."""
    remote = sorted((r for r in rows if r.get("remote_state") == "verified" and not r.get("remote_pruned_at")),
                    key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return to_prune(remote[1:], policy.keep_last and max(policy.keep_last - 1, 0), policy.keep_days, now,
                    policy.keep_plan_snapshots_days, open_plan)


async def prune(ctx: BotContext, cluster: ClusterConfig) -> list[str]:
    """Delete the copies the cluster's retention no longer keeps, in both places; record and audit each.
    The pre-change snapshot of the cluster's open plan is never deleted, nor the newest verified remote copy.
    Returns the names removed (remote ones marked so)."""
    policy = cluster.snapshots
    rows = await ctx.store.snapshots(cluster.name, limit=100000, include_pruned=True)
    open_plan = await ctx.store.open_plan(cluster.name)
    plan_id = open_plan["id"] if open_plan else None
    now = time.time()
    remote = ctx.remote(cluster)
    keep_local = remote.config.keep_local if remote is not None else None
    pruned = []
    for row in local_to_prune(rows, policy, keep_local, now, plan_id):
        path = Path(row["path"])
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot prune snapshot", extra={"ctx_path": str(path), "ctx_error": e.strerror})
            continue
        await ctx.store.mark_pruned(row["id"])
        await ctx.store.audit("snapshot_pruned", cluster=cluster.name,
                              detail={"id": row["id"], "file": path.name, "keep_last": policy.keep_last,
                                      "keep_days": policy.keep_days, "keep_local": keep_local})
        pruned.append(path.name)
    if remote is None:
        return pruned
    for row in remote_to_prune(rows, policy, now, plan_id):
        name = row["path"].rsplit("/", 1)[-1]
        try:
            await asyncio.wait_for(remote.delete(cluster.name, name), REMOTE_DELETE_DEADLINE)
        except Exception as e:  # the store's own error classes; the next prune tries again
            log.warning("cannot prune the remote copy", extra={"ctx_file": name, "ctx_error": f"{type(e).__name__}: "
                                                               f"{(str(e).splitlines() or [''])[0][:300]}"})
            continue
        await ctx.store.update_snapshot(row["id"], remote_pruned_at=time.time())
        await ctx.store.audit("snapshot_pruned_remote", cluster=cluster.name,
                              detail={"id": row["id"], "file": name, "url": row.get("remote_url"),
                                      "keep_last": policy.keep_last, "keep_days": policy.keep_days})
        pruned.append(f"{name} (store)")
    return pruned
