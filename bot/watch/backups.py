"""The backup-missed condition, for clusters with a snapshot schedule (`[clusters.snapshots] every`).

Opens when the newest verified snapshot in the catalog is older than twice the
schedule's interval (one missed run is a retry; two is a trend), counting from
when the watch started when there is none at all; or when the last off-site
upload failed. The catalog is read each round (one indexed query per scheduled
cluster). The upload columns (`remote_state`: '' | uploading | verified |
failed, `remote_error`) are read with `.get`, so catalogs without off-site
copies work the same.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bot.config import ClusterConfig
from bot.domain.cluster import ClusterHealth
from bot.domain.snapshot import RemoteState, SnapshotRecord
from bot.ops.context import BotContext
from bot.store.base import StoreError
from bot.watch.conditions import Condition, Facts, Finding, register

log = logging.getLogger(__name__)
PROBE = "backups"
PROBE_EVERY = 0.0    # every round
MISSED_AFTER = 2.0   # schedule intervals without a snapshot
# When the watch first looked at each cluster: the clock a cluster without any snapshot is judged by.
_SINCE: dict[str, float] = {}


@dataclass(frozen=True)
class Catalog:
    """What the condition needs of a cluster's catalog."""

    since: float                                  # the watch started looking at this cluster
    rows: tuple[SnapshotRecord, ...] = ()         # the newest unpruned snapshots, newest first


async def fetch(ctx: BotContext, cluster: ClusterConfig, health: ClusterHealth | None) -> Catalog | None:
    """The cluster's newest catalog rows (None: no schedule, or the store did not answer: asked again next round)."""
    if not cluster.snapshots.every_seconds:
        return None
    since = _SINCE.setdefault(cluster.name, ctx.clock.now())
    try:
        rows = await ctx.store.snapshots(cluster.name, limit=20)
    except StoreError as e:
        log.warning("watch: snapshot catalog unavailable", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
        return None
    return Catalog(since, tuple(rows))


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def last_upload(rows: Sequence[SnapshotRecord]) -> SnapshotRecord | None:
    """The newest snapshot whose off-site upload ended (verified or failed)."""
    return next((r for r in rows if r.remote_state in (RemoteState.VERIFIED, RemoteState.FAILED)), None)


def backup_missed(f: Facts) -> list[Finding] | None:
    every = f.cluster.snapshots.every_seconds
    if not every:
        return []
    catalog: Catalog | None = f.extra.get(PROBE)
    if catalog is None:
        return None  # not read yet
    name = f.cluster.name
    found = []
    newest = f.newest_snapshot
    age = f.now - (newest.created_at if newest else catalog.since)
    if age > MISSED_AFTER * every:
        newest_text = (f"{newest.path.rsplit('/', 1)[-1]}, {_age(age)} old" if newest
                       else f"none recorded (watched for {_age(age)})")
        found.append(Finding("backup_missed", "schedule",
                             f"no verified snapshot for {_age(age)}; the schedule takes one every {_age(every)}",
                             figures=(("newest verified snapshot", newest_text), ("schedule", f"every {_age(every)}")),
                             suggestions=(f"/etcd snapshot {name}", f"/etcd snapshots {name}")))
    upload = last_upload(catalog.rows)
    if upload is not None and upload.remote_state == RemoteState.FAILED:
        file = upload.path.rsplit("/", 1)[-1]
        found.append(Finding("backup_missed", "upload",
                             f"the off-site upload of {file} failed: {upload.remote_error or 'no reason given'}",
                             figures=(("snapshot", file), ("taken", _age(f.now - upload.created_at) + " ago")),
                             suggestions=(f"/etcd snapshot {name}", f"/etcd snapshots {name}")))
    return found


register(Condition("backup_missed", "backup missed", backup_missed))
