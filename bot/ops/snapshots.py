"""Snapshots as the bot takes them: pick a member, save, record, audit, prune.

Shared by `/etcd snapshot`, the pre-change step of every plan and the
schedule, so all three record the same facts the same way.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from bot.config import ClusterConfig
from bot.etcd.health import ClusterHealth, check_cluster
from bot.etcd.model import EtcdError
from bot.etcd.snapshots import SavedSnapshot, SnapshotFailed, save_snapshot, to_prune
from bot.ops.context import BotContext

log = logging.getLogger(__name__)


async def take_snapshot(ctx: BotContext, cluster: ClusterConfig, *, requested_by: str, reason: str,
                        channel: str = "", health: ClusterHealth | None = None,
                        prefer: str | None = None) -> SavedSnapshot:
    """Snapshot a healthy member (a follower if possible), record it, apply retention."""
    client = ctx.client(cluster)
    if health is None:
        try:
            health = await check_cluster(client, cluster.name)
        except EtcdError as e:
            raise SnapshotFailed(f"cannot read cluster {cluster.name}: {e}") from None
    source = health.find(prefer) if prefer else None
    if source is None or not source.healthy:
        source = health.snapshot_source()
    if source is None:
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
        if other is None:
            raise
        log.warning("snapshot source failed; trying another member",
                    extra={"ctx_cluster": cluster.name, "ctx_failed": source.member.name, "ctx_error": str(e)})
        saved = await save_snapshot(client, other.status.endpoint, other.member.name, ctx.config.snapshot_dir,
                                    cluster.name, cluster.snapshots.age_recipients)
        saved = replace(saved, failed_over_from=source.member.name)
    await record_snapshot(ctx, saved, requested_by=requested_by, reason=reason, channel=channel)
    return replace(saved, pruned=tuple(await prune(ctx, cluster)))


async def record_snapshot(ctx: BotContext, saved: SavedSnapshot, *, requested_by: str, reason: str,
                          channel: str = "") -> int:
    st = saved.status
    snapshot_id = await ctx.store.record_snapshot({
        "cluster": saved.cluster, "path": str(saved.path), "member": saved.member, "revision": st.revision,
        "hash": st.hash_hex, "total_keys": st.total_keys, "live_keys": st.live_keys, "total_size": st.total_size,
        "file_size": saved.file_size, "sha256": saved.sha256, "encrypted": int(saved.encrypted),
        "requested_by": requested_by, "reason": reason, "duration": round(saved.duration, 3),
        "created_at": saved.created_at,
    })
    ctx.metrics.snapshot_seconds.labels(cluster=saved.cluster).observe(saved.duration)
    ctx.metrics.snapshot_bytes.labels(cluster=saved.cluster).set(saved.file_size)
    await ctx.store.audit("snapshot", user=requested_by, channel=channel, cluster=saved.cluster,
                          detail={"id": snapshot_id, "file": saved.path.name, "member": saved.member,
                                  "revision": st.revision, "hash": st.hash_hex, "sha256": saved.sha256,
                                  "encrypted": saved.encrypted, "reason": reason})
    return snapshot_id


async def prune(ctx: BotContext, cluster: ClusterConfig) -> list[str]:
    """Delete the snapshots the cluster's retention no longer keeps; record each."""
    policy = cluster.snapshots
    rows = await ctx.store.snapshots(cluster.name, limit=100000)
    pruned = []
    for row in to_prune(rows, policy.keep_last, policy.keep_days, time.time()):
        path = Path(row["path"])
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot prune snapshot", extra={"ctx_path": str(path), "ctx_error": e.strerror})
            continue
        await ctx.store.mark_pruned(row["id"])
        await ctx.store.audit("snapshot_pruned", cluster=cluster.name,
                              detail={"id": row["id"], "file": path.name, "keep_last": policy.keep_last,
                                      "keep_days": policy.keep_days})
        pruned.append(path.name)
    return pruned
