"""Snapshots as the bot takes them: pick a member, save, record, audit, prune.

Shared by `/etcd snapshot`, the pre-change step of every plan and the
schedule, so all three record the same facts the same way. One snapshot of a
cluster runs at a time: a request while one runs in this replica joins it
(single flight) and gets its result, instead of streaming the same database
twice.

Across replicas (one shared store), a snapshot runs under the cluster's lease
`snapshot:<cluster>` in the store, renewed while it runs: a request on another
replica waits until it is released (or has expired: its holder died), then
takes its own. Everything that writes to the cluster's off-site prefix runs
under that lease: the streamed upload, its retries, the retry of earlier
failed uploads and the abort of leftovers. So the shared store is the truth
about which uploads are alive, and one replica's cleanup never aborts
another's running upload; a dead replica's lease lapses after
`[replicas] lease_seconds`, and its leftovers are then aborted.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bot.backup.manifest import Manifest, recipient_fingerprint
from bot.backup.object_store import ObjectStoreError, OffsiteStore, Upload, object_store, verify_upload
from bot.config import ClusterConfig, SnapshotPolicy
from bot.domain.cluster import ClusterHealth
from bot.domain.errors import EtcdError
from bot.domain.plan import Lease
from bot.domain.snapshot import (
    NewSnapshot,
    RemoteState,
    RunningSnapshot,
    SavedSnapshot,
    SnapshotFailed,
    SnapshotRecord,
    SnapshotStatus,
)
from bot.etcd.health import check_cluster
from bot.etcd.snapshot_stream import save_snapshot, to_prune
from bot.ops.context import BotContext
from bot.store.base import StoreError

log = logging.getLogger(__name__)


class NotNeeded(SnapshotFailed):
    """`still_wanted` said no once the cluster's lease was ours: another replica took the snapshot
    while this one waited for it (a scheduled tick, after a change of leader)."""


async def take_snapshot(ctx: BotContext, cluster: ClusterConfig, *, requested_by: str, reason: str,
                        channel: str = "", health: ClusterHealth | None = None, prefer: str | None = None,
                        plan_id: str | None = None,
                        on_join: Callable[[RunningSnapshot], Awaitable[object]] | None = None,
                        on_wait: Callable[[str], Awaitable[object]] | None = None,
                        still_wanted: Callable[[], Awaitable[bool]] | None = None) -> SavedSnapshot:
    """Snapshot a healthy member (a follower if possible), record it, apply retention.
    While another snapshot of the cluster runs, wait for that one instead
    (`on_join` is told at once) and return its result; while another replica takes
    one, wait for it to end (`on_wait` is told that replica's id), then take this one. `plan_id`: this is that
    plan's pre-change snapshot, which retention keeps. `still_wanted`, asked once the lease is ours,
    can call it off (NotNeeded): what another replica did while this one waited is in the catalog."""
    while (running := ctx.running_snapshots.get(cluster.name)) is not None:
        try:
            return await _join(ctx, running, requested_by=requested_by, channel=channel, plan_id=plan_id,
                               on_join=on_join)
        except NotNeeded:  # the scheduled snapshot it joined stood down; this request still wants one
            on_join = None
    future: asyncio.Future[tuple[SavedSnapshot, int]] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # no joiner: nobody else reads a failure
    ctx.running_snapshots[cluster.name] = RunningSnapshot(cluster.name, requested_by, channel, time.time(), future)
    try:
        async with cluster_lease(ctx, cluster.name, on_wait) as lease:
            if still_wanted is not None and not await still_wanted():
                raise NotNeeded(f"another replica took the snapshot of {cluster.name} meanwhile")
            saved, snapshot_id = await _take(ctx, cluster, lease, requested_by=requested_by, reason=reason,
                                             channel=channel, health=health, prefer=prefer, plan_id=plan_id)
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


LEASE_POLL = 0.5   # seconds between looks at a lease another replica holds


def lease_name(cluster: str) -> str:
    return f"snapshot:{cluster}"


@asynccontextmanager
async def cluster_lease(ctx: BotContext, cluster: str,
                        on_wait: Callable[[str], Awaitable[object]] | None = None) -> AsyncIterator[Lease]:
    """Hold the store's lease on snapshotting `cluster` (see the module's doc): wait while another
    replica holds it (`on_wait` is told its id, once), renew it every third of `[replicas]
    lease_seconds` while inside, release it after. A store that cannot be written fails the
    snapshot before it starts."""
    name, me, ttl = lease_name(cluster), ctx.leadership.replica_id, float(ctx.config.replicas.lease_seconds)
    waiting = False
    while True:
        try:
            lease = await ctx.store.acquire_lease(name, me, ttl)
        except StoreError as e:
            raise SnapshotFailed(f"cannot take a snapshot of {cluster}: {e}") from None
        if lease is not None:
            break
        if not waiting:
            held = await ctx.store.lease(name)
            holder = held.holder if held else "another replica"
            log.info("another replica is taking a snapshot of the cluster; waiting for it",
                     extra={"ctx_cluster": cluster, "ctx_holder": holder})
            waiting = True
            if on_wait is not None:
                await on_wait(holder)
        await asyncio.sleep(LEASE_POLL)
    renewal = asyncio.create_task(_renew(ctx, name, me, ttl), name=f"{name} lease")
    try:
        yield lease
    finally:
        renewal.cancel()
        await asyncio.gather(renewal, return_exceptions=True)
        try:
            await ctx.store.release_lease(name, me)
        except StoreError as e:  # it lapses after ttl
            log.warning("cannot release the snapshot lease", extra={"ctx_cluster": cluster, "ctx_error": str(e)})


async def _renew(ctx: BotContext, name: str, me: str, ttl: float) -> None:
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            if await ctx.store.acquire_lease(name, me, ttl) is None:
                log.error("the snapshot lease was lost to another replica", extra={"ctx_lease": name})
                return
        except StoreError as e:
            log.warning("cannot renew the snapshot lease", extra={"ctx_lease": name, "ctx_error": str(e)})


async def _take(ctx: BotContext, cluster: ClusterConfig, lease: Lease, *, requested_by: str, reason: str,
                channel: str, health: ClusterHealth | None, prefer: str | None,
                plan_id: str | None) -> tuple[SavedSnapshot, int]:
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
    remote, remote_error = await _remote_for_upload(cluster, lease.token)
    upload: Callable[[str], Upload] | None = None
    if remote is not None:
        upload = partial(remote.begin_upload, cluster.name)
    try:
        saved = await save_snapshot(client, source.status.endpoint, source.member.name, ctx.config.snapshot_dir,
                                    cluster.name, cluster.snapshots.age_recipients, upload,
                                    follows_leader=health.linearizable_through(source))
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
                                    cluster.name, cluster.snapshots.age_recipients, upload,
                                    follows_leader=health.linearizable_through(other))
        saved = replace(saved, failed_over_from=source.member.name)
    if remote_error is not None:
        saved = replace(saved, upload_error=remote_error)
    snapshot_id = await record_snapshot(ctx, saved, requested_by=requested_by, reason=reason, channel=channel,
                                        plan_id=plan_id)
    if remote is not None:
        saved = await store_offsite(ctx, cluster, remote, saved, snapshot_id)
        await retry_failed_uploads(ctx, cluster, remote, but=snapshot_id)
        remote.clean_tenure(cluster.name, lease.token)
    elif remote_error is not None:
        await _offsite_failed(ctx, cluster, saved, snapshot_id, remote_error)
    return replace(saved, pruned=tuple(await prune(ctx, cluster))), snapshot_id


async def record_snapshot(ctx: BotContext, saved: SavedSnapshot, *, requested_by: str, reason: str,
                          channel: str = "", plan_id: str | None = None) -> int:
    st = saved.status
    snapshot_id = await ctx.store.record_snapshot(NewSnapshot(
        cluster=saved.cluster, path=str(saved.path), member=saved.member, revision=st.revision, hash=st.hash_hex,
        total_keys=st.total_keys, live_keys=st.live_keys, total_size=st.total_size, file_size=saved.file_size,
        sha256=saved.sha256, encrypted=saved.encrypted, requested_by=requested_by, reason=reason,
        duration=round(saved.duration, 3), created_at=saved.created_at, plan_id=plan_id))
    ctx.metrics.snapshot_seconds.labels(cluster=saved.cluster).observe(saved.duration)
    ctx.metrics.snapshot_bytes.labels(cluster=saved.cluster).set(saved.file_size)
    await ctx.store.audit("snapshot", user=requested_by, channel=channel, cluster=saved.cluster,
                          detail={"id": snapshot_id, "file": saved.path.name, "member": saved.member,
                                  "revision": st.revision, "hash": st.hash_hex, "sha256": saved.sha256,
                                  "encrypted": saved.encrypted, "reason": reason, "plan": plan_id})
    return snapshot_id


async def prune(ctx: BotContext, cluster: ClusterConfig) -> list[str]:
    """Delete the snapshots the cluster's retention no longer keeps; record each.
    The pre-change snapshot of the cluster's open plan is never deleted.
    With a store, `keep_local` then thins the local copies verified off-site, and the
    remote copies follow the same policy (prune_remote)."""
    policy = cluster.snapshots
    rows = await ctx.store.snapshots(cluster.name, limit=100000)
    open_plan = await ctx.store.open_plan(cluster.name)
    pruned = []
    for row in to_prune(rows, policy.keep_last, policy.keep_days, time.time(), policy.keep_plan_snapshots_days,
                        open_plan.id if open_plan else None):
        if await _drop_local(ctx, cluster, row, {"keep_last": policy.keep_last, "keep_days": policy.keep_days}):
            pruned.append(Path(row.path).name)
    pruned += await _prune_offsite_copies(ctx, cluster, open_plan.id if open_plan else None)
    return pruned + await prune_remote(ctx, cluster, open_plan.id if open_plan else None)


async def _prune_offsite_copies(ctx: BotContext, cluster: ClusterConfig, open_plan: str | None) -> list[str]:
    """`keep_local`: of the snapshots verified off-site, only the newest N keep their local file
    (the catalog row stays: the copy is off-site). A snapshot not verified off-site, and the open
    plan's pre-change snapshot, always keep theirs."""
    store = cluster.snapshots.store
    if store is None or store.keep_local is None:
        return []
    rows = await ctx.store.snapshots(cluster.name, limit=100000)  # newest first, local copies only
    verified = [r for r in rows if r.remote_state == RemoteState.VERIFIED]
    pruned = []
    for row in verified[store.keep_local:]:
        if open_plan is not None and row.plan_id == open_plan:
            continue
        if await _drop_local(ctx, cluster, row, {"keep_local": store.keep_local, "offsite": row.remote_url}):
            pruned.append(Path(row.path).name)
    return pruned


