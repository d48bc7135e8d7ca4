"""Snapshot SAVE and everything around it, against real etcd, the real bot and the Slack stand-in.

What is checked: the file a save leaves (name, mode, sha256 trailer, status),
that a broken save leaves nothing (member killed or silent mid-stream, disk
full), age encryption without a named plaintext file, retention, the Slack
messages of `/etcd snapshot` and `/etcd snapshots`, the schedule, and the
CLI. Whether `snapshot status` equals etcdutl's in every corner is
tests/test_bbolt.py's subject; here one comparison is made.

No mocks of etcd or bolt: clusters are real etcd processes (LocalCluster);
every wait polls with a deadline.

A file is named `<cluster>-<UTC second>-rev<revision>.db`, so two snapshots of
an idle cluster taken within the same second share a name and the second one
fails ("... exists already; nothing was overwritten"). Tests that take several
snapshots in a row therefore write a key between them.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import random
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from bot.config import ConfigError, load_config
from bot.domain.snapshot import SnapshotError, SnapshotFailed, SnapshotRecord
from bot.etcd.bbolt import snapshot_status
from bot.etcd.client import SNAPSHOT_IDLE_TIMEOUT, EtcdClient
from bot.etcd.health import check_cluster
from bot.etcd.snapshot_stream import CIPHER_BATCH, TRAILER, TrailerCheck, _Encryptor, save_snapshot, to_prune
from bot.ops.snapshots import take_snapshot
from bot.runtime.schedule import RETRY_AFTER_FAILURE, SCHEDULER, Scheduler, is_due
from bot.testing.clock import ManualClock
from bot.testing.cluster import LocalCluster
from bot.testing.workspace import CHANNEL, LEAD, ONCALL, cluster_table, write_config
from helpers import advance_until, command, eventually, must, reply, snapshot_record, text_of
from snapshot_fixtures import etcdutl_status, etcdutl_table

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB = 1 << 10, 1 << 20
NAME = re.compile(r"^(?P<cluster>[A-Za-z0-9_.-]+)-(?P<when>\d{8}T\d{6}Z)-rev(?P<rev>\d+)\.db$")


def revision_of(path: Path) -> int:
    """The revision a snapshot's file name carries."""
    return int(must(NAME.match(path.name))["rev"])
OTHER_CHANNEL = "C0ELSEWHERE"


# ---------------------------------------------------------------- helpers

async def fill(cluster: LocalCluster, count: int, value_size: int = MiB, seed: int = 0,
               endpoints: list[str] | None = None) -> list[bytes]:
    """Write `count` random values of `value_size` bytes (8 puts at a time, through `endpoints`, default
    every member's); returns the values."""
    rng = random.Random(seed)
    values = [rng.randbytes(value_size) for _ in range(count)]
    gate = asyncio.Semaphore(8)

    async def put(i: int) -> None:
        async with gate:
            await client.put(f"/fill/{i:05d}".encode(), values[i], timeout=30)

    async with EtcdClient(endpoints or cluster.endpoints) as client:
        await asyncio.gather(*(put(i) for i in range(count)))
    return values


def files_under(path: Path) -> list[str]:
    """Every file below `path`, relative, sorted (directories themselves are not listed)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


def assert_trailer(data: bytes) -> None:
    """etcd's framing, as etcdctl checks it: size % 512 == 32 and sha256(all before) == the last 32 bytes."""
    assert len(data) % 512 == TRAILER, f"size {len(data)} % 512 is {len(data) % 512}"
    assert hashlib.sha256(data[:-TRAILER]).digest() == data[-TRAILER:], "sha256 trailer does not match"


def assert_one_line(text: str) -> None:
    assert text.strip(), "empty message"
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    assert "Traceback" not in text


def member_name(cluster: LocalCluster, endpoint: str) -> str:
    return next(name for name, m in cluster.members.items() if m.client_url == endpoint)


def leader_name(cluster: LocalCluster) -> str:
    """The leader as etcd itself reports it (`etcdctl endpoint status`)."""
    out = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json").stdout)
    leaders = {e["Status"]["leader"] for e in out}
    assert len(leaders) == 1, f"members disagree on the leader: {out}"
    leader = leaders.pop()
    endpoint = next(e["Endpoint"] for e in out if e["Status"]["header"]["member_id"] == leader)
    return member_name(cluster, endpoint)


async def wait_for_growing_part(directory: Path, save: asyncio.Task | None, at_least: int = 2 * MiB,
                                timeout: float = 60.0) -> int:
    """Poll until a `.part` file in `directory` exists and has grown past `at_least`
    bytes (seen at two different sizes); returns its size. The save (when given; the
    bot's own otherwise) must still run."""
    sizes: set[int] = set()

    def grown() -> int | None:
        if save is not None and save.done():
            outcome = save.exception() or save.result()
            raise AssertionError(f"the save ended before the .part file grew past {at_least:,} bytes "
                                 f"(sizes seen {sorted(sizes)}): {outcome!r}; make the database bigger")
        parts = list(directory.glob("*.part")) if directory.is_dir() else []
        if parts:
            try:
                size = parts[0].stat().st_size
            except FileNotFoundError:
                size = 0
            sizes.add(size)
            if size >= at_least and len(sizes) >= 2:
                return size
        return None

    return await eventually(grown, timeout, f"a growing .part file in {directory}", interval=0.001)


