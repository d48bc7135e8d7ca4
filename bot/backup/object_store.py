"""The off-site store: one API over S3, GCS, Azure Blob and a mounted
directory (obstore), laid out as `<prefix>/<cluster>/<file name>` with
`<file name>.manifest.json` next to each snapshot.

Credentials are never configured here: obstore reads them as each cloud's SDK
does (`AWS_*`, IRSA's web identity, instance metadata, `GOOGLE_APPLICATION_CREDENTIALS`,
`AZURE_*`). Error texts are cut to one line and never carry them (obstore's
messages hold the URL and status, not the signature or keys).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore as obs
from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

from bot.backup.manifest import MANIFEST_SUFFIX, Manifest, ManifestError, authenticate
from bot.config.offsite import StoreConfig

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig

log = logging.getLogger(__name__)

PART_SIZE = 5 << 20          # bytes per multipart part (S3's minimum; a small part keeps memory small)
PART_CONCURRENCY = 3         # parts in flight: an upload holds about PART_SIZE x (this + 1) bytes
READ_CHUNK = 1 << 20


class ObjectStoreError(Exception):
    """The object store refused or could not be reached; one line, no credentials."""


@dataclass(frozen=True)
class RemoteObject:
    name: str                 # the file name (the key below `<prefix>/<cluster>/`)
    size: int
    last_modified: float      # unix seconds


def one_line(e: BaseException) -> str:
    """An obstore error as one short line: its first sentence and the root cause from the debug
    dump that follows it ("Connection refused"), never the dump itself."""
    head, _, dump = str(e).partition("Debug source:")
    text = " ".join(head.split()) or type(e).__name__
    causes = re.findall(r'message: "([^"\n]{1,120})"', dump)
    if causes and causes[-1] not in text:
        text += f" ({causes[-1]})"
    text = re.sub(r"(https?://[^\s?]+)\?[^\s]*", r"\1?…", text)  # query strings: an Azure SAS token, a signature
    text = re.sub(r"(?i)(signature|credential|x-amz-security-token|authorization|sig)=[^&\s,)]+", r"\1=…", text)
    return text[:240] + ("…" if len(text) > 240 else "")


def _missing(e: BaseException) -> bool:
    """The object is not there: obstore raises FileNotFoundError, or its NotFoundError on some stores."""
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def _fail(what: str, e: BaseException) -> ObjectStoreError:
    kind = {"NotFoundError": "not found", "PermissionDeniedError": "permission denied",
            "UnauthenticatedError": "not authenticated (check the credentials in the environment)"}.get(
        type(e).__name__)
    return ObjectStoreError(f"{what}: {kind}" if kind else f"{what}: {one_line(e)}")


class _Aborted(Exception):
    """Raised into obstore's upload to make it abort the multipart upload."""


class Upload:
    """One object being written: obstore's multipart upload runs on the event loop,
    pulling the bytes from a small queue, while a worker thread (the save's upload
    stage) feeds it in order with `write()`; parts go up while later bytes still
    arrive. Nothing is visible under the key until `close()` completes; `abort()`
    (or any failure) aborts the multipart upload. write/close/abort block: call
    them from a worker thread, never the event loop. Create it on the event loop."""

    def __init__(self, store: OffsiteStore, cluster: str, name: str):
        self.cluster, self.name = cluster, name
        self.key = store.key(cluster, name)
        self.url = store.display_url(cluster, name)
        self.size = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | None | _Aborted] = asyncio.Queue(2)
        self._lock = threading.Lock()
        self._done = False
        self._active, self._swept = store.active, store.swept
        self._active.add(self.key)
        self._task = asyncio.ensure_future(obs.put_async(store.store, self.key, self._chunks(), chunk_size=PART_SIZE,
                                                           max_concurrency=PART_CONCURRENCY))

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, _Aborted):
                raise item
            yield item

    async def _put(self, item: bytes | None | _Aborted) -> None:
        """Queue `item`, unless the upload ended first (then its error)."""
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            error = self._task.exception() if not self._task.cancelled() else None
            raise error or ObjectStoreError("the upload ended early")

    def _off_the_loop(self) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("Upload.write/close/abort block: call them from a worker thread")

    def _call(self, item: bytes | None | _Aborted) -> None:
        asyncio.run_coroutine_threadsafe(self._put(item), self._loop).result()

    def _finish(self) -> None:
        asyncio.run_coroutine_threadsafe(asyncio.wait({self._task}), self._loop).result()

    def write(self, data: bytes) -> None:
        self._off_the_loop()
        try:
            self._call(data)
        except Exception as e:
            self.abort()
            raise _fail(f"uploading {self.name}", e) from None
        self.size += len(data)

    def close(self) -> None:
        """Complete the upload: the object becomes visible."""
        self._off_the_loop()
        with self._lock:
            if self._done:
                raise ObjectStoreError(f"uploading {self.name}: the upload was aborted")
            self._done = True
            self._active.discard(self.key)
        try:
            self._call(None)
            self._finish()
            if (error := self._task.exception()) is not None:
                raise error
        except Exception as e:
            self._swept.pop(self.cluster, None)  # obstore aborts a failed upload, unless the store is unreachable
            raise _fail(f"uploading {self.name}", e) from None

    def abort(self) -> None:
        """Abort the multipart upload (idempotent; from the event loop it raises RuntimeError, else never)."""
        self._off_the_loop()
        with self._lock:
            if self._done:
                return
            self._done = True
            self._active.discard(self.key)
        self._swept.pop(self.cluster, None)  # whether obstore's abort reached the store is not told: look again
        try:
            self._call(_Aborted("aborted"))  # obstore aborts the multipart upload when its source raises
        except Exception:
            pass  # it had ended already (failed): obstore aborted it then
        try:
            self._finish()
        except Exception as e:
            log.warning("could not abort an upload", extra={"ctx_key": self.key, "ctx_error": one_line(e)})
            return
        if not self._task.cancelled():
            self._task.exception()  # retrieved: the failure was reported where it happened


