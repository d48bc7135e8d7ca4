"""The snapshots a restore or a drill may use, and proving one before it is used: the file as the catalog
recorded it (sha256), its plaintext (decrypted only into a 0600 file removed after), its sha256 trailer,
bbolt structure and status. A copy only the off-site store holds is fetched and checked on arrival."""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bot.backup.catalog import Expected, FetchFailed, Origin, catalog
from bot.backup.object_store import object_store
from bot.config import ClusterConfig
from bot.domain.errors import StepFailed
from bot.domain.snapshot import NewSnapshot, RemoteState, SnapshotRef
from bot.etcd.bbolt import sha256_file

if TYPE_CHECKING:  # the context is gRPC's; the planning above it is not
    from bot.ops.context import BotContext


def _decrypt(src: Path, identity: str, directory: Path) -> Path:
    """The plaintext in a new 0600 file beside the snapshots (mkstemp creates it 0600)."""
    import pyrage
    from pyrage import x25519
    fd, name = tempfile.mkstemp(prefix=".restore-", suffix=".db", dir=directory)
    try:
        with open(src, "rb") as s, os.fdopen(fd, "wb") as d:
            pyrage.decrypt_io(s, d, [x25519.Identity.from_str(identity)])
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def origin(ctx: BotContext, cluster: ClusterConfig) -> Origin | None:
    """Where this cluster's remote snapshots come from (None: no store configured)."""
    store = cluster.snapshots.store
    return None if store is None else Origin(store, cluster.name, ctx.config.snapshot_dir, object_store)


async def restorable(ctx: BotContext, cluster: ClusterConfig) -> list[SnapshotRef]:
    """The snapshots a restore or drill can use, newest first: each local copy retention kept, else its verified
    copy in the store (also objects only the store knows, from their manifests, and foreign ones, which
    choose_snapshot takes only by name)."""
    rows = await ctx.store.snapshots(cluster.name, limit=100000, include_pruned=True)
    view = await catalog(cluster.snapshots.store, cluster.name, rows, limit=1000, open_store=object_store)
    return [SnapshotRef.of_entry(e, str(ctx.config.snapshot_dir)) for e in view.entries
            if e.local_path or (e.remote_state in (RemoteState.VERIFIED, RemoteState.LISTED)
                                and (e.described or e.foreign))]


async def adopt(ctx: BotContext, cluster: ClusterConfig, snapshot: SnapshotRef) -> int:
    """Catalog an object only the store knows (from its signed manifest), without a local copy, once a drill
    verified it; returns its row id. A foreign object is never catalogued: the catalog is what a restore
    trusts by default."""
    if snapshot.foreign:
        raise ValueError(f"{snapshot.file_name} is foreign ({snapshot.foreign}): it is never catalogued")
    now = time.time()
    snapshot_id = await ctx.store.record_snapshot(NewSnapshot(
        cluster=cluster.name, path=snapshot.path, member=snapshot.member, revision=snapshot.revision,
        hash=snapshot.hash, total_keys=snapshot.total_keys, live_keys=snapshot.live_keys,
        total_size=snapshot.total_size, file_size=snapshot.file_size, sha256=snapshot.sha256,
        encrypted=snapshot.encrypted, requested_by="", reason="found in the store", duration=0.0,
        created_at=snapshot.created_at, plan_id=None, pruned_at=now, remote_url=snapshot.remote_url,
        remote_state=RemoteState.VERIFIED, remote_verified_at=now))
    await ctx.store.audit("snapshot_adopted", cluster=cluster.name,
                          detail={"id": snapshot_id, "file": snapshot.file_name, "url": snapshot.remote_url})
    return snapshot_id