@contextlib.asynccontextmanager
async def in_background(coro):
    """Run `coro` as a task; on the way out (a failed assertion too) it is cancelled if still running."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class IdleTimeoutClient(EtcdClient):
    """An EtcdClient whose snapshot streams give up after `idle_timeout` seconds of silence.

    save_snapshot has no idle_timeout parameter: it opens the stream with
    EtcdClient.snapshot's default (bot.etcd.SNAPSHOT_IDLE_TIMEOUT, 30 s), so the
    test lowers it where the stream is opened; everything else is the real client.
    """

    def __init__(self, endpoints: list[str], idle_timeout: float, **kwargs):
        super().__init__(endpoints, **kwargs)
        self.idle_timeout = idle_timeout

    async def snapshot(self, endpoint: str, idle_timeout: float = SNAPSHOT_IDLE_TIMEOUT):
        return await super().snapshot(endpoint, idle_timeout=self.idle_timeout)


# ---------------------------------------------------------------- 1. a save against a real cluster

async def test_save_names_protects_and_verifies_the_file(make_cluster, tmp_path):
    c = make_cluster(1)
    c.etcdctl("put", "/registry/a", "1")
    c.etcdctl("put", "/registry/b", "2")
    c.etcdctl("put", "/registry/a", "3")
    c.etcdctl("del", "/registry/b")
    endpoint = c.endpoints[0]
    async with EtcdClient(c.endpoints) as client:
        saved = await save_snapshot(client, endpoint, "member1", tmp_path, "prod")

    target = tmp_path / "prod"
    assert saved.path.parent == target and saved.cluster == "prod"
    assert saved.member == "member1" and saved.endpoint == endpoint and not saved.encrypted
    m = NAME.match(saved.path.name)
    assert m, saved.path.name
    assert m["cluster"] == "prod"
    assert m["when"] == dt.datetime.fromtimestamp(saved.created_at, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    status = snapshot_status(saved.path)
    assert int(m["rev"]) == status.revision == saved.status.revision == 5  # 4 writes after the initial revision 1
    assert status == saved.status and status.has_trailer

    assert stat.S_IMODE(saved.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700

    data = saved.path.read_bytes()
    assert_trailer(data)
    assert saved.file_size == len(data)
    assert saved.sha256 == hashlib.sha256(data).hexdigest()
    assert saved.duration > 0 and saved.throughput > 0

    theirs = etcdutl_status(saved.path)
    assert (status.hash, status.revision, status.total_keys, status.total_size) == \
        (theirs["hash"], theirs["revision"], theirs["totalKey"], theirs["totalSize"])

    assert files_under(tmp_path) == [f"prod/{saved.path.name}"]  # no .part left behind


def _chunkings(data: bytes) -> dict[str, list[bytes]]:
    rng = random.Random(5)
    cuts, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 5, 31, 32, 33, 100, 4096])
        cuts.append(data[pos:pos + step])
        pos += step
    return {"whole": [data], "32 KiB": [data[i:i + 32 * KiB] for i in range(0, len(data), 32 * KiB)],
            "odd sizes": cuts, "bytes": [data[i:i + 1] for i in range(len(data) - 200, len(data))]}


@pytest.mark.parametrize("chunking", ["whole", "32 KiB", "odd sizes", "bytes"])
def test_trailer_check_any_chunking(chunking):
    body = random.Random(4).randbytes(3 * 512 * 97)
    good = body + hashlib.sha256(body).digest()
    chunks = _chunkings(good)[chunking]
    if chunking == "bytes":  # the head in one piece, the last 200 bytes one at a time
        chunks = [good[:-200]] + chunks
    check = TrailerCheck()
    for chunk in chunks:
        check.update(chunk)
    check.verify()
    assert check.size == len(good)
    assert check.file_sha256() == hashlib.sha256(good).hexdigest()  # the whole file's, trailer included

    for bad, why in ((body[:-1] + b"x" + hashlib.sha256(body).digest(), "does not match"),
                     (good[:-512], "does not match"),
                     (good[:-1], "without etcd's sha256 trailer")):
        check = TrailerCheck()
        for chunk in _chunkings(bad)["odd sizes"]:
            check.update(chunk)
        with pytest.raises(SnapshotFailed, match=why):
            check.verify()


# ---------------------------------------------------------------- 2. the source member dies or falls silent

async def test_member_killed_mid_stream_leaves_no_file(make_cluster, tmp_path):
    c = make_cluster(1)
    await fill(c, 60)  # ~64 MB: the stream lasts long enough to be cut
    target = tmp_path / "prod"
    async with EtcdClient(c.endpoints) as client, \
            in_background(save_snapshot(client, c.endpoints[0], "member1", tmp_path, "prod")) as save:
        seen = await wait_for_growing_part(target, save)
        # Called in the event loop on purpose: the stream cannot be read to its end while the kill runs.
        c.kill("member1")
        killed = time.monotonic()
        with pytest.raises(SnapshotFailed) as failed:
            await asyncio.wait_for(save, 60)
        elapsed = time.monotonic() - killed
    message = str(failed.value)
    assert_one_line(message)
    assert "member1" in message and "broke after" in message, message
    broke_after = int(must(re.search(r"broke after ([\d,]+) bytes", message))[1].replace(",", ""))
    assert seen <= broke_after < 60 * MiB
    assert elapsed < SNAPSHOT_IDLE_TIMEOUT / 3, f"a killed member should fail the save at once, took {elapsed:.1f}s"
    assert files_under(tmp_path) == [], "no .part and no final file may be left"


async def test_member_cut_off_mid_stream_hits_the_idle_timeout_and_leaves_no_file(make_bed, tmp_path):
    c = make_bed(1)
    await fill(c, 60)
    target = tmp_path / "prod"
    idle = 1.0
    async with IdleTimeoutClient(c.endpoints, idle_timeout=idle) as client, \
            in_background(save_snapshot(client, c.endpoints[0], "member1", tmp_path, "prod")) as save:
        await wait_for_growing_part(target, save)
        c.cut_from_bot("member1")  # its host drops off the bot's network: the connection stays open, nothing arrives
        paused = time.monotonic()
        with pytest.raises(SnapshotFailed) as failed:
            await asyncio.wait_for(save, 30)
        elapsed = time.monotonic() - paused
    message = str(failed.value)
    assert_one_line(message)
    assert "member1" in message and "silent for 1s" in message, message
    assert idle <= elapsed < idle + 10, elapsed
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------- 3. disk full

# Runs a command with RLIMIT_FSIZE lowered (its writes past the limit fail with EFBIG) and
# SIGXFSZ ignored (otherwise the kernel kills the process instead); both survive exec.
FSIZE_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.parametrize("case", ["plain", "encrypted, plaintext too big", "encrypted, ciphertext too big"])
async def test_disk_full_is_named_and_leaves_no_file(make_cluster, tmp_path, case):
    c = make_cluster(1)
    await fill(c, 4)
    recipients: list[str] = []
    limit = 1 * MiB  # the stream (~4 MB) cannot be written
    if case != "plain":
        recipients = [str(x25519.Identity.generate().to_public())]
    if case == "encrypted, ciphertext too big":
        # The plaintext (in the unnamed temporary file) fits; the age file, a little bigger, does not.
        async with EtcdClient(c.endpoints) as client:
            plain = await save_snapshot(client, c.endpoints[0], "member1", tmp_path / "probe", "prod")
        limit = plain.file_size + 256
    snaps = tmp_path / "snaps"
    argv = [sys.executable, "-c", FSIZE_LIMITED, str(limit), sys.executable, "-m", "bot", "snapshot", "save",
            "--endpoints", c.endpoints[0], "--dir", str(snaps), "--name", "prod"]
    argv += [a for r in recipients for a in ("--age-recipient", r)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert_one_line(proc.stderr)
    assert "File too large" in proc.stderr and "nothing was kept" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert files_under(snaps) == [], "no partial file may be left"


async def test_a_full_disk_under_the_encryption_is_named_as_the_disk_not_as_age() -> None:
    """Which file of an encrypted save fills the disk first is a race between two threads. When it is the age
    file while age encrypts, pyrage wraps our OSError in its EncryptError, and the CLI printed a traceback
    (a run beside a busy CPU). The encryption stage gives back the disk's own error, which is named in one line."""
    out = os.open("/dev/full", os.O_WRONLY)   # every write: ENOSPC
    try:
        stage = _Encryptor(out, (str(x25519.Identity.generate().to_public()),), None).start()
        for _ in range(3):
            await stage.put(os.urandom(CIPHER_BATCH))
        error = await stage.finish()
    finally:
        os.close(out)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)


