"""Restore drills: a backup is only as good as its last restore.

`/etcd drill [SNAPSHOT]` and `[snapshots] drill_every`: verify the snapshot
as a restore would, restore it with etcdutl into a scratch directory on the
bot's host, boot a single-member etcd from it on loopback (free ports), read
its revision and live key count and compare them with the catalog, take its
HashKV, then stop it and remove everything. The result is recorded (the
`drills` table, shown by `/etcd snapshots`) and audited.
"""
from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bot.config import ClusterConfig
from bot.domain.errors import EtcdError, StepFailed
from bot.domain.restore import booted_revision
from bot.domain.snapshot import DrillRecord, DrillResult, SnapshotRef
from bot.etcd.binaries import BinaryNotFound, find_binary
from bot.etcd.client import EtcdClient
from bot.ops.context import BotContext
from bot.ops.restorable import adopt, check_plain, check_stored, origin, plaintext, restorable
from bot.ops.restore.plan import choose_snapshot

BOOT_TIMEOUT = 60.0
RESTORE_TIMEOUT = 600.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"did not finish within {timeout:g}s"
    return proc.returncode or 0, out.decode(errors="replace")


async def boot_and_read(snapshot: SnapshotRef, plain: Path, scratch: Path) -> str:
    """Restore `plain` into `scratch`, boot one etcd on loopback, compare with the catalog; stops it always."""
    try:
        etcd, etcdutl = find_binary("etcd"), find_binary("etcdutl")
    except BinaryNotFound as e:
        raise StepFailed(str(e), "install etcd and etcdutl on the bot's host (the image ships them)") from None
    peer, client_url = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    data = scratch / "data"
    cluster = f"drill={peer}"
    code, out = await _run([str(etcdutl), "snapshot", "restore", str(plain), "--name", "drill",
                            "--initial-cluster", cluster, "--initial-cluster-token", "drill-" + secrets.token_hex(4),
                            "--initial-advertise-peer-urls", peer, "--data-dir", str(data)], RESTORE_TIMEOUT)
    if code != 0:
        raise StepFailed(f"etcdutl snapshot restore failed ({code}): {out.strip()[-400:]}",
                         "the snapshot is not usable")
    log = open(scratch / "etcd.log", "wb")
    proc = await asyncio.create_subprocess_exec(
        str(etcd), "--name", "drill", "--data-dir", str(data), "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", cluster, "--log-level", "warn", stdin=asyncio.subprocess.DEVNULL, stdout=log,
        stderr=asyncio.subprocess.STDOUT)
    try:
        async with EtcdClient([client_url], timeout=2.0) as client:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                try:
                    live, revision = await client.count_keys(client_url)
                    break
                except EtcdError as e:
                    if proc.returncode is not None or time.monotonic() > deadline:
                        tail = (scratch / "etcd.log").read_text(errors="replace").strip()[-400:]
                        raise StepFailed(f"the restored etcd did not serve ({e}): {tail}",
                                         "the snapshot does not boot") from None
                    await asyncio.sleep(0.1)
            hash_kv = (await client.hash_kv(client_url, revision)).hash
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
    problems = []
    if revision != booted_revision(snapshot.revision):
        problems.append(f"revision {revision}, the catalog says {snapshot.revision}")
    if snapshot.live_keys is not None and live != snapshot.live_keys:
        problems.append(f"{live} keys, the catalog says {snapshot.live_keys}")
    if problems:
        raise StepFailed("the restored etcd differs from the catalog: " + "; ".join(problems), "do not rely on it")
    return f"booted: revision {revision}, {live_keys(live, snapshot.total_keys)}, HashKV {hash_kv:08x}"


def live_keys(live: int, stored: int) -> str:
    """The booted etcd's key count, and why it differs from the snapshot's status (keys vs revisions)."""
    if live == stored:
        return f"{live} keys"
    return (f"{live} live keys (the snapshot's {stored} keys count every stored revision of every key and etcd's own "
            "records, as etcdutl's TOTAL KEYS does; a running etcd counts each live key once)")


async def drill(ctx: BotContext, cluster: ClusterConfig, wanted: str | None, requested_by: str) -> DrillResult:
    """Run one drill and record it; raises Refusal when there is no such snapshot. An object only the store
    knows is drilled first and catalogued only if it passed and is the bot's own (signed); a foreign one
    (named exactly) is drilled and never catalogued, so its result is in the audit log only."""
    snapshot, _ = choose_snapshot(await restorable(ctx, cluster), wanted, foreign_ok=True,
                                  encrypted_only=cluster.snapshots.encrypted)
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="etcd-chatops-drill-"))
    try:
        await check_stored(snapshot)
        async with plaintext(snapshot, cluster.restore.age_identity, origin(ctx, cluster)) as plain:
            verified = await check_plain(snapshot, plain)
            booted = await boot_and_read(snapshot, plain, scratch)
        result = DrillResult(True, cluster.name, snapshot.file_name, f"{verified.split(': ', 1)[1]}; {booted}",
                             time.monotonic() - began, snapshot.remote_url, snapshot.foreign)
    except StepFailed as e:
        result = DrillResult(False, cluster.name, snapshot.file_name, e.reason, time.monotonic() - began,
                             snapshot.remote_url, snapshot.foreign)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if result.ok and not snapshot.id and not snapshot.foreign:  # verified: catalogued now, so its drills are recorded
        snapshot = replace(snapshot, id=await adopt(ctx, cluster, snapshot))
    if snapshot.id:
        await ctx.store.record_drill(DrillRecord(cluster=cluster.name, snapshot_id=snapshot.id, ok=result.ok,
                                                 detail=result.detail, seconds=round(result.seconds, 3),
                                                 at=time.time(), requested_by=requested_by))
    await ctx.store.audit("drill", user=requested_by, cluster=cluster.name,
                          detail={"snapshot": snapshot.file_name, "ok": result.ok, "detail": result.detail,
                                  "from_store": snapshot.remote_url or None, "foreign": snapshot.foreign or None})
    return result
