"""Snapshots: stream Maintenance.Snapshot to disk, verify, and only then give
the file its final name.

The stream is written to `<name>.db.part` in constant memory, its 32-byte
sha256 trailer verified as etcdctl does (size % 512 == 32, sha256 of all
before it), fsynced, its status computed, then renamed. On any failure the
`.part` file is removed: a file with a final name is always complete.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.etcd.client import EtcdClient
from bot.etcd.model import EtcdError

if TYPE_CHECKING:
    from bot.etcd.bbolt import SnapshotStatus

TRAILER = 32


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

    @property
    def throughput(self) -> float:
        """Bytes per second over the whole save."""
        return self.file_size / self.duration if self.duration > 0 else 0.0


class TrailerCheck:
    """Hashes everything but the last 32 bytes seen, without buffering the stream.

    One sha256 pass serves both the trailer check and the file's own sha256
    (`file_sha256`), and a chunk is never copied: at 32 KiB per message both
    cost as much as receiving the stream."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._tail = b""
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(chunk) >= TRAILER:  # the bytes held back are not the trailer: hash them, hold back this tail
            self._hash.update(self._tail)
            view = memoryview(chunk)
            self._hash.update(view[:-TRAILER])
            self._tail = bytes(view[-TRAILER:])
            return
        data = self._tail + chunk
        if len(data) > TRAILER:
            self._hash.update(data[:-TRAILER])
            self._tail = data[-TRAILER:]
        else:
            self._tail = data

    def file_sha256(self) -> str:
        """sha256 of every byte seen, trailer included (what `sha256sum` prints for the file)."""
        whole = self._hash.copy()
        whole.update(self._tail)
        return whole.hexdigest()

    def verify(self) -> None:
        if self.size % 512 != TRAILER:
            raise SnapshotFailed(f"the stream ended after {self.size:,} bytes without etcd's sha256 trailer "
                                 f"(size % 512 is {self.size % 512}, not 32): the transfer was cut")
        if self._hash.digest() != self._tail:
            raise SnapshotFailed("the sha256 trailer does not match the data: the snapshot is corrupt")


def snapshot_filename(cluster: str, when: dt.datetime, revision: int) -> str:
    return f"{cluster}-{when.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-rev{revision}.db"


