"""Snapshots as plain data: a file's status as etcdutl reports it, a saved snapshot, the catalog's records of
snapshots and drills, a catalog entry (local, off-site or both), the reference a restore plan records, a drill's
result, one being taken."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a running snapshot's future: the CLI's snapshot readers load no event loop
    import asyncio


class RemoteState(StrEnum):
    """Where a snapshot's off-site copy stands."""

    NONE = ""                  # never uploaded (no store, or taken before one was configured)
    UPLOADING = "uploading"
    VERIFIED = "verified"      # read back and its sha256 checked
    FAILED = "failed"          # the upload failed: the local copy is the only one
    LISTED = "listed"          # the store holds it, the catalog does not know it (from its manifest)
    MISSING = "missing"        # the catalog says verified, the store's listing no longer has it


@dataclass(frozen=True)
class CatalogEntry:
    """One snapshot, wherever its copies are: the bot's volume, the object store, or both."""

    cluster: str
    name: str                      # the file name, the same in both places
    revision: int
    hash: str                      # etcdutl's %x
    total_keys: int
    total_size: int
    file_size: int
    sha256: str                    # of the file as stored (the ciphertext when encrypted)
    encrypted: bool
    member: str
    created_at: float
    local_path: str | None         # the local copy, while retention keeps it
    remote_url: str | None         # the store's address of the object, when it is (or was meant to be) there
    remote_state: RemoteState = RemoteState.NONE
    remote_error: str = ""
    snapshot_id: int | None = None     # the catalog row; None for an object only the store knows
    requested_by: str = ""
    reason: str = ""
    live_keys: int | None = None
    # why an object only the store holds is not the bot's own (no valid manifest); "" for the bot's own
    foreign: str = ""

    @property
    def described(self) -> bool:
        """Something (the catalog, or a manifest) says what the snapshot holds; false for an object
        without a readable manifest, known only by its name and size."""
        return bool(self.sha256)

    @property
    def remote(self) -> bool:
        """The store holds a copy (verified by the bot, or listed with its manifest)."""
        return self.remote_state in (RemoteState.VERIFIED, RemoteState.LISTED)

    @property
    def place(self) -> str:
        """local, remote, both, or none (the catalog's remote copy is missing and no local one is left)."""
        if self.local_path and self.remote:
            return "both"
        return "remote" if self.remote else "local" if self.local_path else "none"

    @property
    def remote_word(self) -> str:
        """The off-site copy in a few words, for every printer."""
        if self.foreign:
            return "FOREIGN"
        return {RemoteState.NONE: "-", RemoteState.UPLOADING: "uploading", RemoteState.VERIFIED: "verified",
                RemoteState.FAILED: "upload FAILED", RemoteState.LISTED: "stored (manifest only)",
                RemoteState.MISSING: "MISSING from the store"}[self.remote_state]


@dataclass(frozen=True, kw_only=True)
class NewSnapshot:
    """A snapshot to catalog, as its row is first written (the fields are the snapshots table's columns)."""

    cluster: str
    path: str                      # absolute path on the bot's host
    member: str
    revision: int
    hash: str                      # etcdutl's %x
    total_keys: int
    live_keys: int | None          # distinct live user keys (what a booted etcd counts)
    total_size: int
    file_size: int
    sha256: str                    # of the file as stored (the ciphertext when encrypted)
    encrypted: bool
    requested_by: str
    reason: str
    duration: float
    created_at: float
    plan_id: str | None = None     # the plan this is the pre-change snapshot of (retention keeps it)
    # Set at once for an object adopted from the store: no local copy, the remote one verified.
    pruned_at: float | None = None
    remote_url: str | None = None
    remote_state: RemoteState = RemoteState.NONE
    remote_verified_at: float | None = None


@dataclass(frozen=True, kw_only=True)
class SnapshotRecord(NewSnapshot):
    """A catalogued snapshot: its row, with what retention and the off-site copy wrote since."""

    id: int
    remote_error: str | None = None
    remote_pruned_at: float | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> SnapshotRecord:
        state = row["remote_state"] or ""
        known = state in RemoteState._value2member_map_   # another value (written by hand) reads as none
        return cls(**{**{f.name: row[f.name] for f in fields(cls)}, "hash": str(row["hash"]),
                      "encrypted": bool(row["encrypted"]), "remote_state": RemoteState(state if known else "")})


@dataclass(frozen=True)
class DrillRecord:
    """A restore drill of a catalogued snapshot, as the catalog records it (the drills table's columns)."""

    cluster: str
    snapshot_id: int
    ok: bool
    detail: str                    # what the restored etcd showed, or why the drill failed
    seconds: float
    at: float
    requested_by: str

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> DrillRecord:
        return cls(**{**{f.name: row[f.name] for f in fields(cls)}, "ok": bool(row["ok"])})


def catalog_entry(row: SnapshotRecord) -> CatalogEntry:
    """A catalog record as an entry: the local copy unless retention removed it, the remote one as the
    upload left it unless retention removed that."""
    return CatalogEntry(
        cluster=row.cluster, name=row.path.rsplit("/", 1)[-1], revision=row.revision, hash=row.hash,
        total_keys=row.total_keys, total_size=row.total_size, file_size=row.file_size, sha256=row.sha256,
        encrypted=row.encrypted, member=row.member, created_at=row.created_at,
        local_path=row.path if row.pruned_at is None else None, remote_url=row.remote_url or None,
        remote_state=RemoteState.NONE if row.remote_pruned_at else row.remote_state,
        remote_error=row.remote_error or "", snapshot_id=row.id, requested_by=row.requested_by, reason=row.reason,
        live_keys=row.live_keys)


