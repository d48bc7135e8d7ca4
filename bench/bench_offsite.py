"""Time to a remotely verified off-site backup, against `etcdctl snapshot save`
followed by boto3's `upload_file` of that file to the same S3 endpoint.

Why: the bot uploads while it saves (the stream is teed into the local file
and a multipart upload), then reads the object back to check its sha256. The
peer is what one would script by hand: save, then upload (boto3's managed
transfer: 8 MB parts, 10 threads), with no remote verification at all. Goal:
ours <= 0.7 x the peer's time, and the bot's RSS while saving and uploading a
>= 500 MB snapshot < 150 MB.

Run from the repository root:

    .venv/bin/python bench/bench_offsite.py                 # a >= 500 MB database on a fresh 1-member cluster
    .venv/bin/python bench/bench_offsite.py --size-mb 200 --runs 2

The S3 endpoint is moto's server (the tests' S3) on loopback in this process,
the same one for both. Ours is the bot itself, as a process with the Slack
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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_snapshot_save import MB, BigCluster, Run, db_size, fill, run_child

from bot.etcd.binaries import find_binary
from bot.testing.s3 import MotoS3
from bot.testing.slack import SlackStandIn
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
from common import row, write

RSS_GOAL = 150 * MB
RATIO_GOAL = 0.7


@dataclass
class CpuUse:
    """CPU seconds (user + system) each process spent over one run: where a
    2-CPU machine's time goes, and the least wall time that much work needs."""
    tool: float    # ours: the bot; the peer: etcdctl, then boto3
    etcd: float    # the member streaming the snapshot
    server: float  # the S3 server (moto, in this process beside the idle Slack stand-in)

    @property
    def total(self) -> float:
        return self.tool + self.etcd + self.server

    def floor(self, cpus: int) -> float:
        """Seconds this much CPU takes at the least on `cpus` CPUs, were every process busy all along."""
        return self.total / cpus

    def line(self) -> str:
        return (f"{self.total:.1f} CPU-s (tool {self.tool:.1f}, etcd {self.etcd:.1f}, "
                f"S3 server {self.server:.1f})")


def _proc_cpu(pid: int) -> float:
    """CPU seconds a running process has used (/proc/PID/stat, utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS since start) and RssAnon of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def ours(slack: SlackStandIn, bot: BotProcess, etcd_pid: int, runs: int
               ) -> tuple[list[float], list[CpuUse], int, int]:
    """`/etcd snapshot` to the real bot until its message says "verified remotely": each run's seconds
    and CPU, the bot's peak RSS (VmHWM) and its RSS before the first save (idle, after start-up)."""
    assert bot.proc is not None
    pid = bot.proc.pid
    idle = _status(pid)["VmRSS"]
    times, cpus = [], []
    for i in range(runs):
        start = len(slack.messages)
        before = (_proc_cpu(pid), _proc_cpu(etcd_pid), _own_cpu())
        t = time.perf_counter()
        await slack.send_command("snapshot", user_id=ONCALL, channel_id=CHANNEL)
        msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=600,
                                           what="the snapshot's message")
        times.append(time.perf_counter() - t)
        cpus.append(CpuUse(_proc_cpu(pid) - before[0], _proc_cpu(etcd_pid) - before[1], _own_cpu() - before[2]))
        if "verified remotely" not in msg.text:
            raise SystemExit(f"not stored off-site: {msg.text}")
        print(f"  ours, run {i + 1}: {times[-1]:.2f} s, {cpus[-1].line()}", file=sys.stderr)
    return times, cpus, _status(pid)["VmHWM"], idle


BOTO3_UPLOAD = """
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").upload_file(sys.argv[2], sys.argv[3], sys.argv[4])
"""


def peer(endpoint: str, etcd_pid: int, directory: Path, s3: MotoS3) -> tuple[Run, Run, CpuUse]:
    path = directory / "etcdctl.db"
    before = (_proc_cpu(etcd_pid), _own_cpu())
    _, save = run_child([str(find_binary("etcdctl")), f"--endpoints={endpoint}", "--dial-timeout=5s",
                         "--command-timeout=600s", "snapshot", "save", str(path)],
                        env={"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"})
    save.size = path.stat().st_size
    _, upload = run_child([sys.executable, "-c", BOTO3_UPLOAD, s3.endpoint, str(path), s3.bucket, "peer/etcdctl.db"],
                          env={**os.environ, **s3.env})
    upload.size = save.size
    cpu = CpuUse(save.cpu + upload.cpu, _proc_cpu(etcd_pid) - before[0], _own_cpu() - before[1])
    path.unlink()
    s3.client().delete_object(Bucket=s3.bucket, Key="peer/etcdctl.db")
    return save, upload, cpu