# ---------------------------------------------------------------- 4. encryption

async def test_encrypted_save_round_trips_and_never_names_the_plaintext(make_cluster, tmp_path):
    c = make_cluster(1)
    await fill(c, 8)  # a few MB: the save lasts long enough to be watched while it runs
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    snaps = tmp_path / "snaps"
    target = snaps / "prod"
    names_seen: set[str] = set()
    fds_seen: set[str] = set()  # what this process's open files under the snapshot dir are called

    async with EtcdClient(c.endpoints) as client, \
            in_background(save_snapshot(client, c.endpoints[0], "member1", snaps, "prod", (recipient,))) as save:
        def watch() -> bool:
            """Record what the snapshot directory and our open files are called, until the save ends."""
            if save.done():
                return True
            if target.is_dir():
                names_seen.update(p.name for p in target.iterdir())
            for fd in os.listdir("/proc/self/fd"):
                try:
                    link = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if link.startswith(f"{target}/"):
                    fds_seen.add(link)
            return False

        await eventually(watch, 60, "the encrypted save to finish", interval=0.001)
        saved = save.result()

    # While it ran: the plaintext was an unnamed (O_TMPFILE) file; only the age file had a name.
    assert any(link.endswith(" (deleted)") for link in fds_seen), f"plaintext file never seen open: {fds_seen}"
    assert all(link.endswith((" (deleted)", ".db.age.part")) for link in fds_seen), fds_seen
    assert names_seen and all(n.endswith((".db.age.part", ".db.age")) for n in names_seen), names_seen
    # After: one file, encrypted, nothing else.
    assert saved.encrypted and saved.path.name.endswith(".db.age")
    m = NAME.match(saved.path.name.removesuffix(".age"))
    assert m and int(m["rev"]) == saved.status.revision
    assert files_under(snaps) == [f"prod/{saved.path.name}"]
    assert not list(snaps.rglob("*.db")) and not list(snaps.rglob("*.part"))
    assert stat.S_IMODE(saved.path.stat().st_mode) == 0o600

    data = saved.path.read_bytes()
    assert data.startswith(b"age-encryption.org/v1\n")
    assert saved.sha256 == hashlib.sha256(data).hexdigest() and saved.file_size == len(data)
    with pytest.raises(SnapshotError):
        snapshot_status(saved.path)  # not a bbolt file

    plain = pyrage.decrypt(data, [identity])
    assert_trailer(plain)
    copy = tmp_path / "decrypted.db"  # outside the snapshot directory
    copy.write_bytes(plain)
    assert snapshot_status(copy) == saved.status


