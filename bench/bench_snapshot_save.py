"""Time `etcd-chatops snapshot save` against `etcdctl snapshot save` on the same big database.

Why: the bot streams Maintenance.Snapshot to disk in constant memory, checks
etcd's sha256 trailer, fsyncs and computes the snapshot's status before the
file gets its final name. That should be no slower than etcdctl (which
only checks the trailer and fsyncs) and stay under 100 MB of memory whatever
the database size.

Run from the repository root:

    .venv/bin/python bench/bench_snapshot_save.py                  # a >= 500 MB database on a fresh 1-member cluster
    .venv/bin/python bench/bench_snapshot_save.py --size-mb 1000 --runs 5
    .venv/bin/python bench/bench_snapshot_save.py --value-kb 4     # many small values instead of 1 MiB ones

It starts one etcd member with a raised --quota-backend-bytes, fills it with
random values written in parallel, then runs each tool --runs times
(default 3), alternating, each as a child process on the same member: ours
is `python -m bot snapshot save --endpoints E --dir D --json` (the CLI, so
Python start-up, the health check, the status computation and fsync are
included), theirs `etcdctl snapshot save FILE`. Reported per tool: the best
wall time, the throughput (file size / that time), and the child's peak RSS
(ru_maxrss from wait4, which counts file pages mapped in as well) plus its
peak anonymous memory (RssAnon sampled from /proc every 5 ms). Then the
ratios, and whether the goals hold: throughput >= etcdctl's, RSS < 100 MB.
Both files are removed after each run; the cluster is removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bot.etcd.binaries import find_binary
from bot.etcd.client import EtcdClient
from bot.testing.cluster import LocalCluster
from common import ROOT, proc_memory, row, write

MB = 1_000_000
MiB = 1 << 20
RSS_GOAL = 100 * MB


class BigCluster(LocalCluster):
    """One member that accepts a database of several GB and requests up to 8 MiB."""

    def member_argv(self) -> list[str]:
        return [*super().member_argv(), "--quota-backend-bytes=8589934592", "--max-request-bytes=8388608"]


async def fill(endpoints: list[str], target: int, value_size: int, parallel: int = 8) -> int:
    """Put random values until their total reaches `target` bytes; returns the number of keys."""
    count = -(-target // value_size)
    rng = random.Random(42)
    pool = [rng.randbytes(value_size) for _ in range(16)]  # random bytes, re-used: bbolt does not compress
    gate = asyncio.Semaphore(parallel)
    done = 0

    async def put(i: int) -> None:
        nonlocal done
        async with gate:
            await client.put(f"/registry/bench/{i:08d}".encode(), pool[i % len(pool)], timeout=60)
        done += 1
        if done % max(1, count // 10) == 0:
            print(f"  {done:,}/{count:,} values written", file=sys.stderr)

    async with EtcdClient(endpoints, timeout=60) as client:
        await asyncio.gather(*(put(i) for i in range(count)))
    return count


def db_size(cluster: LocalCluster) -> int:
    out = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json").stdout)
    return int(out[0]["Status"]["dbSize"])


@dataclass
class Run:
    wall: float          # seconds, process start to exit
    size: int            # bytes of the file written
    maxrss: int          # bytes, ru_maxrss of the child
    anon_peak: int       # bytes, highest RssAnon seen
    inner: float | None  # seconds the save itself reported (ours only)
    cpu: float = 0.0     # CPU seconds (user + system) of the child and what it waited for

    @property
    def mb_s(self) -> float:
        return self.size / self.wall / MB


def _children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


GNU_TIME = shutil.which("time") if os.path.exists("/usr/bin/time") else None


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, Run]:
    """Run argv to completion; its wall time, peak RSS and sampled peak anonymous RSS.

    The peak RSS comes from GNU time (`-f %M`), which forks the tool anew:
    measured directly, a child spawned by this (large) process inherits our
    own high-water mark at exec, since subprocess uses vfork."""
    started = time.perf_counter()
    rss_file = tempfile.NamedTemporaryFile(prefix="bench-rss-", delete=False)
    rss_file.close()
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv] if GNU_TIME else argv
    proc = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max([peak] + [proc_memory(p).get("RssAnon", 0) for p in (proc.pid, *_children_of(proc.pid))])
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    try:
        maxrss_kb = int(Path(rss_file.name).read_text().strip().splitlines()[-1]) if GNU_TIME else usage.ru_maxrss
    finally:
        os.unlink(rss_file.name)
    out, err = b"".join(out_chunks).decode(), b"".join(err_chunks).decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {err.strip()}")
    return out, Run(wall=wall, size=0, maxrss=maxrss_kb * 1024, anon_peak=peak, inner=None,
                    cpu=usage.ru_utime + usage.ru_stime)


def ours(endpoint: str, directory: Path) -> Run:
    out, run = run_child([sys.executable, "-m", "bot", "snapshot", "save", "--endpoints", endpoint,
                          "--dir", str(directory), "--name", "bench", "--json"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    saved = json.loads(out)
    path = Path(saved["file"])
    run.size, run.inner = path.stat().st_size, saved["duration_seconds"]
    path.unlink()
    return run


def etcdctl(endpoint: str, directory: Path) -> Run:
    path = directory / "etcdctl.db"
    _, run = run_child([str(find_binary("etcdctl")), f"--endpoints={endpoint}", "--dial-timeout=5s",
                        "--command-timeout=600s", "snapshot", "save", str(path)],
                       env={"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"})
    run.size = path.stat().st_size
    path.unlink()
    return run


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}{mem}, " \
           f"Linux {platform.release()}, Python {sys.version.split()[0]}"


def etcd_version() -> str:
    out = subprocess.run([str(find_binary("etcd")), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def report(name: str, runs: list[Run]) -> Run:
    best = min(runs, key=lambda r: r.wall)
    maxrss = max(r.maxrss for r in runs)
    anon = max(r.anon_peak for r in runs)
    inner = f", save itself {best.inner:.2f} s = {best.size / best.inner / MB:,.0f} MB/s" if best.inner else ""
    print(f"{name:<28} best {best.wall:6.2f} s  {best.mb_s:7,.0f} MB/s{inner}")
    print(f"{'':<28} peak RSS {maxrss / MB:6.1f} MB (anonymous {anon / MB:.1f} MB); "
          f"all runs: {', '.join(f'{r.wall:.2f}' for r in runs)} s")
    return Run(wall=best.wall, size=best.size, maxrss=maxrss, anon_peak=anon, inner=best.inner)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=520, help="MB of values to write (default 520: a DB over 500 MB)")
    p.add_argument("--value-kb", type=int, default=1024, help="size of each value in KiB (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="runs of each tool; the best is reported (default 3)")
    p.add_argument("--json", help="write the figures here (for bench/run_all.py)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-save-"))
    try:
        with BigCluster(1, base_dir=work / "cluster") as c:
            endpoint = c.endpoints[0]
            print(f"filling a 1-member cluster with {args.size_mb} MB of {args.value_kb} KiB values ...",
                  file=sys.stderr)
            t = time.perf_counter()
            keys = asyncio.run(fill([endpoint], args.size_mb * MB, args.value_kb * 1024))
            size = db_size(c)
            print(f"filled in {time.perf_counter() - t:.0f} s: {keys:,} keys, db {size / MB:,.0f} MB", file=sys.stderr)
            out = work / "out"
            out.mkdir()
            ours_runs, theirs_runs = [], []
            for i in range(args.runs):  # alternate, so both meet the same caches and background load
                ours_runs.append(ours(endpoint, out))
                theirs_runs.append(etcdctl(endpoint, out))
                print(f"  run {i + 1}: ours {ours_runs[-1].wall:.2f} s, etcdctl {theirs_runs[-1].wall:.2f} s",
                      file=sys.stderr)
            print(f"machine:  {machine()}")
            print(f"etcd:     {etcd_version()}, one member on loopback, data dir and snapshots on the same disk")
            print(f"database: {size:,} bytes ({size / MB:,.0f} MB), {keys:,} keys of {args.value_kb} KiB; "
                  f"snapshot file {ours_runs[0].size:,} bytes")
            a = report("etcd-chatops snapshot save", ours_runs)
            b = report("etcdctl snapshot save", theirs_runs)
            print(f"ratios ours/etcdctl: throughput {a.mb_s / b.mb_s:.2f}, wall time {a.wall / b.wall:.2f}, "
                  f"peak RSS {a.maxrss / b.maxrss:.2f}")
            print(f"goal throughput >= etcdctl's: {'met' if a.mb_s >= b.mb_s else 'NOT met'}; "
                  f"goal peak RSS < 100 MB: {'met' if a.maxrss < RSS_GOAL else 'NOT met'} "
                  f"({a.maxrss / MB:.1f} MB; anonymous {a.anon_peak / MB:.1f} MB)")
            write(args.json, "Snapshot save against etcdctl", [
                row(f"save throughput, {size / MB:,.0f} MB database", a.mb_s, b.mb_s, "MB/s", "etcdctl snapshot save",
                    better="higher"),
                row("save wall time", a.wall, b.wall, "s", "etcdctl snapshot save"),
                row("save peak RSS", a.maxrss / MB, b.maxrss / MB, "MB", "etcdctl snapshot save"),
            ], f"Best of {args.runs}, alternating, each tool as its own process (start-up included). Ours also "
               f"verifies the sha256 trailer, fsyncs, computes the etcdutl status and checks the bbolt structure; "
               f"etcdctl verifies the trailer and fsyncs.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
