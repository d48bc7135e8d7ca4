"""A read-only bbolt reader that computes what `etcdutl snapshot status` prints.

Why our own reader: the bot reports a snapshot's hash, revision, key count
and size right after saving it, and the CLI does the same offline, without
shipping or shelling out to etcdutl. Every number is computed the way
etcdutl computes it, as the release that wrote the file prints it: etcd 3.6
records its storage version in bucket "meta" (key "storageVersion"), and
etcdutl 3.6 counts live keys and adds a VERSION column; a file without it
is etcd 3.5's (or 3.4's), whose etcdutl counts every key:

- hash: CRC-32C (Castagnoli) over, for each top-level bucket in stored
  order, the bucket name, then each key and value of that bucket (a nested
  bucket's entry contributes its key only: bolt hands it out with a nil
  value, and the nested bucket's own content is not hashed);
- total keys: up to etcd 3.5, every entry of every top-level bucket (nested
  bucket entries included, their content not); for a 3.6 file, the live keys;
- revision: the main revision (first 8 bytes, big-endian, signed) of the
  last key of bucket "key", 0 without that bucket;
- total size: the current meta's page high-water mark x the page size;
- live keys (etcd v3.6's meaning, not printed by v3.5): distinct user keys
  (read from each mvccpb.KeyValue in bucket "key") whose last revision is
  not a tombstone;
- storage version: the semantic version in bucket "meta", key
  "storageVersion" ("" without one).

A meta page's checksum must match, 0 included: bbolt from v1.3.7 (etcd
3.5.8 and later) no longer takes a zero checksum for "not checksummed".

Like etcdutl, the file's structure is checked first (bolt's tx.Check:
every page reachable once, in bounds, of the right type, not freed), and
more strictly than bolt where a damaged file would make bolt crash or read
past the end: every offset is bounds-checked, pages are visited at most
once (no cycle can loop), and the work is bounded by the file's size.
Every failure is a SnapshotError with one line that names the file.

Files: an API snapshot (`etcdctl snapshot save`) is the bbolt file
followed by a 32-byte sha256 of everything before it -- present when the
size is 32 more than a multiple of 512, as etcdctl decides -- and is
verified; a raw `member/snap/db` copy has no trailer, and may be longer
than the pages it uses (etcd 3.5.36 and 3.6 grow the file to 16 MiB): any
length that holds them is read, as bolt reads it.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bot.domain.snapshot import SnapshotError, SnapshotStatus

__all__ = ["SnapshotError", "SnapshotStatus", "snapshot_status"]

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER = 16            # id u64, flags u16, count u16, overflow u32
ELEMENT = 16                # both leaf and branch page elements are 16 bytes
BUCKET_HEADER = 16          # root pgid u64, sequence u64
META_SIZE = 64              # magic .. checksum
TRAILER = 32                # sha256 appended by the Maintenance.Snapshot stream
BRANCH, LEAF, META, FREELIST = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF_FLAG = 0x01
NO_FREELIST = 0xFFFFFFFFFFFFFFFF
DEFAULT_PAGE_SIZE = 4096    # bolt's fallback (os.Getpagesize()) when meta 0 is unreadable
KEY_BUCKET = b"key"
META_BUCKET = b"meta"
STORAGE_VERSION_KEY = b"storageVersion"   # written by etcd 3.6 and later
_SEMVER = re.compile(rb"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
REVISION_KEY_MIN = 17       # 8-byte main, '_', 8-byte sub; etcdutl panics on shorter keys
TOMBSTONE_KEY_LEN = 18      # a revision key marked with a trailing 't'
TOMBSTONE_MARK = ord("t")

_PAGE = struct.Struct("<QHHI")
_META = struct.Struct("<IIIIQQQQQQ")
_LEAF = struct.Struct("<IIII")
_BRANCH = struct.Struct("<IIQ")
_U64 = struct.Struct("<Q")
_REV_MAIN = struct.Struct(">q")

_FNV_OFFSET, _FNV_PRIME, _U64_MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
_THREAD_MIN = 8 << 20       # hash the trailer in a thread from this size on
_HASH_WINDOW = 32 << 20     # the trailer is hashed through the map in windows this big, each dropped after
_RELEASE_BYTES = 8 << 20   # drop the map's pages after walking this much (RSS stays small)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)

# on_leaf(offset, end, count, where, pgid): what a bucket walk does with each leaf page (pgid 0: inline).
_OnLeaf = Callable[[int, int, int, str, int], None]

# State of each page in `_Reader.state`.
_UNSEEN, _REACHABLE, _FREED = 0, 1, 2
_ONES = b"\x01" * 64


def _load_crc32c() -> Callable[..., int]:
    """crc32c.crc32c, loaded straight from the package's C extension.

    The `crc32c` package's __init__ reads its own version through
    importlib.metadata, which costs ~30 ms of imports on a CLI path; its C
    extension alone costs well under 1 ms. Registered under its own name,
    so a later `import crc32c` reuses it.
    """
    if "crc32c" in sys.modules:
        return cast(Callable[..., int], sys.modules["crc32c"].crc32c)
    try:
        from importlib.machinery import ExtensionFileLoader, PathFinder

        name = "crc32c._crc32c"
        ext = sys.modules.get(name)
        if ext is None:
            pkg = PathFinder.find_spec("crc32c")
            spec = PathFinder.find_spec(name, pkg.submodule_search_locations) if pkg else None
            if spec is None or not isinstance(spec.loader, ExtensionFileLoader):
                raise ImportError(name)
            ext = spec.loader.create_module(spec)
            spec.loader.exec_module(ext)
            sys.modules[name] = ext
        return cast(Callable[..., int], ext.crc32c)
    except Exception:  # any odd installation: the ordinary, slower import
        import crc32c
        return crc32c.crc32c


_crc32c = _load_crc32c()


# -- table ------------------------------------------------------------------


# -- reading ----------------------------------------------------------------

def snapshot_status(path: str | os.PathLike[str], verify_trailer: bool = True) -> SnapshotStatus:
    """Status of an etcd snapshot or bbolt file, as `etcdutl snapshot status` computes it.

    Raises SnapshotError (one line naming the file) for anything that is not
    a whole, consistent snapshot; never hangs, never leaks another exception.
    `verify_trailer=False` skips the sha256 check of an API snapshot (etcdutl
    never does it; the saver has already checked the stream).
    """
    name = os.fsdecode(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"{name}: cannot open: {e.strerror or e}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise SnapshotError(f"{name}: empty file (0 bytes): not a snapshot")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: it became empty since fstat
            raise SnapshotError(f"{name}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        try:
            return _status(name, mm, min(size, len(mm)), verify_trailer)
        finally:
            try:
                mm.close()
            except BufferError:  # a view still held by a traceback: the collector unmaps it
                pass


def _status(name: str, mm: mmap.mmap, size: int, verify_trailer: bool) -> SnapshotStatus:
    with memoryview(mm) as mv:
        return _Reader(name, mm, mv, size, verify_trailer).run()


@dataclass(frozen=True)
class _Meta:
    page_size: int
    flags: int
    root: int
    freelist: int
    pgid: int
    txid: int
    problem: str | None  # why bolt's validate() rejects it, or None


def _fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _U64_MASK
    return h


def _read_meta(mm: mmap.mmap, offset: int, size: int) -> _Meta | None:
    """The meta at page offset `offset`, or None when the file ends before it."""
    start = offset + PAGE_HEADER
    if start + META_SIZE > size:
        return None
    magic, version, page_size, flags, root, _seq, freelist, pgid, txid, checksum = _META.unpack_from(mm, start)
    problem = None
    if magic != MAGIC:
        problem = "bad magic"
    elif version != VERSION:
        problem = f"unsupported version {version}"
    elif checksum != _fnv1a64(mm[start:start + META_SIZE - 8]):
        problem = "checksum mismatch"
    return _Meta(page_size, flags, root, freelist, pgid, txid, problem)


class _Reader:
    """One pass over one file: validate the structure while hashing.

    Hot loops keep to locals and build no message until something fails:
    a 300 MB snapshot has ~40,000 leaf pages.
    """

    def __init__(self, name: str, mm: mmap.mmap, mv: memoryview, size: int, verify_trailer: bool = True):
        self.name, self.mm, self.mv, self.size, self.verify_trailer = name, mm, mv, size, verify_trailer
        self.walked = 0                      # bytes of pages walked since the map's pages were last dropped
        self.bolt_size = size
        self.page_size = DEFAULT_PAGE_SIZE
        self.pgid = 0
        self.state = bytearray()
        self.budget = 0                      # page elements left to read (bounds the work)
        self.crc = 0
        self.total_keys = 0
        self.last_key = -1                   # offset of the last key of bucket "key"
        self.live: dict[bytes, bool] = {}
        self.storage_version = ""
        self.nested: list[tuple[str, int, int]] = []   # (where, value offset, value length)

    def fail(self, what: str) -> SnapshotError:
        return SnapshotError(f"{self.name}: {what}")

    # -- top level ----------------------------------------------------------

    def run(self) -> SnapshotStatus:
        has_trailer = self._framing()
        trailer_ok = self._check_trailer() if has_trailer and self.verify_trailer else None
        try:
            try:
                status = self._read(has_trailer)
            except (IndexError, ValueError, struct.error, OverflowError, KeyError) as e:
                # Unreachable while every check holds; a safety net: one line, never a traceback.
                raise self.fail(f"corrupt: unreadable structure ({type(e).__name__}: {e})") from None
        except SnapshotError:
            if trailer_ok is not None and not trailer_ok():  # the better explanation of any damage
                raise self._trailer_error() from None
            raise
        finally:
            if trailer_ok is not None:
                trailer_ok()  # the hashing thread reads the map: it must be done before it closes
        if trailer_ok is not None and not trailer_ok():
            raise self._trailer_error()
        return status

    def _read(self, has_trailer: bool) -> SnapshotStatus:
        meta = self._current_meta()
        self._check_extent(meta)
        self._load_freelist(meta)
        self._hash_buckets(meta.root)
        self._check_nested()
        if meta.freelist != NO_FREELIST:  # bolt's check: with a synced freelist, no page may be lost
            lost = self.state.find(_UNSEEN)
            if lost >= 0:
                raise self.fail(f"corrupt: page {lost:,} is neither reachable nor on the freelist")
        revision = _REV_MAIN.unpack_from(self.mm, self.last_key)[0] if self.last_key >= 0 else 0
        live = sum(self.live.values())
        return SnapshotStatus(hash=self.crc, revision=revision,
                              total_keys=live if self.storage_version else self.total_keys,
                              live_keys=live, total_size=meta.pgid * self.page_size, has_trailer=has_trailer,
                              storage_version=self.storage_version)

    def _framing(self) -> bool:
        """Is it bbolt at all, and does it carry the sha256 trailer?"""
        size = self.size
        m0 = _read_meta(self.mm, 0, size)
        m1 = _read_meta(self.mm, DEFAULT_PAGE_SIZE, size)
        if (m0 is None or m0.problem == "bad magic") and (m1 is None or m1.problem == "bad magic"):
            if m0 is None:
                raise self.fail(f"truncated or not a snapshot: {size:,} bytes cannot hold a bbolt meta page")
            raise self.fail("not a bbolt file (bad magic)")
        has_trailer = size % 512 == TRAILER
        if has_trailer:
            self.bolt_size = size - TRAILER
        return has_trailer

    def _check_trailer(self) -> Callable[[], bool]:
        """Start hashing the bbolt data; the result says whether the trailer matches.

        hashlib drops the GIL while it hashes a large buffer, so on a big file
        a thread hashes alongside the walk, one 32 MiB window of the map at a
        time (few GIL hand-overs), dropping each window's pages once hashed so
        the file never sits in our RSS (etcdutl does not verify the trailer).
        """
        import hashlib

        h = hashlib.sha256()
        total, mv, mm = self.bolt_size, self.mv, self.mm

        def digest() -> None:
            for start in range(0, total, _HASH_WINDOW):
                stop = min(start + _HASH_WINDOW, total)
                with mv[start:stop] as window:
                    h.update(window)
                if _DONTNEED is not None:
                    first = start - start % mmap.PAGESIZE
                    mm.madvise(_DONTNEED, first, stop - first)

        expected = bytes(mv[self.bolt_size:self.size])
        if total < _THREAD_MIN:
            digest()
            ok = h.digest() == expected
            return lambda: ok
        import threading

        worker = threading.Thread(target=digest, name="snapshot-sha256", daemon=True)
        worker.start()
        result: list[bool] = []

        def done() -> bool:
            if not result:
                worker.join()
                result.append(h.digest() == expected)
            return result[0]
        return done

    def _trailer_error(self) -> SnapshotError:
        return self.fail("sha256 trailer does not match the content: the file is corrupt or truncated")

    def _current_meta(self) -> _Meta:
        """bolt's choice: page size from meta 0 (4096 when it is invalid), then the valid meta with the higher txid."""
        m0 = _read_meta(self.mm, 0, self.bolt_size)
        if m0 is not None and m0.problem is None:
            self.page_size = m0.page_size
            if self.page_size < 512 or self.page_size > (1 << 20) or self.page_size & (self.page_size - 1):
                raise self.fail(f"corrupt: implausible page size {self.page_size:,} in meta page 0")
        ps = self.page_size
        if self.bolt_size < 2 * ps:
            raise self.fail(f"truncated: {self.bolt_size:,} bytes cannot hold the two meta pages "
                            f"of {ps:,} bytes each")
        m1 = _read_meta(self.mm, ps, self.bolt_size)
        if m0 is None or m1 is None:  # cannot happen: two pages hold both
            raise self.fail("truncated: no room for the meta pages")
        if m0.problem and m1.problem:
            raise self.fail(f"corrupt: both meta pages are invalid (meta 0: {m0.problem}; meta 1: {m1.problem})")
        meta = m1 if m1.problem is None and (m0.problem is not None or m1.txid > m0.txid) else m0
        if meta.page_size != ps:
            raise self.fail(f"corrupt: meta 0 is invalid and meta 1's page size {meta.page_size:,} "
                            f"is not the {ps:,} bolt assumes then")
        return meta

    def _check_extent(self, meta: _Meta) -> None:
        ps, pgid = self.page_size, meta.pgid
        if pgid < 3:
            raise self.fail(f"corrupt: the meta page counts {pgid} pages: too few for a bbolt file")
        if pgid * ps > self.bolt_size:
            first = self.bolt_size // ps
            pages = f"page {first:,} lies" if first == pgid - 1 else f"pages {first:,} to {pgid - 1:,} lie"
            raise self.fail(f"truncated: {pages} beyond the end of the file (size {self.size:,}; "
                            f"its meta page counts {pgid:,} pages of {ps:,} bytes)")
        self.pgid = pgid
        self.state = bytearray(pgid)
        self.state[0] = self.state[1] = _REACHABLE
        self.budget = self.bolt_size // ELEMENT

    # -- pages --------------------------------------------------------------

    @staticmethod
    def _at(where: str, pgid: int) -> str:
        return f"{where}, page {pgid:,}" if pgid else f"{where} (inline)"

    def _bad_pointer(self, pgid: int, where: str) -> SnapshotError:
        what = "a meta page" if pgid < 2 else f"beyond the high-water mark {self.pgid:,}"
        return self.fail(f"corrupt: {where} points to page {pgid:,}, {what}")

    def _claim(self, pgid: int, overflow: int, where: str) -> None:
        """Mark pages pgid..pgid+overflow reachable, or fail if one already is (or is free)."""
        last = pgid + overflow
        if last >= self.pgid:
            raise self.fail(f"corrupt: {where}: page {pgid:,} overflows by {overflow:,} pages past the "
                            f"high-water mark {self.pgid:,}")
        seen = self.state[pgid:last + 1]
        if seen.count(_UNSEEN) != len(seen):
            bad = pgid + next(i for i, s in enumerate(seen) if s != _UNSEEN)
            if seen[bad - pgid] == _FREED:
                raise self.fail(f"corrupt: {where}: page {bad:,} is in use but on the freelist")
            raise self.fail(f"corrupt: {where}: page {bad:,} is referenced twice (a cycle or a shared page)")
        self.state[pgid:last + 1] = b"\x01" * (last + 1 - pgid)

    def _spend(self, elements: int) -> None:
        """Every element header is 16 bytes of the file: more than size/16 means pages overlap."""
        self.budget -= elements
        if self.budget < 0:
            raise self.fail("corrupt: more page elements than the file can hold (overlapping inline pages)")

    def _load_freelist(self, meta: _Meta) -> None:
        """Mark the pages a synced freelist names (etcd writes none: NoFreelistSync)."""
        fl = meta.freelist
        if fl == NO_FREELIST:
            return
        if fl < 2 or fl >= self.pgid:
            raise self.fail(f"corrupt: the freelist page {fl:,} is outside the file's {self.pgid:,} pages")
        off = fl * self.page_size
        page_id, flags, count, overflow = _PAGE.unpack_from(self.mm, off)
        if page_id != fl or not flags & FREELIST:
            raise self.fail(f"corrupt: page {fl:,} is not the freelist page the meta names "
                            f"(id {page_id:,}, type {flags:#x})")
        self._claim(fl, overflow, "the freelist")
        end = off + (overflow + 1) * self.page_size
        start = off + PAGE_HEADER
        if count == 0xFFFF:  # bolt's convention past 64k ids: the real count is the first element
            count = _U64.unpack_from(self.mm, start)[0]
            start += 8
        if start + 8 * count > end:
            raise self.fail(f"corrupt: the freelist page {fl:,} lists {count:,} pages, more than it holds")
        state = self.state
        for (pid,) in _U64.iter_unpack(self.mv[start:start + 8 * count]):
            if pid < 2 or pid >= self.pgid:
                raise self.fail(f"corrupt: the freelist names page {pid:,}, outside 2..{self.pgid - 1:,}")
            if state[pid] == _FREED:
                raise self.fail(f"corrupt: page {pid:,} is on the freelist twice")
            if state[pid] == _REACHABLE:
                raise self.fail(f"corrupt: the freelist names page {pid:,}, which is the freelist itself")
            state[pid] = _FREED

    def _walk(self, root: int, where: str, on_leaf: _OnLeaf) -> None:
        """Visit the page tree under `root` in key order, calling on_leaf(offset, end, count, where, pgid).

        Each page is claimed once (a second visit is a cycle or a shared
        page), so the walk ends after at most pgid pages whatever the file holds.
        """
        mm, state, ps, limit = self.mm, self.state, self.page_size, self.pgid
        stack = [root]
        while stack:
            pgid = stack.pop()
            if pgid < 2 or pgid >= limit:
                raise self._bad_pointer(pgid, where)
            off = pgid * ps
            page_id, flags, count, overflow = _PAGE.unpack_from(mm, off)
            if page_id != pgid:
                raise self.fail(f"corrupt: {where}: page {pgid:,} says it is page {page_id:,}")
            if state.count(_UNSEEN, pgid, pgid + overflow + 1) == overflow + 1 and pgid + overflow < limit:
                state[pgid:pgid + overflow + 1] = _ONES[:overflow + 1] if overflow < 64 else b"\x01" * (overflow + 1)
            else:
                self._claim(pgid, overflow, where)  # fails, saying why
            self.budget -= count
            if self.budget < 0:
                self._spend(0)
            end = off + (overflow + 1) * ps
            self.walked += end - off
            if self.walked >= _RELEASE_BYTES and _DONTNEED is not None:  # the file stays cached; our RSS does not grow
                mm.madvise(_DONTNEED)
                self.walked = 0
            if flags == LEAF:
                on_leaf(off, end, count, where, pgid)
            elif flags == BRANCH:
                stack.extend(self._branch(off, end, count, where, pgid))
            else:
                raise self.fail(f"corrupt: {self._at(where, pgid)} has page type {flags:#x}, "
                                f"not a branch or leaf page")

    def _branch(self, off: int, end: int, count: int, where: str, pgid: int) -> list[int]:
        """The children of a branch page, last first (for the walk's stack)."""
        base = off + PAGE_HEADER
        top = base + ELEMENT * count
        if count == 0:
            raise self.fail(f"corrupt: {self._at(where, pgid)} is an empty branch page")
        if top > end:
            raise self.fail(f"corrupt: {self._at(where, pgid)}: {count:,} elements do not fit in the page")
        children = []
        addr = base
        for pos, ksize, child in _BRANCH.iter_unpack(self.mv[base:top]):
            if addr + pos + ksize > end:
                raise self._overrun(where, pgid, (addr - base) // ELEMENT)
            children.append(child)
            addr += ELEMENT
        children.reverse()
        return children

    def _overrun(self, where: str, pgid: int, index: int) -> SnapshotError:
        return self.fail(f"corrupt: {self._at(where, pgid)}: element {index} runs past the end of its page")

    def _elements(self, off: int, end: int, count: int, where: str, pgid: int) -> memoryview:
        top = off + PAGE_HEADER + ELEMENT * count
        if top > end:
            raise self.fail(f"corrupt: {self._at(where, pgid)}: {count:,} elements do not fit in the page")
        return self.mv[off + PAGE_HEADER:top]

    def _bucket(self, voff: int, vlen: int, where: str, on_leaf: _OnLeaf, *, nested: bool = False) -> None:
        """Visit the bucket whose header is the value at voff: its inline page or its page tree.

        bolt's check skips inline buckets, and nothing else opens a nested
        one: so a nested inline bucket is not read past its header.
        """
        if vlen < BUCKET_HEADER:
            raise self.fail(f"corrupt: {where}: bucket value of {vlen} bytes is shorter than a bucket header")
        root = _U64.unpack_from(self.mm, voff)[0]
        if root != 0:
            self._walk(root, where, on_leaf)
        elif not nested:
            off, end = voff + BUCKET_HEADER, voff + vlen
            if off + PAGE_HEADER > end:
                raise self.fail(f"corrupt: {where}: inline bucket value of {vlen} bytes has no page")
            _id, flags, count, _overflow = _PAGE.unpack_from(self.mm, off)
            if flags != LEAF:
                raise self.fail(f"corrupt: {where}: inline bucket page has type {flags:#x}, not a leaf page")
            self._spend(count)
            on_leaf(off, end, count, where, 0)

    # -- buckets ------------------------------------------------------------

    def _hash_buckets(self, root: int) -> None:
        """etcdutl's loop: each top-level bucket's name, then its keys and values."""
        top: list[tuple[int, int, int, int]] = []

        def collect(off: int, end: int, count: int, where: str, pgid: int) -> None:
            top.extend(self._leaf_elements(off, end, count, where, pgid))

        self._walk(root, "the root bucket", collect)
        for flags, k, ksize, vsize in top:
            name = self.mm[k:k + ksize]
            where = f"bucket {name.decode('utf-8', 'replace')!r}"
            if not flags & BUCKET_LEAF_FLAG:
                raise self.fail(f"corrupt: the root bucket holds a plain key {name!r}, not a bucket "
                                f"(etcdutl: cannot get hash of bucket)")
            self.crc = _crc32c(name, self.crc)
            on_leaf = {KEY_BUCKET: self._leaf_key, META_BUCKET: self._leaf_meta}.get(name, self._leaf)
            self._bucket(k + ksize, vsize, where, on_leaf)

    def _leaf(self, off: int, end: int, count: int, where: str, pgid: int) -> None:
        """Hash a leaf's keys and values; bolt writes them back to back, so a run hashes in one call.
        A nested bucket gives its key only (bolt's nil value); page-based ones are queued for the check."""
        mv, crc = self.mv, self.crc
        addr = off + PAGE_HEADER
        rs = re = 0
        for flags, pos, ksize, vsize in _LEAF.iter_unpack(self._elements(off, end, count, where, pgid)):
            k = addr + pos
            e = k + ksize + vsize
            if e > end:
                raise self._overrun(where, pgid, (addr - off - PAGE_HEADER) // ELEMENT)
            if flags & BUCKET_LEAF_FLAG:
                if re > rs:
                    crc = _crc32c(mv[rs:re], crc)
                crc = _crc32c(mv[k:k + ksize], crc)
                rs = re = 0
                if pgid:  # bolt's check skips inline buckets, and what they hold
                    self.nested.append((self._at(where, pgid), k + ksize, vsize))
            elif k != re:
                if re > rs:
                    crc = _crc32c(mv[rs:re], crc)
                rs, re = k, e
            else:
                re = e
            addr += ELEMENT
        if re > rs:
            crc = _crc32c(mv[rs:re], crc)
        self.crc = crc
        self.total_keys += count

    def _leaf_meta(self, off: int, end: int, count: int, where: str, pgid: int) -> None:
        """Bucket "meta": _leaf's hashing, and the storage version etcd 3.6 keeps there (etcdutl 3.6 reads it
        as a semantic version, and shows nothing for a value that is not one)."""
        self._leaf(off, end, count, where, pgid)
        for flags, k, ksize, vsize in self._leaf_elements(off, end, count, where, pgid):
            if not flags & BUCKET_LEAF_FLAG and self.mm[k:k + ksize] == STORAGE_VERSION_KEY:
                value = self.mm[k + ksize:k + ksize + vsize]
                self.storage_version = value.decode() if _SEMVER.fullmatch(value) else ""

    def _leaf_key(self, off: int, end: int, count: int, where: str, pgid: int) -> None:
        """Bucket "key": _leaf's hashing, plus each revision's user key and tombstone mark.

        One pass with everything in locals, reading a one-page leaf from a
        bytes copy (indexing bytes is cheaper than indexing the map): this
        bucket holds nearly all of a snapshot's keys.
        """
        mv, crc, live = self.mv, self.crc, self.live
        rev_min, tomb_len, tomb_mark = REVISION_KEY_MIN, TOMBSTONE_KEY_LEN, TOMBSTONE_MARK
        # buf[i] is the file's byte base + i.
        base, buf = (off, self.mm[off:end]) if end - off <= self.page_size else (0, self.mm)
        addr = off - base + PAGE_HEADER
        top = addr + ELEMENT * count
        stop = end - base
        if top > stop:
            raise self.fail(f"corrupt: {self._at(where, pgid)}: {count:,} elements do not fit in the page")
        first = addr
        rs = re = k = 0
        for flags, pos, ksize, vsize in _LEAF.iter_unpack(buf[addr:top]):
            k = addr + pos
            v = k + ksize
            e = v + vsize
            if e > stop or ksize < rev_min:
                raise self._bad_revision(where, pgid, (addr - first) // ELEMENT, e > stop, ksize)
            addr += ELEMENT
            if flags & BUCKET_LEAF_FLAG:  # a nested bucket, as in _leaf; not a revision, so no user key
                if re > rs:
                    crc = _crc32c(mv[base + rs:base + re], crc)
                crc = _crc32c(mv[base + k:base + v], crc)
                rs = re = 0
                if pgid:
                    self.nested.append((self._at(where, pgid), base + v, vsize))
                continue
            if k != re:
                if re > rs:
                    crc = _crc32c(mv[base + rs:base + re], crc)
                rs = k
            re = e
            # The KeyValue's field 1 (key), which gogo-proto writes first; else parse it properly.
            if vsize > 1 and buf[v] == 0x0A and (n := buf[v + 1]) < vsize - 1:
                user_key = buf[v + 2:v + 2 + n]
            else:
                user_key = self._user_key(base + v, base + e, where, pgid)
            live[user_key] = ksize != tomb_len or buf[k + 17] != tomb_mark
        if re > rs:
            crc = _crc32c(mv[base + rs:base + re], crc)
        self.crc = crc
        self.total_keys += count
        if count:
            self.last_key = base + k

    def _bad_revision(self, where: str, pgid: int, index: int, overrun: bool, ksize: int) -> SnapshotError:
        if overrun:
            return self._overrun(where, pgid, index)
        return self.fail(f"corrupt: {self._at(where, pgid)}: key {index} has {ksize} bytes, not an etcd "
                         f"revision (17 or 18 bytes)")

    def _user_key(self, p: int, end: int, where: str, pgid: int) -> bytes:
        """Field 1 (key) of the mvccpb.KeyValue in [p, end), in any field order and length encoding."""
        mm = self.mm

        def bad(why: str) -> SnapshotError:
            return self.fail(f"corrupt: {self._at(where, pgid)}: a value is not an etcd KeyValue ({why})")

        def varint(p: int) -> tuple[int, int]:
            value = shift = 0
            while True:
                if p >= end or shift > 63:
                    raise bad("bad varint")
                b = mm[p]
                value |= (b & 0x7F) << shift
                p += 1
                if b < 0x80:
                    return value, p
                shift += 7

        while p < end:
            tag, p = varint(p)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, p = varint(p)
            elif wire == 2:
                n, p = varint(p)
                if p + n > end:
                    raise bad("a field runs past the value's end")
                if field == 1:
                    return mm[p:p + n]
                p += n
            elif wire in (1, 5):
                p += 8 if wire == 1 else 4
            else:
                raise bad(f"wire type {wire}")
        if p > end:
            raise bad("a field runs past the value's end")
        return b""

    def _check_nested(self) -> None:
        """Nested buckets are not hashed, but bolt's check walks their pages: so do we."""
        while self.nested:
            where, voff, vsize = self.nested.pop()
            self._bucket(voff, vsize, f"{where}: nested bucket", self._leaf_check, nested=True)

    def _leaf_check(self, off: int, end: int, count: int, where: str, pgid: int) -> None:
        for flags, k, ksize, vsize in self._leaf_elements(off, end, count, where, pgid):
            if flags & BUCKET_LEAF_FLAG:
                self.nested.append((self._at(where, pgid), k + ksize, vsize))

    def _leaf_elements(self, off: int, end: int, count: int, where: str,
                       pgid: int) -> Iterator[tuple[int, int, int, int]]:
        """(flags, key offset, key size, value size) of a leaf page's elements, bounds-checked.
        For the few pages outside the hot loop (the root bucket's, nested buckets')."""
        addr = off + PAGE_HEADER
        for i, (flags, pos, ksize, vsize) in enumerate(_LEAF.iter_unpack(self._elements(off, end, count,
                                                                                          where, pgid))):
            k = addr + pos
            if k + ksize + vsize > end:
                raise self._overrun(where, pgid, i)
            yield flags, k, ksize, vsize
            addr += ELEMENT


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