def test_config_rejects_a_bad_age_recipient_naming_the_key(cluster, tmp_path):
    good = str(x25519.Identity.generate().to_public())
    path = write_config(tmp_path, [cluster_table("prod", cluster, snapshots={"age_recipients": [good, "age1nope"]})])
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert_one_line(str(e.value))
    assert "clusters[0].snapshots.age_recipients[1]" in str(e.value) and "age" in str(e.value)

    path = write_config(tmp_path, [cluster_table("prod", cluster)], snapshots={"age_recipients": ["ssh-ed25519 AAAA"]})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert_one_line(str(e.value))
    assert "snapshots.age_recipients[0]" in str(e.value)

    config = load_config(write_config(tmp_path, [cluster_table("prod", cluster, snapshots={"age_recipients": [good]})]))
    assert config.clusters[0].snapshots.age_recipients == (good,)


# ---------------------------------------------------------------- 5. retention

DAY = 86400.0
NOW = 2_000_000_000.0


def _rows(*ages_in_days: float) -> list[SnapshotRecord]:
    rows = [snapshot_record(id=i + 1, created_at=NOW - age * DAY) for i, age in enumerate(ages_in_days)]
    random.Random(7).shuffle(rows)  # the order given does not matter
    return rows


def _ids(rows: list[SnapshotRecord]) -> set[int]:
    return {r.id for r in rows}


def test_to_prune_keep_last_only():
    rows = _rows(5, 4, 3, 2, 1)  # id 5 is the newest
    assert _ids(to_prune(rows, keep_last=2, keep_days=None, now=NOW)) == {1, 2, 3}
    assert to_prune(rows, keep_last=5, keep_days=None, now=NOW) == []
    assert to_prune(rows, keep_last=9, keep_days=None, now=NOW) == []
    same_time = [snapshot_record(id=i, created_at=NOW) for i in (1, 2, 3)]
    assert _ids(to_prune(same_time, keep_last=1, keep_days=None, now=NOW)) == {1, 2}  # ties: the higher id is newer


def test_to_prune_keep_days_only():
    rows = _rows(10, 8, 3, 1, 0)
    assert _ids(to_prune(rows, keep_last=None, keep_days=7, now=NOW)) == {1, 2}
    assert _ids(to_prune(rows, keep_last=None, keep_days=0.5, now=NOW)) == {1, 2, 3, 4}
    # Even the newest goes when it is older than keep_days and no count rule keeps it.
    assert _ids(to_prune(_rows(9, 8), keep_last=None, keep_days=7, now=NOW)) == {1, 2}


def test_to_prune_both_rules_keep_what_either_keeps():
    rows = _rows(10, 8, 5, 1)  # ids 1..4, oldest first
    # keep_last=3 keeps ids 4, 3, 2 (the 8-day-old one, though keep_days would drop it); keep_days keeps id 4.
    assert _ids(to_prune(rows, keep_last=3, keep_days=2, now=NOW)) == {1}
    # keep_last=1 keeps id 4; keep_days=7 keeps ids 3 and 4.
    assert _ids(to_prune(rows, keep_last=1, keep_days=7, now=NOW)) == {1, 2}