async def measure(size_mb: int, runs: int, work: Path) -> list[dict]:
    with BigCluster(1, base_dir=work / "cluster") as c, MotoS3() as s3:
        endpoint = c.endpoints[0]
        print(f"filling a 1-member cluster with {size_mb} MB of 1 MiB values ...", file=sys.stderr)
        keys = await fill([endpoint], size_mb * MB, 1 << 20)
        size = db_size(c)
        out = work / "out"
        out.mkdir()
        etcd_pid = next(iter(c.members.values())).pid
        assert etcd_pid is not None
        saves, uploads, peer_cpus = [], [], []
        for i in range(runs):
            save, upload, cpu = peer(endpoint, etcd_pid, out, s3)
            saves.append(save)
            uploads.append(upload)
            peer_cpus.append(cpu)
            print(f"  peer, run {i + 1}: etcdctl {save.wall:.2f} s + boto3 {upload.wall:.2f} s, {cpu.line()}",
                  file=sys.stderr)
        # The bot: the keep-nothing-else policy keeps the disk small (keep_last 1, keep_local 0).
        os.environ.update(s3.env)  # where the bot process reads its credentials
        creds = SlackSecrets()
        table = cluster_table("bench", c, snapshots={"keep_last": 1,
                                                     "store": s3.store_table("bot", keep_local=0)})
        config = write_config(work, [table])
        async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                users=USERS, channels=CHANNELS) as slack:
            bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, work / "bot.log").start)
            slack.bot_url = bot.url
            try:
                times, cpus, peak, idle = await ours(slack, bot, etcd_pid, runs)
            finally:
                await asyncio.to_thread(bot.stop)
    peer_walls = [s.wall + u.wall for s, u in zip(saves, uploads, strict=True)]
    best_peer = min(peer_walls)
    best = min(times)
    ratio = best / best_peer
    ncpu = len(os.sched_getaffinity(0))
    our_cpu, their_cpu = cpus[times.index(best)], peer_cpus[peer_walls.index(best_peer)]
    # The least time our flow's CPU work allows on this machine, with the bot's own share at zero:
    # what etcd and the S3 server spend for it alone.
    server_floor = (our_cpu.etcd + our_cpu.server) / ncpu
    print(f"database: {size:,} bytes ({size / MB:,.0f} MB), {keys:,} keys; snapshot {saves[0].size:,} bytes")
    print(f"ours (the bot, /etcd snapshot to 'verified remotely'): best {best:.2f} s; all runs "
          f"{', '.join(f'{t:.2f}' for t in times)} s; peak RSS {peak / MB:.1f} MB (idle {idle / MB:.1f} MB)")
    print(f"peer (etcdctl snapshot save, then boto3 upload_file): best {best_peer:.2f} s")
    print(f"CPU, best runs: ours {our_cpu.line()}; peer {their_cpu.line()}")
    print(f"on {ncpu} CPUs ours needs at least {our_cpu.floor(ncpu):.2f} s ({our_cpu.floor(ncpu) / best_peer:.2f} x "
          f"the peer's time), and etcd and the S3 server alone need {server_floor:.2f} s for it "
          f"({server_floor / best_peer:.2f} x) whatever the bot does")
    print(f"goal time <= {RATIO_GOAL} x the peer's: {'met' if ratio <= RATIO_GOAL else 'NOT met'} ({ratio:.2f}); "
          f"goal peak RSS < 150 MB: {'met' if peak < RSS_GOAL else 'NOT met'} ({peak / MB:.1f} MB)")
    return [row(f"time to a remotely verified off-site copy, {size / MB:,.0f} MB database", best, best_peer, "s",
                "etcdctl snapshot save, then boto3 upload_file"),
            row("the bot's peak RSS while saving and uploading", peak / MB, max(u.maxrss for u in uploads) / MB, "MB",
                "boto3 upload_file"),
            row("CPU seconds of every process (the tool, etcd, the S3 server)", our_cpu.total, their_cpu.total,
                "CPU-s", "etcdctl + boto3, etcd, the S3 server"),
            row(f"least time etcd's and the S3 server's CPU allow ours on {ncpu} CPUs, against the peer's time",
                server_floor, best_peer, "s", "the peer's time")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=520, help="MB of values to write (default 520: a DB over 500 MB)")
    p.add_argument("--runs", type=int, default=3, help="runs of each; the best is reported (default 3)")
    p.add_argument("--json", help="write the figures here (for bench/run_all.py)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-"))
    try:
        rows = asyncio.run(measure(args.size_mb, args.runs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(args.json, "Off-site backup against etcdctl + boto3", rows,
          f"Best of {args.runs}. Ours: the bot as its own process (`run --http`, the Slack stand-in), from sending "
          f"`/etcd snapshot` to its message saying `verified remotely`: health check, the save with the upload "
          f"streamed while it saves, the read-back of the whole object and its sha256, the manifest, the catalog. "
          f"Peer: `etcdctl snapshot save`, then boto3's upload_file of that file (8 MB parts, 10 threads) as its "
          f"own process, verifying nothing off-site. Both against the same moto S3 server on loopback. Peak RSS: "
          f"the bot's VmHWM (start-up included). Goals: time <= {RATIO_GOAL} x the peer's; RSS < 150 MB.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
