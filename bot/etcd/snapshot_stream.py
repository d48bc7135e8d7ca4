"""Snapshots: stream Maintenance.Snapshot to disk, verify, and only then give
the file its final name.

The stream is written to `<name>.db.part` in constant memory, its 32-byte
sha256 trailer verified as etcdctl does (size % 512 == 32, sha256 of all
before it), fsynced, its status computed, then renamed. On any failure the
`.part` file is removed: a file with a final name is always complete.
Writing, hashing, encrypting and uploading run in worker threads fed by the
receive loop (a pipeline), so they overlap the transfer instead of following it.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bot.domain.errors import EtcdError
from bot.domain.snapshot import SavedSnapshot, SnapshotFailed, SnapshotRecord
from bot.etcd.client import EtcdClient

if TYPE_CHECKING:
    pass

TRAILER = 32


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


WRITE_BATCH = 1 << 20   # bytes handed to the worker threads at once
QUEUE_DEPTH = 3         # batches a worker may have waiting: memory stays bounded whatever the size
CIPHER_BATCH = 1 << 20  # age writes 64 KiB chunks; they are gathered to this before the disk and the upload


class Tee(Protocol):
    """A second destination of the bytes as stored (the off-site upload), fed in
    order from one worker thread while the snapshot is saved. `close()` makes it
    final and is called only once the snapshot is verified; `abort()` drops it.
    Its failure never fails the save: it is reported in `SavedSnapshot.upload_error`."""

    url: str

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _Stage:
    """One worker thread doing `work()` on the batches in order, fed through a
    bounded queue (a full queue makes the feeder wait: backpressure). hashlib,
    file writes, age and the upload client release the GIL, so the stages and
    the receive loop overlap. The first error stops the work (later batches are
    drained and dropped, so a feeder never blocks on a dead stage)."""

    def __init__(self, name: str, fn: Callable[[bytes], object] | None = None):
        self.name, self.fn = name, fn
        self.error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_DEPTH)
        self._ended = False  # the end of input was taken from the queue
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> _Stage:
        threading.Thread(target=self._run, name=self.name, daemon=True).start()
        return self

    def items(self) -> Iterator[bytes]:
        while not self._ended:
            item = self._queue.get()
            if item is None:
                self._ended = True
                return
            yield item

    def work(self) -> None:
        assert self.fn is not None
        for item in self.items():
            self.fn(item)

    def _run(self) -> None:
        try:
            self.work()
        except BaseException as e:
            self.error = e
            for _ in self.items():  # drain, so the feeder never blocks
                pass
        finally:
            self._loop.call_soon_threadsafe(self._set_done)

    def _set_done(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def put(self, data: bytes | None) -> None:
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, data)

    def put_blocking(self, data: bytes | None) -> None:
        """From another worker thread."""
        self._queue.put(data)

    async def finish(self) -> BaseException | None:
        """Wait until every batch is handled; the error that stopped it, if one did."""
        if not self._done.done():
            await self.put(None)
            await asyncio.shield(self._done)
        return self.error


class _Encryptor(_Stage):
    """age-encrypts the plaintext stream as it arrives (pyrage's streaming
    encryption in this stage's thread); the ciphertext goes to the `.age.part`
    file (hashed) and to the upload stage. No plaintext byte reaches anything
    but the unnamed temporary file and this thread."""

    def __init__(self, out_fd: int, recipients: tuple[str, ...], upload: _Stage | None):
        super().__init__("snapshot-age")
        from pyrage import x25519
        self._keys = [x25519.Recipient.from_str(r) for r in recipients]
        self.out_fd, self.upload = out_fd, upload
        self.hash = hashlib.sha256()
        self.size = 0
        self._plain = self.items()
        self._view = memoryview(b"")
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._write_error: OSError | None = None

    def work(self) -> None:
        import pyrage
        try:
            pyrage.encrypt_io(self, self, self._keys)
        except pyrage.EncryptError as e:
            # pyrage wraps what our write() raised (a full disk, a file too large): that is the error to name
            if self._write_error is not None:
                raise self._write_error from None
            raise SnapshotFailed(f"age could not encrypt the snapshot: {e}") from None
        self._flush()

    def read(self, n: int = -1) -> bytes:
        """The plaintext, for pyrage (it reads 8 KiB at a time)."""
        while not self._view:
            item = next(self._plain, None)
            if item is None:
                return b""
            self._view = memoryview(item)
        n = len(self._view) if n < 0 else n
        out, self._view = bytes(self._view[:n]), self._view[n:]
        return out

    def write(self, data: bytes) -> int:
        """The ciphertext, from pyrage (64 KiB chunks): gathered, then written and handed on."""
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= CIPHER_BATCH:
            try:
                self._flush()
            except OSError as e:
                self._write_error = e
                raise
        return len(data)

    def flush(self) -> None:
        pass

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        if not data:
            return
        _write_all(self.out_fd, data)
        self.hash.update(data)
        self.size += len(data)
        if self.upload is not None:
            self.upload.put_blocking(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _free_stem(directory: Path, stem: str, suffix: str) -> str:
    """The first of stem, stem-2, stem-3... with neither a file nor a `.part` under it
    (two snapshots of one revision in one second): an upload's object key is
    decided before the stream starts."""
    for n in range(1, 1000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        if not (directory / f"{candidate}{suffix}").exists() and \
                not (directory / f"{candidate}{suffix}.part").exists():
            return candidate
    raise SnapshotFailed(f"no free file name for {stem}{suffix} in {directory}")


def _publish(src: Path, directory: Path, stem: str, suffix: str) -> Path:
    """Give the finished file its final name, never replacing another: link(2)
    fails on an existing name (a race past _free_stem gets -2, -3, ...)."""
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


async def save_snapshot(client: EtcdClient, endpoint: str, member: str, directory: Path, cluster: str,
                        recipients: tuple[str, ...] = (),
                        upload: Callable[[str], Tee] | None = None, *, follows_leader: bool = False) -> SavedSnapshot:
    """Stream one member's snapshot into `directory/<cluster>/`, verify it,
    compute its status, and (with age recipients) encrypt it as it arrives.

    `follows_leader` (ClusterHealth.linearizable_through the member): the
    stream opens only once the member has applied every write the cluster
    acknowledged before the call (a linearizable read through it). A write is
    acknowledged once a quorum has it, so a follower, the usual source, may
    still be applying it: without the wait its snapshot could lack it.
    Without a leader nothing newer can be committed, and the read would hang.

    A pipeline: the receive loop hands 1 MiB batches to worker threads that
    write, hash, encrypt and upload at the same time (bounded queues: constant
    memory). `upload(file name)`, when given, opens a Tee fed the bytes as
    stored (the ciphertext when encrypted) and completed only once the snapshot
    is verified; its failure is reported in `upload_error`, never fails the save."""
    from bot.domain.snapshot import SnapshotError
    from bot.etcd.bbolt import snapshot_status

    started = time.monotonic()
    created = time.time()
    target_dir = Path(directory) / cluster
    try:
        target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(target_dir, 0o700)
    except OSError as e:
        raise SnapshotFailed(f"cannot create {target_dir}: {e.strerror}") from None
    try:
        # for the .part name (and an upload's: see below)
        revision = await client.revision(endpoint, linearizable=follows_leader)
        stream = await client.snapshot(endpoint)
    except EtcdError as e:
        raise SnapshotFailed(f"{member} would not start a snapshot: {e}", source_failed=True) from None
    when = dt.datetime.fromtimestamp(created, dt.UTC)
    suffix = ".db.age" if recipients else ".db"
    stem = _free_stem(target_dir, snapshot_filename(cluster, when, revision).removesuffix(".db"), suffix)
    part = target_dir / f"{stem}{suffix}.part"
    plain_part = target_dir / f"{stem}.db.part"
    check = TrailerCheck()
    fd, age_fd, named = -1, -1, None
    stages: list[_Stage] = []
    tee: Tee | None = None
    tee_stage: _Stage | None = None
    upload_error: str | None = None
    try:
        fd, named = _open_plain(target_dir, plain_part, bool(recipients))
        if upload is not None:
            try:
                tee = upload(f"{stem}{suffix}")
                tee_stage = _Stage("snapshot-upload", tee.write).start()
            except Exception as e:
                upload_error = _one_line(e)
        disk = _Stage("snapshot-write", lambda data: _write_all(fd, data)).start()
        hashing = _Stage("snapshot-hash", check.update).start()
        stages += [disk, hashing]
        encryptor: _Encryptor | None = None
        if recipients:
            age_fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            encryptor = _Encryptor(age_fd, recipients, tee_stage)
            stages.append(encryptor.start())
        elif tee_stage is not None:
            stages.append(tee_stage)
        batch: list[bytes] = []
        size = 0
        async for chunk in stream:
            batch.append(chunk)
            size += len(chunk)
            if size >= WRITE_BATCH:
                data = b"".join(batch)
                batch, size = [], 0
                for stage in stages:
                    await stage.put(data)
                for needed in (disk, encryptor):
                    if needed is not None and needed.error is not None:
                        raise needed.error
        data = b"".join(batch)
        for stage in stages:
            if data:
                await stage.put(data)
        for needed in (disk, hashing, encryptor):
            if needed is not None and (error := await needed.finish()) is not None:
                raise error
        check.verify()
        # fsync and the status walk overlap (one flushes, the other reads the page cache);
        # the stream's trailer was verified as it arrived: no second pass over the file.
        # The upload drains meanwhile.
        finishing = [asyncio.to_thread(os.fsync, fd),
                     asyncio.to_thread(snapshot_status, named or f"/proc/self/fd/{fd}", False)]
        if encryptor is not None:
            finishing.append(asyncio.to_thread(os.fsync, age_fd))
        status = (await asyncio.gather(*finishing))[1]
        assert status is not None
        if encryptor is not None:
            sha256, file_size = encryptor.hash.hexdigest(), encryptor.size
            os.close(age_fd)
            age_fd = -1
            if named:
                named.unlink()
        else:
            sha256, file_size = check.file_sha256(), check.size
        os.close(fd)
        fd = -1
        # The final name carries the content's revision; with an upload, the name it was
        # given at the start (the object key is fixed before the data: the revision then,
        # which the data holds at least).
        if tee is None:
            stem = snapshot_filename(cluster, when, status.revision).removesuffix(".db")
        final = _publish(part if recipients else plain_part, target_dir, stem, suffix)
        await asyncio.to_thread(_fsync_dir, target_dir)
    except BaseException as e:
        for stage in [*stages, *([tee_stage] if tee_stage is not None else [])]:  # the encryptor feeds the upload
            await asyncio.gather(stage.finish(), return_exceptions=True)
        if tee is not None:
            await asyncio.to_thread(tee.abort)
        for open_fd in (fd, age_fd):
            if open_fd >= 0:
                os.close(open_fd)
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
    if tee is not None and tee_stage is not None:
        upload_error = await _complete(tee, tee_stage, final.name)
    return SavedSnapshot(cluster=cluster, member=member, endpoint=endpoint, path=final, file_size=file_size,
                         sha256=sha256, status=status, duration=time.monotonic() - started, created_at=created,
                         encrypted=bool(recipients), remote_url=tee.url if tee is not None else None,
                         upload_error=upload_error)


async def _complete(tee: Tee, stage: _Stage, final_name: str) -> str | None:
    """Finish the verified snapshot's upload: the last parts, then make it visible.
    The error, as one line, when the upload failed (it was aborted)."""
    error = await stage.finish()
    if error is None and not tee.url.endswith("/" + final_name):
        error = RuntimeError(f"the file was named {final_name} after the upload began")  # a race past _free_stem
    try:
        if error is None:
            await asyncio.to_thread(tee.close)
            return None
    except Exception as e:
        error = e
    await asyncio.to_thread(tee.abort)
    return _one_line(error)


# ---------------------------------------------------------------- retention

def to_prune(snapshots: list[SnapshotRecord], keep_last: int | None, keep_days: float | None, now: float,
             keep_plan_days: float = 30.0, open_plan: str | None = None) -> list[SnapshotRecord]:
    """Snapshots no rule keeps. With neither rule set, nothing is pruned;
    with both, a snapshot stays when either rule keeps it. A plan's pre-change
    snapshot (its `plan_id`) stays at least `keep_plan_days`, and as long as
    that plan is `open_plan` (not finished), whatever the rules say."""
    if keep_last is None and keep_days is None:
        return []
    newest_first = sorted(snapshots, key=lambda r: (r.created_at, r.id), reverse=True)
    out = []
    for i, row in enumerate(newest_first):
        kept_by_count = keep_last is not None and i < keep_last
        kept_by_age = keep_days is not None and now - row.created_at < keep_days * 86400
        plan = row.plan_id
        kept_by_plan = plan is not None and (plan == open_plan or now - row.created_at < keep_plan_days * 86400)
        if not (kept_by_count or kept_by_age or kept_by_plan):
            out.append(row)
    return out