def test_to_prune_keeps_plan_snapshots_for_keep_plan_days_whatever_the_rules_say():
    rows = [dataclasses.replace(row, plan_id=f"plan-{row.id}") if row.id in (1, 2, 3) else row
            for row in _rows(40, 20, 10, 5, 1)]  # ids 1..5, oldest first
    # keep_last=1 and keep_days=2 alone keep only id 5; the plan snapshots younger than 30 days stay.
    assert _ids(to_prune(rows, keep_last=1, keep_days=2, now=NOW)) == {1, 4}
    assert _ids(to_prune(rows, keep_last=1, keep_days=None, now=NOW, keep_plan_days=15)) == {1, 2, 4}
    # The snapshot of a plan still open is kept however old it is.
    assert _ids(to_prune(rows, keep_last=1, keep_days=None, now=NOW, keep_plan_days=15, open_plan="plan-1")) == {2, 4}
    # Without retention rules nothing is pruned, plan snapshots or not.
    assert to_prune(rows, keep_last=None, keep_days=None, now=NOW, keep_plan_days=1) == []


def test_to_prune_without_rules_prunes_nothing():
    assert to_prune(_rows(400, 300, 1), keep_last=None, keep_days=None, now=NOW) == []
    assert to_prune([], keep_last=1, keep_days=1, now=NOW) == []


async def test_keep_last_prunes_the_oldest_file_row_and_listing(make_cluster, slack, start_bot, tmp_path):
    c = make_cluster(1)
    bot = await start_bot([cluster_table("prod", c, snapshots={"keep_last": 2})])
    store = bot.ctx.store
    snap_dir = tmp_path / "snapshots" / "prod"
    for i in range(3):
        c.etcdctl("put", f"/k/{i}", "v")  # a new revision each time: each snapshot has its own name (see above)
        msg = await reply(slack, "snapshot", timeout=60)
        assert "verified" in text_of(msg), text_of(msg)

    rows = await store.snapshots("prod", limit=10, include_pruned=True)  # newest first
    assert len(rows) == 3
    oldest, kept = rows[-1], rows[:2]
    assert oldest.pruned_at is not None and not Path(oldest.path).exists()
    for row in kept:
        assert row.pruned_at is None and Path(row.path).is_file()
    assert sorted(os.listdir(snap_dir)) == sorted(Path(r.path).name for r in kept)

    pruned = [r for r in await store.audit_rows() if r.action == "snapshot_pruned"]
    assert len(pruned) == 1
    detail = json.loads(pruned[0].detail)
    assert pruned[0].cluster == "prod"
    assert detail["id"] == oldest.id and detail["file"] == Path(oldest.path).name and detail["keep_last"] == 2

    listing = text_of(await reply(slack, "snapshots"))
    for row in kept:
        assert Path(row.path).name in listing
    assert Path(oldest.path).name not in listing


async def test_one_snapshot_at_a_time_the_second_request_joins_and_plan_snapshots_survive_retention(
        make_cluster, slack, start_bot, tmp_path):
    c = make_cluster(1)
    await fill(c, 24)  # a stream long enough to catch it running
    bot = await start_bot([cluster_table("prod", c, snapshots={"keep_last": 1})])
    store, prod = bot.ctx.store, bot.ctx.config.cluster("prod")
    snap_dir = tmp_path / "snapshots" / "prod"
    start = len(slack.messages)

    async def joined(n: int) -> None:
        deadline = time.monotonic() + 20
        while len([r for r in await store.audit_rows() if r.action == "snapshot_joined"]) < n:
            assert time.monotonic() < deadline, f"{n} request(s) did not join the running snapshot"
            await asyncio.sleep(0.02)

    await command(slack, "snapshot", user=ONCALL)
    await wait_for_growing_part(snap_dir, None)
    c.pause("member1")  # the first snapshot is held mid-stream until both others have joined it
    try:
        await command(slack, "snapshot", user=LEAD)
        notice = await slack.wait_for_message(lambda m: m.ephemeral_to == LEAD, after=start, timeout=20,
                                              what="the notice that a snapshot is already running")
        plan_step = asyncio.create_task(take_snapshot(bot.ctx, prod, requested_by=LEAD, reason="before plan p1",
                                                      plan_id="p1"))
        await joined(2)
    finally:
        c.resume("member1")
    assert re.search(rf"^a snapshot of prod is already running, started by <@{ONCALL}> at \d\d:\d\d:\d\d UTC; "
                     "you will get its result$", notice.text), notice.text
    assert "no healthy member" not in text_of(notice)

    first = await slack.wait_for_message(lambda m: m.source == "chat.postMessage" and m.channel == CHANNEL,
                                         after=start, timeout=60, what="the snapshot result in the channel")
    second = await slack.wait_for_message(lambda m: m.ephemeral_to == LEAD and "verified" in text_of(m),
                                          after=start, timeout=60, what="the result for the second request")
    saved = await asyncio.wait_for(plan_step, 60)
    (row,) = await store.snapshots("prod", include_pruned=True)  # one stream, one file, one row
    name = Path(row.path).name
    assert files_under(snap_dir) == [name] and saved.path.name == name
    assert name in text_of(first) and name in text_of(second) and f"<@{ONCALL}>" in text_of(second)
    assert row.requested_by == ONCALL and row.plan_id == "p1"
    assert [m for m in slack.messages[start:] if m.source == "chat.postMessage"] == [first], "posted once"

    # It is the plan's pre-change snapshot: keep_last = 1 does not delete it; the next one goes.
    for i in range(2):
        c.etcdctl("put", f"/after/{i}", "v")
        assert "verified" in text_of(await reply(slack, "snapshot", timeout=60))
    kept = [r for r in await store.snapshots("prod", include_pruned=True) if r.pruned_at is None]
    assert len(kept) == 2 and kept[1].id == row.id and Path(row.path).is_file()
    assert len(files_under(snap_dir)) == 2