async def _drop_local(ctx: BotContext, cluster: ClusterConfig, row: SnapshotRecord, why: dict[str, Any]) -> bool:
    """Delete a snapshot's local file, mark its row pruned and audit it with `why`; False
    (logged, tried again at the next prune) when the file cannot be deleted."""
    path = Path(row.path)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot prune snapshot", extra={"ctx_path": str(path), "ctx_error": e.strerror})
        return False
    await ctx.store.mark_pruned(row.id)
    await ctx.store.audit("snapshot_pruned", cluster=cluster.name, detail={"id": row.id, "file": path.name, **why})
    return True


# ---------------------------------------------------------------- retention of the remote copies

REMOTE_DELETE_DEADLINE = 30.0   # one object and its manifest


def remote_to_prune(rows: list[SnapshotRecord], policy: SnapshotPolicy, now: float,
                    open_plan: str | None) -> list[SnapshotRecord]:
    """Remote copies the policy (keep_last, keep_days, a plan's snapshot) no longer keeps; never the newest
    verified one, the last good off-site backup, even when every rule would drop it. Only rows the catalog
    knows: an object it does not know (an earlier bot's) is listed and restorable, never deleted by retention."""
    remote = sorted((r for r in rows if r.remote_state == RemoteState.VERIFIED and not r.remote_pruned_at),
                    key=lambda r: (r.created_at, r.id), reverse=True)
    keep_last = None if policy.keep_last is None else policy.keep_last - 1   # the newest is kept already
    return to_prune(remote[1:], keep_last, policy.keep_days, now, policy.keep_plan_snapshots_days, open_plan)