WRITE_BATCH = 2 << 20  # bytes handed to the writer thread at once


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _publish(src: Path, directory: Path, stem: str, suffix: str) -> Path:
    """Give the finished file its final name, never replacing another: link(2)
    fails on an existing name (two snapshots in one second get -2, -3, ...)."""
    for n in range(1, 1000):
        candidate = directory / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            os.link(src, candidate)
        except FileExistsError:
            continue
        src.unlink()
        return candidate
    raise SnapshotFailed(f"no free file name for {stem}{suffix} in {directory}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_plain(target_dir: Path, part: Path, encrypted: bool) -> tuple[int, Path | None]:
    """Where the plaintext stream goes. Encrypted: an unnamed O_TMPFILE, so
    no plaintext file ever has a name and a crash leaves nothing behind.
    Otherwise (or where O_TMPFILE is unsupported): the named `.part` file."""
    if encrypted and hasattr(os, "O_TMPFILE"):
        try:
            return os.open(target_dir, os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError:
            pass
    return os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), part


def _encrypt(plain_fd: int, out: Path, recipients: tuple[str, ...]) -> None:
    """age-encrypt the plaintext into `out` (0600), streaming, then fsync."""
    import pyrage
    from pyrage import x25519
    keys = [x25519.Recipient.from_str(r) for r in recipients]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(os.dup(plain_fd), "rb", closefd=True) as src, os.fdopen(fd, "wb") as dst:
        src.seek(0)
        pyrage.encrypt_io(src, dst, keys)
        dst.flush()
        os.fsync(dst.fileno())


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def save_snapshot(client: EtcdClient, endpoint: str, member: str, directory: Path, cluster: str,
                        recipients: tuple[str, ...] = ()) -> SavedSnapshot:
    """Stream one member's snapshot into `directory/<cluster>/`, verify it,
    compute its status, and (with age recipients) encrypt it."""
    from bot.etcd.bbolt import SnapshotError, snapshot_status

    started = time.monotonic()
    created = time.time()
    target_dir = Path(directory) / cluster
    try:
        target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(target_dir, 0o700)
    except OSError as e:
        raise SnapshotFailed(f"cannot create {target_dir}: {e.strerror}") from None
    try:
        revision = await client.revision(endpoint)  # for the .part name; the final name uses the content's
        stream = await client.snapshot(endpoint)
    except EtcdError as e:
        raise SnapshotFailed(f"{member} would not start a snapshot: {e}", source_failed=True) from None
    when = dt.datetime.fromtimestamp(created, dt.UTC)
    name = snapshot_filename(cluster, when, revision)
    suffix = ".age" if recipients else ""
    part = target_dir / (name + suffix + ".part")
    plain_part = target_dir / (name + ".part")
    check = TrailerCheck()
    fd, named = -1, None
    writing: asyncio.Future[None] | None = None

    def write_and_hash(data: bytes) -> None:  # in a thread: disk and sha256 overlap the receive
        _write_all(fd, data)
        check.update(data)

    try:
        fd, named = _open_plain(target_dir, plain_part, bool(recipients))
        batch: list[bytes] = []
        size = 0
        async for chunk in stream:
            batch.append(chunk)
            size += len(chunk)
            if size >= WRITE_BATCH:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(write_and_hash, b"".join(batch)))
                batch, size = [], 0
        if writing is not None:
            await writing
            writing = None
        write_and_hash(b"".join(batch))
        check.verify()
        # fsync and the status walk overlap (one flushes, the other reads the page cache);
        # the stream's trailer was verified as it arrived: no second pass over the file
        _, status = await asyncio.gather(asyncio.to_thread(os.fsync, fd),
                                         asyncio.to_thread(snapshot_status, named or f"/proc/self/fd/{fd}", False))
        stem = snapshot_filename(cluster, when, status.revision).removesuffix(".db")
        if recipients:
            await asyncio.to_thread(_encrypt, fd, part, recipients)
            sha256 = await asyncio.to_thread(sha256_file, part)
            file_size = part.stat().st_size
            if named:
                named.unlink()
        else:
            sha256, file_size = check.file_sha256(), check.size
        os.close(fd)
        fd = -1
        final = _publish(part if recipients else plain_part, target_dir, stem, ".db" + suffix)
        await asyncio.to_thread(_fsync_dir, target_dir)
    except BaseException as e:
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)
        if fd >= 0:
            os.close(fd)
        for leftover in (part, plain_part):
            leftover.unlink(missing_ok=True)
        if isinstance(e, EtcdError):
            raise SnapshotFailed(f"the stream from {member} broke after {check.size:,} bytes: {e}",
                                 source_failed=True) from None
        if isinstance(e, OSError):
            raise SnapshotFailed(f"cannot write the snapshot in {target_dir}: {e.strerror or e}; "
                                 f"nothing was kept") from None
        if isinstance(e, SnapshotError):
            raise SnapshotFailed(f"the saved data is not a valid snapshot: {e}") from None
        raise
    finally:
        stream.close()
    return SavedSnapshot(cluster=cluster, member=member, endpoint=endpoint, path=final, file_size=file_size,
                         sha256=sha256, status=status, duration=time.monotonic() - started, created_at=created,
                         encrypted=bool(recipients))


# ---------------------------------------------------------------- retention

def to_prune(snapshots: list[dict[str, Any]], keep_last: int | None, keep_days: float | None, now: float,
             keep_plan_days: float = 30.0, open_plan: str | None = None) -> list[dict[str, Any]]:
    """Snapshots no rule keeps. With neither rule set, nothing is pruned;
    with both, a snapshot stays when either rule keeps it. A plan's pre-change
    snapshot (its `plan_id`) stays at least `keep_plan_days`, and as long as
    that plan is `open_plan` (not finished), whatever the rules say."""
    if keep_last is None and keep_days is None:
        return []
    newest_first = sorted(snapshots, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    out = []
    for i, row in enumerate(newest_first):
        kept_by_count = keep_last is not None and i < keep_last
        kept_by_age = keep_days is not None and now - row["created_at"] < keep_days * 86400
        plan = row.get("plan_id")
        kept_by_plan = plan is not None and (plan == open_plan or now - row["created_at"] < keep_plan_days * 86400)
        if not (kept_by_count or kept_by_age or kept_by_plan):
            out.append(row)
    return out