@asynccontextmanager
async def stored_copy(snapshot: SnapshotRef, source: Origin | None) -> AsyncIterator[Path]:
    """The snapshot as stored (the ciphertext when encrypted): the local file, or a copy fetched from the
    store into a 0600 file whose size and sha256 were checked against the catalog, removed after."""
    if not snapshot.from_store:
        yield Path(snapshot.path)
        return
    if source is None:
        raise StepFailed(f"{snapshot.file_name} is only in the snapshot store and this cluster has no store "
                         "configured", "configure [snapshots.store] again, restart the bot, then /etcd resume")
    try:
        async with source.fetched(Expected(snapshot.file_name, snapshot.file_size, snapshot.sha256)) as path:
            yield path
    except FetchFailed as e:
        raise StepFailed(str(e), "choose another snapshot") from None


@asynccontextmanager
async def plaintext(snapshot: SnapshotRef, identity: str | None, source: Origin | None = None) -> AsyncIterator[Path]:
    """The snapshot's plaintext path while the block runs: the file itself, or a 0600 temp file removed after."""
    async with stored_copy(snapshot, source) as path:
        if not snapshot.encrypted:
            yield path
            return
        if identity is None:
            raise StepFailed(f"{snapshot.file_name} is age-encrypted and no identity is configured to decrypt it",
                             "set [clusters.restore] age_identity_file or age_identity_env, restart the bot, then "
                             "/etcd resume the plan")
        try:
            plain = await asyncio.to_thread(_decrypt, path, identity, path.parent)
        except Exception as e:
            raise StepFailed(f"cannot decrypt {snapshot.file_name}: {type(e).__name__}: {e}",
                             "check the configured age identity matches the snapshot's recipients") from None
        try:
            yield plain
        finally:
            plain.unlink(missing_ok=True)


async def check_stored(snapshot: SnapshotRef) -> None:
    """A local copy is still the file catalogued (a fetched copy is checked as it arrives)."""
    if snapshot.from_store:
        return
    path = Path(snapshot.path)
    if not path.is_file():
        raise StepFailed(f"{snapshot.file_name} is no longer at {snapshot.path}", "choose another snapshot")
    sha = await asyncio.to_thread(sha256_file, path)
    if sha != snapshot.sha256:
        raise StepFailed(f"{snapshot.file_name} has changed since it was recorded: sha256 {sha[:16]}…, the catalog "
                         f"says {snapshot.sha256[:16]}…; nothing was stopped", "choose another snapshot")


async def check_plain(snapshot: SnapshotRef, plain: Path) -> str:
    """The plaintext's trailer, bbolt structure and status against the catalog."""
    from bot.domain.snapshot import SnapshotError
    from bot.etcd.bbolt import snapshot_status
    try:
        status = await asyncio.to_thread(snapshot_status, plain, True)
    except SnapshotError as e:
        raise StepFailed(f"{snapshot.file_name} is not a valid snapshot: {e}; nothing was stopped",
                         "choose another snapshot") from None
    if not status.has_trailer:
        raise StepFailed(f"{snapshot.file_name} has no sha256 trailer: etcd's own integrity check cannot run",
                         "choose a snapshot the bot took")
    found = (status.revision, status.hash_hex, status.total_keys)
    if found != (snapshot.revision, snapshot.hash, snapshot.total_keys):
        raise StepFailed(f"{snapshot.file_name} reads as revision {found[0]}, hash {found[1]}, {found[2]} keys; the "
                         f"catalog says revision {snapshot.revision}, hash {snapshot.hash}, {snapshot.total_keys} "
                         "keys; nothing was stopped", "choose another snapshot")
    where = f" (fetched from the store, {snapshot.remote_url})" if snapshot.from_store else ""
    return (f"{snapshot.file_name}{where}: sha256 and trailer verified, bbolt structure sound, revision "
            f"{status.revision}, hash {status.hash_hex}, {status.total_keys} keys")


async def verify_snapshot(snapshot: SnapshotRef, identity: str | None, source: Origin | None = None) -> str:
    """The file as catalogued: sha256 of the stored file, then the plaintext's trailer, bbolt structure and status."""
    await check_stored(snapshot)
    async with plaintext(snapshot, identity, source) as plain:
        return await check_plain(snapshot, plain)
