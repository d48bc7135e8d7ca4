"""The catalog of both places: the bot's snapshot rows and the object store's listing, merged.

The store is listed under a deadline; an object the rows do not know (the
bot's volume was lost, or another bot wrote it) is shown from its manifest,
and is *foreign* unless that manifest is signed with the manifest key
(bot.backup.manifest): anyone who can write to the bucket can put an object
and a manifest there.
A store that cannot be listed costs one line in the answer, never the local
part. Restore and drills choose from the same entries
(bot.ops.restore.run.restorable), and `fetched` gives them a remote copy as a
verified 0600 file in a private directory, removed afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.backup.manifest import Manifest
from bot.backup.object_store import ObjectStoreError, OffsiteStore, RemoteObject
from bot.config.offsite import StoreConfig
from bot.domain.snapshot import CatalogEntry, RemoteState, SnapshotRecord
from bot.output.model import CatalogView, catalog_view

log = logging.getLogger(__name__)

LIST_DEADLINE = 10.0       # seconds for the listing and the manifests it needs, together
MANIFEST_READS = 8         # manifests read at once
MANIFESTS_MAX = 50         # unknown objects whose manifests one listing reads (newest first)

Opener = Callable[[StoreConfig], OffsiteStore]


class FetchFailed(Exception):
    """One line: the object could not be downloaded, or is not what its manifest or the catalog says."""


def entry_of_manifest(m: Manifest, obj: RemoteObject, url: str, foreign: str = "") -> CatalogEntry:
    """An object no catalog row knows, as its manifest describes it. A foreign object's manifest is
    a claim: it is shown, but the object sorts by when the store received it, not by the date it claims."""
    return CatalogEntry(cluster=m.cluster, name=obj.name, revision=m.revision, hash=m.hash,
                        total_keys=m.total_keys, total_size=m.total_size, file_size=m.size, sha256=m.sha256,
                        encrypted=m.encrypted, member=m.member,
                        created_at=obj.last_modified if foreign else m.created_at, local_path=None,
                        remote_url=url, remote_state=RemoteState.LISTED, foreign=foreign)


def undescribed(cluster: str, obj: RemoteObject, url: str, foreign: str) -> CatalogEntry:
    """An object without a readable manifest: foreign, known by its name, size and upload time only."""
    return CatalogEntry(cluster=cluster, name=obj.name, revision=0, hash="", total_keys=0, total_size=0,
                        file_size=obj.size, sha256="", encrypted=False, member="", created_at=obj.last_modified,
                        local_path=None, remote_url=url, remote_state=RemoteState.LISTED, foreign=foreign)


async def listing(remote: OffsiteStore, cluster: str, known: set[str]) -> dict[str, CatalogEntry | None]:
    """The store's objects of `cluster` by name: an entry from the manifest for the names the catalog does not
    know (the newest MANIFESTS_MAX), None for the others (the catalog's row says more). An object whose
    manifest is missing, unreadable, not signed with the manifest key or dated in the future is *foreign*:
    listed as such, never taken for one of the bot's own."""
    objects = await remote.list(cluster)
    found: dict[str, CatalogEntry | None] = {o.name: None for o in objects if o.name in known}
    unknown = [o for o in reversed(objects) if o.name not in known][:MANIFESTS_MAX]
    gate = asyncio.Semaphore(MANIFEST_READS)

    async def read(obj: RemoteObject) -> None:
        url = remote.display_url(cluster, obj.name)
        async with gate:
            try:
                manifest = await remote.read_manifest(cluster, obj.name)
            except ObjectStoreError as e:
                log.warning("an off-site snapshot's manifest is unreadable", extra={"ctx_cluster": cluster,
                                                                                   "ctx_error": str(e)})
                found[obj.name] = undescribed(cluster, obj, url, "its manifest is unreadable or invalid")
                return
        if manifest is None:
            found[obj.name] = undescribed(cluster, obj, url, "it has no manifest")
            return
        foreign = remote.foreign(manifest, cluster, obj.name)
        describes_it = (manifest.cluster, manifest.file_name) == (cluster, obj.name)
        found[obj.name] = (entry_of_manifest(manifest, obj, url, foreign) if describes_it
                           else undescribed(cluster, obj, url, foreign))
    await asyncio.gather(*(read(o) for o in unknown))
    return found


async def catalog(config: StoreConfig | None, cluster: str, rows: list[SnapshotRecord], limit: int = 15,
                  deadline: float = LIST_DEADLINE, open_store: Opener = OffsiteStore.from_config) -> CatalogView:
    """Both places for one cluster. `rows`: its catalog rows, pruned ones included (their remote copy may
    remain); `config`: its [snapshots.store] (None: local only)."""
    if config is None:
        return catalog_view(cluster, rows, None, limit=limit)
    url = f"{config.url.rstrip('/')}/{cluster}/"
    known = {r.path.rsplit("/", 1)[-1] for r in rows}
    try:
        listed = await asyncio.wait_for(listing(open_store(config), cluster, known), deadline)
    except TimeoutError:
        return catalog_view(cluster, rows, None, url, f"{url} did not answer within {deadline:g}s", limit)
    except ObjectStoreError as e:
        return catalog_view(cluster, rows, None, url, str(e), limit)
    return catalog_view(cluster, rows, listed, url, None, limit)


# ---------------------------------------------------------------- fetching a copy

@dataclass(frozen=True)
class Expected:
    """What a fetched file must be: the catalog's (or the manifest's) size and sha256."""

    name: str
    file_size: int
    sha256: str


async def fetch_verified(remote: OffsiteStore, cluster: str, expected: Expected, dest: Path) -> None:
    """Download to `dest` (0600), hashing as it arrives, then compare size and sha256; a mismatch removes it."""
    try:
        sha, size = await remote.fetch_to(cluster, expected.name, dest)
    except ObjectStoreError as e:
        raise FetchFailed(f"cannot download {expected.name}: {e}") from None
    problem = (f"{size:,} bytes, expected {expected.file_size:,}" if size != expected.file_size
               else f"sha256 {sha[:16]}…, expected {expected.sha256[:16]}…" if sha != expected.sha256 else None)
    if problem:
        dest.unlink(missing_ok=True)
        raise FetchFailed(f"{expected.name} from the store is not the snapshot recorded ({problem}); "
                          "the download was deleted")


@asynccontextmanager
async def fetched(remote: OffsiteStore, cluster: str, expected: Expected, directory: Path) -> AsyncIterator[Path]:
    """A verified copy of a remote snapshot in a private (0700) directory under `directory`, removed after
    (with anything else made there, such as its decrypted plaintext)."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=directory))
    try:
        path = scratch / expected.name
        await fetch_verified(remote, cluster, expected, path)
        yield path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Origin:
    """Where a cluster's remote snapshots are fetched from, and where their temporary copies go."""

    config: StoreConfig
    cluster: str
    scratch: Path              # on the bot's volume: the copy (and a decrypted one) never leaves the host
    open_store: Opener = OffsiteStore.from_config

    @asynccontextmanager
    async def fetched(self, expected: Expected) -> AsyncIterator[Path]:
        try:
            remote = self.open_store(self.config)
        except ObjectStoreError as e:
            raise FetchFailed(str(e)) from None
        async with fetched(remote, self.cluster, expected, self.scratch) as path:
            yield path