# ---------------------------------------------------------------- 6. the message of /etcd snapshot

async def test_snapshot_message_has_the_facts_and_nothing_is_uploaded(make_cluster, slack, start_bot):
    c = make_cluster(3)
    values = await fill(c, 8, value_size=256 * KiB, seed=6)  # a 2+ MB file, 100 times the size bound below
    leader = leader_name(c)
    bot = await start_bot([cluster_table("prod", c)])

    msg = await reply(slack, "snapshot", timeout=60)
    text = text_of(msg)
    (row,) = await bot.ctx.store.snapshots("prod")
    path = Path(row.path)
    data = path.read_bytes()

    assert leader_name(c) == leader, "the leader changed during the test"
    source = re.search(r"\*Source:\* (\S+) \((\S+)\)", text)
    assert source, text
    assert source[1] in c.members and source[1] != leader, f"source {source[1]}, leader {leader}"
    assert source[2] == c.members[source[1]].client_url
    assert msg.channel == CHANNEL and msg.ephemeral_to is None
    assert "Snapshot of prod" in text and "verified" in text
    assert etcdutl_table(path).rstrip("\n") in text  # HASH / REVISION / TOTAL KEYS / TOTAL SIZE, etcdutl's values
    assert path.name in text
    assert hashlib.sha256(data).hexdigest() in text
    assert re.search(r"took \d+(\.\d+)? (ms|s|min \d+ s) \(\d+\.\d MiB/s\)", text), text
    assert f"asked by <@{ONCALL}>" in text

    # The snapshot never goes to Slack: no upload method, no big argument, none of its bytes.
    assert not [call.method for call in slack.calls if call.method.startswith("files.")]
    big = [(call.method, len(json.dumps(call.args))) for call in slack.calls if len(json.dumps(call.args)) > 20_000]
    assert not big, big
    posted = [json.dumps({"text": m.text, "blocks": m.blocks}) for m in slack.messages]
    assert all(len(p) <= 20_000 for p in posted)
    everything = "\n".join([json.dumps(call.args) for call in slack.calls] + posted)
    for v in values:
        piece = v[1000:1024]
        assert piece in data  # a piece of the snapshot ...
        assert piece.hex() not in everything and base64.b64encode(piece).decode()[:-4] not in everything  # ... not sent


async def test_a_snapshot_holds_every_write_acknowledged_before_it_was_asked_for(make_cluster, slack, start_bot):
    """A write is acknowledged once a quorum has it, and the bot snapshots a follower, which may still be
    applying it. The follower here was paused through 200 writes of 100 KiB and resumed just before the
    request: without waiting for it to catch up, its snapshot held revision 14 to 53 of 201 (6 runs of 6)."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)])
    async with EtcdClient(c.endpoints) as client:
        health = await check_cluster(client, "prod")
    source = must(health.snapshot_source())  # the member the bot will take the snapshot from
    others = [m.client_url for name, m in c.members.items() if name != source.member.name]
    c.pause(source.member.name)
    try:
        await fill(c, 200, value_size=100 * KiB, endpoints=others)
        async with EtcdClient(others) as client:
            last = await client.revision(others[0], linearizable=True)  # the revision of the last write
    finally:
        c.resume(source.member.name)

    msg = await reply(slack, "snapshot", timeout=60)
    assert f"*Source:* {source.member.name} " in text_of(msg)
    (row,) = await bot.ctx.store.snapshots("prod")
    assert row.revision >= last and snapshot_status(row.path).revision >= last, (row.revision, last)
    assert str(row.revision) in text_of(msg)


async def test_a_snapshot_right_after_the_leader_died_comes_from_the_first_follower(make_cluster, slack, start_bot):
    """Until the survivors elect a new leader they still name the dead one, and a read that waits for the
    leader's commit index fails ("leader changed") or waits out its deadline. The snapshot does not wait
    for a leader its health check saw dead: it is taken from the first follower, as before the wait existed
    (with the wait, the source "failed" and the bot tried the other member; a plan's pre-change snapshot
    failed so in a run beside a busy CPU)."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)])
    leader = leader_name(c)
    c.kill(leader)
    msg = await reply(slack, "snapshot", timeout=60)
    assert msg.text.startswith("Snapshot of prod"), msg.text
    assert "stopped answering" not in text_of(msg), text_of(msg)
    (row,) = await bot.ctx.store.snapshots("prod")
    assert row.member != leader


# ---------------------------------------------------------------- 7. /etcd snapshots