async def prune_remote(ctx: BotContext, cluster: ClusterConfig, open_plan: str | None) -> list[str]:
    """Delete the remote copies (object and manifest) retention no longer keeps; each one's row gets
    `remote_pruned_at` and an audit row. A store that fails is tried again at the next prune."""
    if cluster.snapshots.store is None:
        return []
    rows = await ctx.store.snapshots(cluster.name, limit=100000, include_pruned=True)
    doomed = remote_to_prune(rows, cluster.snapshots, time.time(), open_plan)
    if not doomed:
        return []
    try:
        remote = object_store(cluster.snapshots.store)
    except ObjectStoreError as e:
        log.warning("cannot prune remote copies", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
        return []
    pruned = []
    for row in doomed:
        name = Path(row.path).name
        try:
            await asyncio.wait_for(remote.delete(cluster.name, name), REMOTE_DELETE_DEADLINE)
        except (ObjectStoreError, TimeoutError) as e:
            log.warning("cannot prune a remote copy", extra={"ctx_cluster": cluster.name, "ctx_file": name,
                                                             "ctx_error": str(e) or "no answer in time"})
            continue
        await ctx.store.update_snapshot(row.id, remote_pruned_at=time.time())
        await ctx.store.audit("snapshot_pruned_remote", cluster=cluster.name,
                              detail={"id": row.id, "file": name, "url": row.remote_url,
                                      "keep_last": cluster.snapshots.keep_last,
                                      "keep_days": cluster.snapshots.keep_days})
        pruned.append(f"{name} (off-site)")
    return pruned


# ---------------------------------------------------------------- off-site copies

UPLOAD_RETRY_BACKOFF = (2.0, 10.0)   # seconds before each retry from the local file, after the streaming upload


async def _remote_for_upload(cluster: ClusterConfig, token: int) -> tuple[OffsiteStore | None, str | None]:
    """The cluster's off-site store ready for an upload, or why there is none. Unfinished uploads
    a killed bot left (or one whose abort failed) are aborted first, when there may be some
    (best effort: a failure here does not stop the upload). `token`: the tenure of the
    cluster's snapshot lease, held by the caller."""
    if cluster.snapshots.store is None:
        return None, None
    try:
        remote = object_store(cluster.snapshots.store)
    except ObjectStoreError as e:
        return None, str(e)
    if not remote.needs_sweep(cluster.name, token):
        return remote, None
    try:
        aborted = await remote.abort_leftovers(cluster.name, token)
        if aborted:
            log.warning("aborted unfinished uploads a stopped bot left",
                        extra={"ctx_cluster": cluster.name, "ctx_count": aborted})
    except ObjectStoreError as e:
        log.warning("cannot check for unfinished uploads", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
    return remote, None


def manifest_for(saved: SavedSnapshot, recipients: tuple[str, ...]) -> Manifest:
    st = saved.status
    return Manifest(cluster=saved.cluster, file_name=saved.path.name, sha256=saved.sha256, size=saved.file_size,
                    hash=st.hash_hex, revision=st.revision, total_keys=st.total_keys, total_size=st.total_size,
                    member=saved.member, created_at=saved.created_at, encrypted=saved.encrypted,
                    recipients=tuple(recipient_fingerprint(r) for r in recipients) if saved.encrypted else ())


async def store_offsite(ctx: BotContext, cluster: ClusterConfig, remote: OffsiteStore, saved: SavedSnapshot,
                        snapshot_id: int) -> SavedSnapshot:
    """Verify the upload the save streamed (size, then the sha256 read back), then put the manifest
    next to it. A failed upload is retried from the local file with backoff; the local file is
    never touched. The row and the audit log say how it ended."""
    name = saved.path.name
    url = remote.display_url(cluster.name, name)
    await ctx.store.update_snapshot(snapshot_id, remote_url=url, remote_state="uploading", remote_error=None)
    error = saved.upload_error
    for attempt in range(len(UPLOAD_RETRY_BACKOFF) + 1):
        if attempt:
            log.warning("off-site upload failed; retrying from the local file",
                        extra={"ctx_cluster": cluster.name, "ctx_file": name, "ctx_error": error,
                               "ctx_attempt": attempt})
            await asyncio.sleep(UPLOAD_RETRY_BACKOFF[attempt - 1])
            try:
                await remote.upload_file(cluster.name, name, saved.path)
                error = None
            except ObjectStoreError as e:
                error = str(e)
        if error is None:
            try:
                await verify_upload(remote, cluster.name, name, saved.file_size, saved.sha256)
                await remote.write_manifest(manifest_for(saved, cluster.snapshots.age_recipients))
            except ObjectStoreError as e:
                error = str(e)
            else:
                await ctx.store.update_snapshot(snapshot_id, remote_state="verified", remote_verified_at=time.time())
                await ctx.store.audit("snapshot_offsite", cluster=cluster.name,
                                      detail={"id": snapshot_id, "file": name, "url": url, "sha256": saved.sha256,
                                              "verified": True})
                return replace(saved, remote_url=url, remote_verified=True, upload_error=None)
    assert error is not None
    await _offsite_failed(ctx, cluster, saved, snapshot_id, error, url)
    return replace(saved, remote_url=url, upload_error=error)


async def _offsite_failed(ctx: BotContext, cluster: ClusterConfig, saved: SavedSnapshot, snapshot_id: int,
                          error: str, url: str | None = None) -> None:
    await ctx.store.update_snapshot(snapshot_id, remote_url=url, remote_state="failed", remote_error=error)
    await ctx.store.audit("snapshot_offsite_failed", cluster=cluster.name,
                          detail={"id": snapshot_id, "file": saved.path.name, "url": url, "error": error})
    log.error("off-site upload failed; the local snapshot is kept",
              extra={"ctx_cluster": cluster.name, "ctx_file": saved.path.name, "ctx_error": error})


async def retry_failed_uploads(ctx: BotContext, cluster: ClusterConfig, remote: OffsiteStore,
                               but: int | None = None) -> list[str]:
    """Upload again the kept local snapshots whose upload failed (the store was down) or was cut
    short (the bot stopped): after the next snapshot's own upload, one try each. Returns the files
    now verified off-site. The caller holds the cluster's snapshot lease, so a row still
    'uploading' is not being uploaded by any replica."""
    done = []
    for row in await ctx.store.snapshots(cluster.name, limit=100000):
        path = Path(row.path)
        # 'uploading' on a row that is not the running one: the bot stopped before it verified the upload
        if row.id == but or row.remote_state not in (RemoteState.FAILED, RemoteState.UPLOADING) or not path.is_file():
            continue
        name = path.name
        try:
            await remote.upload_file(cluster.name, name, path)
            await verify_upload(remote, cluster.name, name, row.file_size, row.sha256)
            saved = _saved_from_row(row)
            await remote.write_manifest(manifest_for(saved, cluster.snapshots.age_recipients))
        except ObjectStoreError as e:
            await ctx.store.update_snapshot(row.id, remote_error=str(e))
            log.warning("retrying an off-site upload failed",
                        extra={"ctx_cluster": cluster.name, "ctx_file": name, "ctx_error": str(e)})
            continue
        url = remote.display_url(cluster.name, name)
        await ctx.store.update_snapshot(row.id, remote_url=url, remote_state="verified", remote_error=None,
                                        remote_verified_at=time.time())
        await ctx.store.audit("snapshot_offsite", cluster=cluster.name,
                              detail={"id": row.id, "file": name, "url": url, "sha256": row.sha256,
                                      "verified": True, "retried": True})
        done.append(name)
    return done


def _saved_from_row(row: SnapshotRecord) -> SavedSnapshot:
    """A catalog row as a SavedSnapshot (for its manifest)."""
    status = SnapshotStatus(hash=int(row.hash, 16), revision=row.revision, total_keys=row.total_keys,
                            live_keys=row.live_keys or 0, total_size=row.total_size, has_trailer=True)
    return SavedSnapshot(cluster=row.cluster, member=row.member, endpoint="", path=Path(row.path),
                         file_size=row.file_size, sha256=row.sha256, status=status, duration=row.duration,
                         created_at=row.created_at, encrypted=row.encrypted)