class SnapshotError(Exception):
    """A file that is not a readable etcd snapshot: one line saying what and where."""


@dataclass(frozen=True)
class SnapshotStatus:
    """What `etcdutl snapshot status` of the release that wrote the file reports, plus the live key count."""

    hash: int            # CRC-32C (Castagnoli), as etcdutl computes it
    revision: int        # main revision of the last key in bucket "key"
    total_keys: int      # etcdutl's TOTAL KEYS: every key in every bucket up to 3.5, the live keys from 3.6 on
    live_keys: int       # distinct live user keys in bucket "key" (v3.6 meaning)
    total_size: int      # page count x page size
    has_trailer: bool    # ended with etcd's sha256 trailer, which was verified
    storage_version: str = ""  # etcd 3.6's storage version in bucket "meta" ("": written by 3.5 or earlier)

    @property
    def hash_hex(self) -> str:
        """As etcdutl's %x: lowercase, no zero padding."""
        return f"{self.hash:x}"

    def as_json(self) -> dict[str, Any]:
        return {"hash": self.hash_hex, "revision": self.revision, "total_keys": self.total_keys,
                "live_keys": self.live_keys, "total_size": self.total_size,
                "storage_version": self.storage_version or None}


class SnapshotFailed(Exception):
    """One line on why no snapshot file was kept. `source_failed`: the member
    stopped answering (another member may serve), as opposed to a local problem."""

    def __init__(self, message: str, source_failed: bool = False):
        super().__init__(message)
        self.source_failed = source_failed


@dataclass(frozen=True)
class SavedSnapshot:
    cluster: str
    member: str
    endpoint: str
    path: Path
    file_size: int
    sha256: str              # of the file as stored (what `sha256sum` prints; the ciphertext when encrypted)
    status: SnapshotStatus
    duration: float
    created_at: float
    encrypted: bool = False
    failed_over_from: str | None = None   # the member that died mid-stream, when there was one
    pruned: tuple[str, ...] = ()          # files retention removed after this one was taken
    remote_url: str | None = None         # where the off-site copy went (no credentials), when one was made
    upload_error: str | None = None       # why the off-site copy failed (one line); None: uploaded or none
    remote_verified: bool = False         # read back off-site: its size and sha256 equal the local file's

    @property
    def throughput(self) -> float:
        """Bytes per second over the whole save."""
        return self.file_size / self.duration if self.duration > 0 else 0.0


@dataclass(frozen=True)
class DrillResult:
    ok: bool
    cluster: str
    snapshot: str            # file name
    detail: str              # one line: what was found, or what failed
    seconds: float
    remote_url: str = ""     # the snapshot was fetched from this object in the store
    foreign: str = ""        # why that object is not the bot's own: drilled on request, never catalogued


@dataclass(frozen=True)
class SnapshotRef:
    """A catalog row, as the plan recorded it."""

    id: int
    path: str                # absolute path on the bot's host
    revision: int
    hash: str                # etcdutl's %x
    total_keys: int
    total_size: int
    file_size: int
    sha256: str              # of the file as stored (the ciphertext when encrypted)
    encrypted: bool
    created_at: float
    member: str
    live_keys: int | None = None   # distinct live user keys (what a booted etcd counts)
    remote_url: str = ""           # set: no local copy; fetched from this object in the store (and verified)
    foreign: str = ""              # why the bot cannot call this store object its own; "" for its own

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def from_store(self) -> bool:
        return bool(self.remote_url)

    @classmethod
    def of_entry(cls, e: CatalogEntry, snapshot_dir: str) -> SnapshotRef:
        """A catalog entry: its local copy when retention kept it, else its verified copy in the store."""
        return cls(id=e.snapshot_id or 0, path=e.local_path or f"{snapshot_dir}/{e.cluster}/{e.name}",
                   revision=e.revision, hash=e.hash, total_keys=e.total_keys, total_size=e.total_size,
                   file_size=e.file_size, sha256=e.sha256, encrypted=e.encrypted, created_at=e.created_at,
                   member=e.member, live_keys=e.live_keys, remote_url="" if e.local_path else (e.remote_url or ""),
                   foreign=e.foreign)

    @classmethod
    def of(cls, row: SnapshotRecord) -> SnapshotRef:
        return cls(id=row.id, path=row.path, revision=row.revision, hash=row.hash, total_keys=row.total_keys,
                   total_size=row.total_size, file_size=row.file_size, sha256=row.sha256, encrypted=row.encrypted,
                   created_at=row.created_at, member=row.member, live_keys=row.live_keys)


@dataclass(frozen=True)
class RunningSnapshot:
    """The snapshot of a cluster being taken; its result is (the file, its row id)."""

    cluster: str
    requested_by: str
    channel: str
    started_at: float
    result: asyncio.Future[tuple[SavedSnapshot, int]]