async def test_snapshots_lists_the_history_newest_first(make_cluster, slack, start_bot, tmp_path):
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c)])
    snap_dir = tmp_path / "snapshots" / "prod"
    taken = []
    for user, key in ((ONCALL, "/a"), (LEAD, "/b")):
        c.etcdctl("put", key, "x")  # a new revision: the second snapshot differs from the first
        text = text_of(await reply(slack, "snapshot", user=user, timeout=60))
        file = must(re.search(r"\*File:\* `([^`]+)`", text))[1]
        source = must(re.search(r"\*Source:\* (\S+) \(", text))[1]
        taken.append((user, file, source, snapshot_status(snap_dir / file)))

    msg = await reply(slack, "snapshots")
    assert "newest first" in msg.text
    lines = [line for line in msg.text.splitlines() if line.startswith("`prod-")]
    assert len(lines) == 2, msg.text
    for line, (user, file, source, status) in zip(lines, reversed(taken), strict=True):
        assert line.startswith(f"`{file}` · rev {status.revision} · hash {status.hash_hex} · "), (line, file, status)
        assert f" · {source} · " in line and f"<@{user}>" in line, line
    assert taken[1][3].revision > taken[0][3].revision
    shown = "\n".join(b["text"]["text"] for b in must(msg.blocks) if isinstance(b.get("text"), dict))
    assert all(line in shown for line in lines)  # the blocks people see list the same, in the same order


# ---------------------------------------------------------------- 8. the schedule

H = 3600.0


def test_is_due_without_history_or_failure():
    assert is_due(6 * H, None, None, NOW)
    assert not is_due(6 * H, NOW - 5 * H, None, NOW)
    assert is_due(6 * H, NOW - 6 * H, None, NOW)          # exactly `every` later
    assert is_due(6 * H, NOW - 30 * H, None, NOW)


def test_is_due_pauses_after_a_failure_but_never_for_long():
    assert RETRY_AFTER_FAILURE == 600
    assert not is_due(6 * H, NOW - 7 * H, NOW - 599, NOW)    # failed 10 minutes ago: not yet
    assert is_due(6 * H, NOW - 7 * H, NOW - 600, NOW)        # the retry pause is over
    assert is_due(6 * H, None, NOW - 601, NOW)               # never succeeded: retried after the pause
    assert not is_due(60, NOW - 120, NOW - 59, NOW)          # a schedule shorter than the pause ...
    assert is_due(60, NOW - 120, NOW - 60, NOW)              # ... pauses only `every`
    assert not is_due(6 * H, NOW - 1 * H, NOW - 2 * H, NOW)  # an old failure, then a success: not due


async def test_scheduled_snapshots_are_taken_posted_and_fail_loudly(make_cluster, slack, start_bot, tmp_path):
    # The bot's own upkeep runs the schedule at start; then its clock stands still (it is the test's),
    # so it stays out of the way while this test drives a Scheduler with times of its own.
    clock = ManualClock()
    c = make_cluster(3)
    server = await start_bot([cluster_table("prod", c, channels=(CHANNEL, OTHER_CHANNEL), snapshots={"every": "1m"})],
                             clock=clock)
    ctx = server.ctx
    await eventually(ctx.is_leader, 10, "the bot to lead")   # (in real time: the lease's clock)
    snap_dir = tmp_path / "snapshots" / "prod"

    def scheduled_posts(after: int) -> list:
        return [m for m in slack.messages[after:] if m.source == "chat.postMessage"]

    # At start-up nothing was ever taken, so the upkeep's first pass as the leader takes one.
    first, _ = await advance_until(clock, lambda: next(iter(scheduled_posts(0)), None), 10,
                                   "scheduled snapshot taken at start-up")
    assert first.channel == CHANNEL and "Scheduled snapshot of prod" in text_of(first)
    (row,) = await ctx.store.snapshots("prod")
    assert row.reason == "scheduled" and row.requested_by == SCHEDULER

    scheduler = Scheduler(ctx)
    start = len(slack.messages)
    assert await scheduler.run_due(now=time.time()) == []  # just taken: not due
    assert scheduled_posts(start) == []

    # A new revision first: two snapshots of the same revision within the same second would get the
    # same file name, and the second would be refused ("exists already") -- see the module notes.
    c.etcdctl("put", "/scheduled", "1")
    now = row.created_at + 60  # a minute later
    assert await scheduler.run_due(now=now) == ["prod"]
    (posted,) = scheduled_posts(start)
    text = text_of(posted)
    assert posted.channel == CHANNEL, "posted to the cluster's first channel"
    assert "Scheduled snapshot of prod" in text and "verified" in text
    newest = (await ctx.store.snapshots("prod"))[0]
    assert newest.id != row.id and Path(newest.path).name in text and newest.reason == "scheduled"
    assert await scheduler.run_due(now=now) == []  # right after: nothing more
    assert len(scheduled_posts(start)) == 1
    files = files_under(snap_dir)
    assert len(files) == 2 and all(f.endswith(".db") for f in files)

    for name in c.members:  # the whole cluster goes down
        c.kill(name)
    start = len(slack.messages)
    later = now + 3600
    assert await scheduler.run_due(now=later) == ["prod"]
    (alarm,) = scheduled_posts(start)
    text = text_of(alarm)
    assert alarm.channel == CHANNEL
    assert ":rotating_light:" in text and "FAILED" in text and "prod" in text and "No file was kept" in text
    assert "Scheduled snapshot of prod FAILED: " in alarm.text
    assert_one_line(alarm.text)
    assert files_under(snap_dir) == files, "a failed run leaves no file"
    failures = [json.loads(r.detail) for r in await ctx.store.audit_rows() if r.action == "snapshot_failed"]
    assert len(failures) == 1 and failures[0]["scheduled"] is True
    # A failure is retried after a pause, not on every pass.
    assert await scheduler.run_due(now=later + 30) == []
    assert scheduled_posts(start) == [alarm]


