"""The catalog of both places: the bot's snapshot rows and the object store's listing, merged.

The store is listed under a deadline; an object the rows do not know (the
bot's volume was lost, or another bot wrote it) is shown from its manifest.
A store that cannot be listed costs one line in the answer, never the local
part. Restore and drills choose from the same entries (`restorable`), and
`fetched` gives them a remote copy as a verified 0600 file that is removed
afterwards.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.backup.manifest import Manifest
from bot.backup.remote import RemoteStore
from bot.etcd.snapshots import sha256_file
from bot.output.model import CatalogEntry, CatalogView, RemoteState, catalog_view

LIST_DEADLINE = 10.0       # seconds for the listing and the manifests it needs, together
MANIFEST_READS = 8         # manifests read at once
MANIFESTS_MAX = 50         # unknown objects whose manifests one listing reads (newest first)


class FetchFailed(Exception):
    """One line: the object could not be downloaded, or is not what its manifest or the catalog says."""


def entry_of_manifest(m: Manifest, size: int, url: str) -> CatalogEntry:
    """An object no catalog row knows, as its manifest describes it."""
    return CatalogEntry(cluster=m.cluster, name=m.file_name, revision=m.revision, hash=m.hash_hex,
                        total_keys=m.total_keys, total_size=m.total_size, file_size=m.size or size,
                        sha256=m.sha256, encrypted=m.encrypted, member=m.source_member, created_at=m.created_at,
                        local_path=None, remote_url=url, remote_state=RemoteState.LISTED)


async def listing(remote: RemoteStore, cluster: str, known: set[str]) -> dict[str, CatalogEntry | None]:
    """The store's objects of `cluster` by name: an entry from the manifest for the names the catalog does not
    know (newest MANIFESTS_MAX), None for the others (the catalog's row says more)."""
    objects = await remote.list(cluster)
    found: dict[str, CatalogEntry | None] = {o.name: None for o in objects}
    unknown = sorted((o for o in objects if o.name not in known), key=lambda o: o.last_modified, reverse=True)
    gate = asyncio.Semaphore(MANIFEST_READS)

    async def read(name: str, size: int) -> None:
        async with gate:
            manifest = await remote.read_manifest(cluster, name)
        if manifest is not None:  # an object without a manifest cannot be verified: not offered
            found[name] = entry_of_manifest(manifest, size, remote.display_url(cluster, name))
    await asyncio.gather(*(read(o.name, o.size) for o in unknown[:MANIFESTS_MAX]))
    return {n: e for n, e in found.items() if e is not None or n in known}


async def catalog(remote: RemoteStore | None, cluster: str, rows: list[dict[str, Any]], limit: int = 15,
                  deadline: float = LIST_DEADLINE) -> CatalogView:
    """`rows`: the cluster's catalog rows, pruned ones included (their remote copy may remain)."""
    if remote is None:
        return catalog_view(cluster, rows, None, limit=limit)
    known = {r["path"].rsplit("/", 1)[-1] for r in rows}
    url = remote.display_url(cluster, "")
    try:
        listed = await asyncio.wait_for(listing(remote, cluster, known), deadline)
    except TimeoutError:
        return catalog_view(cluster, rows, None, url, f"no answer within {deadline:g}s", limit)
    except Exception as e:  # the store's own words (obstore raises its own error classes), on one line
        return catalog_view(cluster, rows, None, url, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            [:300], limit)
    return catalog_view(cluster, rows, listed, url, None, limit)


# ---------------------------------------------------------------- fetching a copy

@dataclass(frozen=True)
class Expected:
    """What a fetched file must be: the catalog's (or the manifest's) size and sha256."""

    name: str
    file_size: int
    sha256: str


async def fetch_verified(remote: RemoteStore, cluster: str, expected: Expected, dest: Path) -> None:
    """Download to `dest` (created 0600), then check its size and sha256; a mismatch removes it."""
    try:
        await remote.fetch_to(cluster, expected.name, dest)
    except Exception as e:
        dest.unlink(missing_ok=True)
        raise FetchFailed(f"cannot download {expected.name}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:300]}") from None
    os.chmod(dest, 0o600)
    size = dest.stat().st_size
    sha = await asyncio.to_thread(sha256_file, dest)
    problem = (f"{size} bytes, expected {expected.file_size}" if expected.file_size and size != expected.file_size
               else f"sha256 {sha[:16]}…, expected {expected.sha256[:16]}…" if sha != expected.sha256 else None)
    if problem:
        dest.unlink(missing_ok=True)
        raise FetchFailed(f"{expected.name} from the store is not the snapshot recorded: {problem}; "
                          "the download was deleted")


@asynccontextmanager
async def fetched(remote: RemoteStore, cluster: str, expected: Expected, directory: Path) -> AsyncIterator[Path]:
    """A verified copy of a remote snapshot in a private (0700) directory under `directory`, removed after."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=directory))
    try:
        path = scratch / expected.name
        path.touch(0o600)
        await fetch_verified(remote, cluster, expected, path)
        yield path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Origin:
    """Where remote snapshots of a cluster are fetched from, and where their temporary copies go."""

    remote: RemoteStore
    cluster: str
    scratch: Path          # on the bot's volume: the copy (and a decrypted one) never leaves the host

    def fetched(self, expected: Expected) -> AbstractAsyncContextManager[Path]:
        return fetched(self.remote, self.cluster, expected, self.scratch)