class OffsiteStore:
    """Snapshots of every cluster in one object store."""

    def __init__(self, config: StoreConfig, store: ObjectStore, root: Path | None = None):
        self.config = config
        self.store = store
        self.root = root  # file:// only: the directory
        self.active: set[str] = set()  # keys this store is uploading now (not leftovers)
        # cluster -> the snapshot lease's token (bot/ops/snapshots.py) of the last tenure after which
        # it had no leftovers of this store's (swept, and no abort failed since)
        self.swept: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: StoreConfig, options: Mapping[str, str] | None = None) -> OffsiteStore:
        """`options`: extra obstore configuration (tests and benches; the bot passes none and
        lets obstore read the environment)."""
        parts = urlsplit(config.url)
        prefix = parts.path.strip("/") or None
        retry: RetryConfig = {"max_retries": 3, "retry_timeout": dt.timedelta(seconds=30),
                              "backoff": {"init_backoff": dt.timedelta(milliseconds=200),
                                          "max_backoff": dt.timedelta(seconds=5), "base": 2}}
        client: ClientConfig = {"connect_timeout": dt.timedelta(seconds=5), "timeout": dt.timedelta(seconds=120)}
        extra: dict[str, Any] = dict(options or {})
        store: ObjectStore
        try:
            if parts.scheme == "s3":
                if config.endpoint:
                    extra["endpoint"] = config.endpoint
                    client["allow_http"] = config.endpoint.startswith("http://")
                if config.region:
                    extra["region"] = config.region
                store = S3Store(parts.netloc, prefix=prefix, client_options=client, retry_config=retry, **extra)
            elif parts.scheme == "gs":
                store = GCSStore(parts.netloc, prefix=prefix, client_options=client, retry_config=retry, **extra)
            elif parts.scheme == "az":
                store = AzureStore(parts.netloc, prefix=prefix, client_options=client, retry_config=retry, **extra)
            elif parts.scheme == "file":
                root = Path(parts.path)
                root.mkdir(parents=True, exist_ok=True, mode=0o700)
                return cls(config, LocalStore(prefix=root, mkdir=True), root)
            else:
                raise ObjectStoreError(f"{config.url}: unknown scheme {parts.scheme!r}")
        except ObjectStoreError:
            raise
        except Exception as e:
            raise _fail(f"cannot use {config.url}", e) from None
        return cls(config, store)

    # -- names -----------------------------------------------------------------

    @staticmethod
    def key(cluster: str, name: str) -> str:
        return f"{cluster}/{name}"

    def display_url(self, cluster: str, name: str = "") -> str:
        """Where an object is, as people read it (the configured URL: never credentials)."""
        return f"{self.config.url.rstrip('/')}/{cluster}/{name}"

    # -- reading ---------------------------------------------------------------

    async def list(self, cluster: str) -> list[RemoteObject]:
        """The snapshots of `cluster` (not their manifests), oldest first."""
        out = []
        prefix = f"{cluster}/"
        stream = obs.list(self.store, prefix)
        try:
            async for batch in stream:
                for meta in batch:
                    name = meta["path"].removeprefix(prefix)
                    if "/" in name or name.endswith(MANIFEST_SUFFIX) or not meta["path"].startswith(prefix):
                        continue
                    out.append(RemoteObject(name, meta["size"], meta["last_modified"].timestamp()))
        except Exception as e:
            raise _fail(f"listing {self.display_url(cluster)}", e) from None
        finally:
            del stream  # a finished stream left for the interpreter's exit aborts the process (SIGABRT)
        return sorted(out, key=lambda o: (o.last_modified, o.name))

    async def head(self, cluster: str, name: str) -> RemoteObject | None:
        """The object's size and time, or None when there is none."""
        try:
            meta = await obs.head_async(self.store, self.key(cluster, name))
        except Exception as e:
            if _missing(e):
                return None
            raise _fail(f"reading {self.display_url(cluster, name)}", e) from None
        return RemoteObject(name, meta["size"], meta["last_modified"].timestamp())

    async def get_stream(self, cluster: str, name: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of about READ_CHUNK (constant memory)."""
        try:
            result = await obs.get_async(self.store, self.key(cluster, name))
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                yield bytes(chunk)
        except Exception as e:
            raise _fail(f"reading {self.display_url(cluster, name)}", e) from None

    async def sha256(self, cluster: str, name: str) -> tuple[str, int]:
        """Read the object back: its sha256 and size (hashing off the event loop)."""
        h = hashlib.sha256()
        size = 0
        async for chunk in self.get_stream(cluster, name):
            await asyncio.to_thread(h.update, chunk) if len(chunk) >= 1 << 20 else h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    async def fetch_to(self, cluster: str, name: str, dest: Path) -> tuple[str, int]:
        """Download to `dest` (0600, via `dest.part`, renamed when complete): its sha256 and size."""
        part = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        size = 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in self.get_stream(cluster, name):
                    await asyncio.to_thread(_write_hash, f, h, chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return h.hexdigest(), size

    async def read_manifest(self, cluster: str, name: str) -> Manifest | None:
        """The manifest next to `name`; None when there is none; RemoteError when it is unreadable or invalid.
        What it says is a claim until `foreign` finds nothing against it."""
        try:
            result = await obs.get_async(self.store, self.key(cluster, name + MANIFEST_SUFFIX))
            data = await result.bytes_async()
        except Exception as e:
            if _missing(e):
                return None
            raise _fail(f"reading the manifest of {name}", e) from None
        try:
            return Manifest.from_json(bytes(data))
        except ManifestError as e:
            raise ObjectStoreError(f"{self.display_url(cluster, name + MANIFEST_SUFFIX)}: {e}") from None

    def foreign(self, manifest: Manifest, cluster: str, name: str) -> str:
        """Why the object `name` of `cluster`, as `manifest` describes it, is not one this bot wrote
        ("" when it is): the manifest is signed with this store's manifest key, not dated in the
        future, and names this very object."""
        if (manifest.cluster, manifest.file_name) != (cluster, name):
            return "its manifest describes another object"
        return authenticate(manifest, self.config.manifest_key, time.time())

    # -- writing ---------------------------------------------------------------

    def begin_upload(self, cluster: str, name: str) -> Upload:
        """Start a streaming upload of `name` (see Upload)."""
        try:
            return Upload(self, cluster, name)
        except Exception as e:
            raise _fail(f"uploading {name}", e) from None

    async def upload_file(self, cluster: str, name: str, path: Path) -> None:
        """Upload a finished local file (the retry after a failed streaming upload); multipart, aborted on failure."""
        try:
            await obs.put_async(self.store, self.key(cluster, name), path, chunk_size=PART_SIZE,
                                max_concurrency=PART_CONCURRENCY)
        except Exception as e:
            self.swept.pop(cluster, None)  # obstore's own abort may have failed too: look again next time
            raise _fail(f"uploading {name}", e) from None

    async def write_manifest(self, manifest: Manifest) -> None:
        """Put the manifest next to its object, signed with the manifest key when one is configured."""
        key = self.config.manifest_key
        signed = manifest.signed(key) if key else manifest
        try:
            await obs.put_async(self.store, self.key(manifest.cluster, manifest.file_name + MANIFEST_SUFFIX),
                                signed.to_json().encode(), use_multipart=False)
        except Exception as e:
            raise _fail(f"writing the manifest of {manifest.file_name}", e) from None

    async def delete(self, cluster: str, name: str) -> None:
        """Delete the object and its manifest (either may be gone already)."""
        for key in (self.key(cluster, name), self.key(cluster, name + MANIFEST_SUFFIX)):
            try:
                await obs.delete_async(self.store, key)
            except Exception as e:
                if _missing(e):
                    continue
                raise _fail(f"deleting {self.display_url(cluster, name)}", e) from None

    def needs_sweep(self, cluster: str, token: int = 0) -> bool:
        """Whether unfinished uploads of `cluster` may exist. `token`: the tenure of the cluster's
        snapshot lease now held. Yes when not looked for since this bot started (a killed
        predecessor's), when an abort failed since (the store was down), or when another
        replica held the lease since this store's last tenure (it may have died mid-upload)."""
        last = self.swept.get(cluster)
        return last is None or last < token - 1

    def clean_tenure(self, cluster: str, token: int) -> None:
        """A tenure of the lease ended with no leftovers of this store's (when none were known before)."""
        if cluster in self.swept:
            self.swept[cluster] = token

    async def abort_leftovers(self, cluster: str, token: int = 0) -> int:
        """Abort the unfinished uploads of `cluster` that a killed bot left (never one this
        store is running): not visible objects, but they cost storage. The caller holds the
        cluster's snapshot lease (tenure `token`), under which every upload of the cluster
        runs, in any replica: so an unfinished upload not this store's is a dead one's (the
        bucket's own clock, the uploads' Initiated time, is not needed). obstore has no way to
        list them, so: S3 through botocore (ListMultipartUploads + AbortMultipartUpload, the
        same credential chain) in a short-lived child process, as botocore's S3 model costs
        ~40 MB that would stay in the bot; file:// by removing obstore's staging files
        (`<name>#<n>`). GCS and Azure: none (Azure drops uncommitted blocks after 7 days; on
        GCS use a lifecycle rule). Returns how many."""
        active = set(self.active)
        if self.root is not None:
            aborted = await asyncio.to_thread(_remove_staging, self.root / cluster, active)
        elif self.config.scheme == "s3":
            aborted = await self._abort_s3_uploads(cluster, active)
        else:
            aborted = 0
        self.swept[cluster] = token
        return aborted

    async def _abort_s3_uploads(self, cluster: str, active: set[str]) -> int:
        parts = urlsplit(self.config.url)
        root = parts.path.strip("/")
        prefix = "/".join(p for p in (root, cluster) if p) + "/"
        skip = [root + "/" + key if root else key for key in active]
        argv = [sys.executable, "-m", "bot.backup.leftovers", parts.netloc, prefix, self.config.endpoint or "",
                self.config.region or "", *skip]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        except BaseException:
            proc.kill()
            await proc.wait()
            raise ObjectStoreError(f"listing the unfinished uploads under {self.display_url(cluster)}: "
                              "no answer within 120s") from None
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise ObjectStoreError(f"listing the unfinished uploads under {self.display_url(cluster)}: "
                              f"{one_line(RuntimeError(lines[-1] if lines else f'exit {proc.returncode}'))}")
        return int(out.decode().strip() or 0)


def _write_hash(f: Any, h: Any, chunk: bytes) -> None:
    f.write(chunk)
    h.update(chunk)


_STAGING = re.compile(r".+#\d+")


def _remove_staging(directory: Path, active: set[str]) -> int:
    """obstore's LocalStore writes `<name>#<n>` and renames it when complete: a killed writer leaves one."""
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        key = f"{directory.name}/{path.name.rsplit('#', 1)[0]}"
        if _STAGING.fullmatch(path.name) and path.is_file() and key not in active:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


async def verify_upload(store: OffsiteStore, cluster: str, name: str, size: int, sha256: str) -> None:
    """The object is there, of the local file's size, and reads back to its sha256; RemoteError otherwise."""
    head = await store.head(cluster, name)
    if head is None:
        raise ObjectStoreError(f"{store.display_url(cluster, name)} is not there after the upload")
    if head.size != size:
        raise ObjectStoreError(f"{store.display_url(cluster, name)} holds {head.size:,} bytes, the local file {size:,}")
    remote_sha, remote_size = await store.sha256(cluster, name)
    if (remote_sha, remote_size) != (sha256, size):
        raise ObjectStoreError(f"{store.display_url(cluster, name)} reads back with sha256 {remote_sha[:12]}…, "
                          f"the local file's is {sha256[:12]}…")


_STORES: dict[StoreConfig, OffsiteStore] = {}


def object_store(config: StoreConfig) -> OffsiteStore:
    """The store of a `[snapshots.store]` table (one per table, for the bot's lifetime)."""
    store = _STORES.get(config)
    if store is None:
        store = _STORES[config] = OffsiteStore.from_config(config)
    return store