# ---------------------------------------------------------------- 9. the CLI

def assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: etcd-chatops snapshot "), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and proc.stderr.rstrip("\n").endswith(errors[0]), proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_cli_save_and_status(cluster, tmp_path, cli):
    proc = cli("snapshot", "save", "--endpoints", ",".join(cluster.endpoints), "--dir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"hash", "revision", "total_keys", "live_keys", "total_size", "file", "sha256"} <= set(out)
    path = Path(out["file"])
    assert path.parent == tmp_path / "etcd" and NAME.match(path.name)
    assert files_under(tmp_path) == [f"etcd/{path.name}"]
    data = path.read_bytes()
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert_trailer(data)
    status = snapshot_status(path)
    assert out["hash"] == status.hash_hex and out["revision"] == status.revision == revision_of(path)
    assert (out["total_keys"], out["live_keys"], out["total_size"]) == \
        (status.total_keys, status.live_keys, status.total_size)
    assert out["member"] != leader_name(cluster)  # a follower, as the bot does

    proc = cli("snapshot", "status", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {k: out[k] for k in ("hash", "revision", "total_keys", "live_keys", "total_size",
                                                            "storage_version")}

    proc = cli("snapshot", "status", str(path))
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert [c.strip() for c in table[1].strip("|").split("|")] == ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"]
    assert [c.strip() for c in table[3].strip("|").split("|")][:3] == \
        [out["hash"], str(out["revision"]), str(out["total_keys"])]


def test_cli_bad_usage_exits_2_with_one_line_and_the_usage(tmp_path, cli):
    assert_usage_error(cli("snapshot", "save", "--endpoints", "http://127.0.0.1:2379"), "--dir")
    assert_usage_error(cli("snapshot", "status", str(tmp_path / "missing.db")), "missing.db", "no such file")
    assert_usage_error(cli("snapshot", "save", "--endpoints", "ftp://127.0.0.1:2379", "--dir", str(tmp_path)),
                       "--endpoints", "ftp://127.0.0.1:2379")
    assert_usage_error(cli("snapshot", "save", "--endpoints", "127.0.0.1", "--dir", str(tmp_path)), "--endpoints")
    assert_usage_error(cli("snapshot", "save", "--endpoints", "http://127.0.0.1:2379", "--dir", str(tmp_path),
                           "--age-recipient", "age1nope"), "--age-recipient")
    assert files_under(tmp_path) == []


def test_cli_corrupt_file_exits_1_with_one_line(tmp_path, cli):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(random.Random(3).randbytes(64 * KiB))
    proc = cli("snapshot", "status", str(corrupt))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert_one_line(proc.stderr)
    assert str(corrupt) in proc.stderr and "not a bbolt file" in proc.stderr, proc.stderr


def test_cli_save_from_a_dead_cluster_exits_1_and_leaves_nothing(make_cluster, tmp_path, cli):
    c = make_cluster(1)
    endpoint = c.endpoints[0]
    c.kill("member1")
    proc = cli("snapshot", "save", "--endpoints", endpoint, "--dir", str(tmp_path / "snaps"), "--json")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert_one_line(proc.stderr)
    assert endpoint in proc.stderr and "connection refused" in proc.stderr, proc.stderr
    assert not (tmp_path / "snaps").exists() or files_under(tmp_path / "snaps") == []


def test_cli_name_is_a_plain_prefix_and_a_directory_is_not_a_snapshot(cluster, tmp_path, cli):
    """`--name ../x` wrote outside --dir and chmod-ed the directory above it."""
    target = tmp_path / "inner"
    target.mkdir()
    mode = tmp_path.stat().st_mode
    for name in ("../x", "a/b", "/abs", ".hidden", "x\n"):
        assert_usage_error(cli("snapshot", "save", "--endpoints", ",".join(cluster.endpoints), "--dir", str(target),
                               "--name", name), "--name", "plain file-name prefix")
    assert files_under(tmp_path) == [] and tmp_path.stat().st_mode == mode
    assert_usage_error(cli("snapshot", "status", str(tmp_path)), str(tmp_path), "is a directory")
