"""The bot's rolling defragmentation beside `etcdctl defrag --cluster` and etcd-defrag, under a steady write load.

Why: defragmentation blocks a member's reads and writes while it runs, and
defragmenting the leader in place stalls every write in the cluster. The bot
defragments the followers one at a time, moves leadership away, then the
former leader; etcdctl defragments every member in turn, the leader in place;
etcd-defrag (github.com/ahrtr/etcd-defrag, the community's tool, with
--move-leader) defragments the followers, then moves leadership and
defragments the former leader.

Run from the repository root:

    .venv/bin/python bench/bench_defrag.py [--release 3.6] [--size-mb 200] [--json out.json]

One 3-member cluster of `--release` (8 GiB quota) per setting. For each tool, in the same
run: the database is fragmented to >= --size-mb (1 MiB values written, 7 of 8 then
overwritten with a byte, compacted), then a steady load writes while the tool runs.
Two settings:

- pinned: StopGRPCServiceOnDefrag off, one writer pinned to each member (as kubeadm's
  kube-apiservers talk to their local etcd), a put every 20 ms each;
- health-checked: StopGRPCServiceOnDefrag on, three writers whose gRPC channels balance
  round robin over the three members with gRPC health checks, so a member that answers
  NOT_SERVING while it defragments gets no new writes.

Reported: write latency p99 and max (the longest single write stall), the longest time
no write succeeded anywhere (the cluster-wide stall), and each tool's total time. Ours
runs through the plan engine (proposal, one approval, every step and re-check, the
verified snapshot included) with the plain notifier. etcd-defrag is built by
scripts/build-etcd-defrag.sh (cached).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from bot.config import load_config
from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.ops.defrag import plan as defrag
from bot.ops.notify import PlainDirectory, PlainNotifier
from bot.runtime import Runtime
from bot.testing.cluster import LocalCluster
from bot.testing.versions import binary_version, cache_dir, etcd_bin_dir
from bot.testing.workspace import CHANNEL, LEAD, ONCALL, cluster_table, write_config
from common import ROOT, percentile, row, write
from helpers import APPROVAL, wait_done

MiB = 1 << 20
PERIOD = 0.02
GATE = "--feature-gates=StopGRPCServiceOnDefrag=true"
# gRPC's round robin over every member, skipping those whose health check says NOT_SERVING
HEALTH_CHECKED = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})


def etcd_defrag() -> Path:
    """The pinned etcd-defrag, built once (scripts/build-etcd-defrag.sh says where it is)."""
    subprocess.run(["sh", str(ROOT / "scripts" / "build-etcd-defrag.sh")], check=True)
    version = next(line.strip() for line in (ROOT / "scripts" / "etcd-defrag-version").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    return cache_dir() / f"etcd-defrag-{version}" / "etcd-defrag"


async def fragment(cluster: LocalCluster, size_mb: int) -> int:
    """Write size_mb 1 MiB values on distinct keys, overwrite 7 of 8 with one byte, compact: a DB file
    of about size_mb with about an eighth in use. Returns the largest member's DB size."""
    async with EtcdClient(cluster.endpoints, timeout=30) as client:
        gate = asyncio.Semaphore(8)
        tag = str(time.monotonic_ns()).encode()

        async def put(i: int, value: bytes) -> int:
            async with gate:
                return await client.put(b"big/%s/%d" % (tag, i), value)
        await asyncio.gather(*(put(i, bytes(MiB)) for i in range(size_mb)))
        revisions = await asyncio.gather(*(put(i, b"x") for i in range(size_mb) if i % 8))
        await client.compact(max(revisions))
        sizes = [(await client.status(e)).db_size for e in cluster.endpoints]
    return max(sizes)


@dataclass
class Load:
    """Three writers; every put's start and latency."""

    endpoints: list[str]
    samples: list[tuple[float, float]] = field(default_factory=list)   # (start, latency)
    errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0   # the tool's run, on the monotonic clock (shared by the processes)
    ended: float = 0.0

    async def _write(self, put: Callable[[int], Awaitable[None]]) -> None:
        i = 0
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                await put(i)
                self.samples.append((began, time.monotonic() - began))
            except (EtcdError, grpc.aio.AioRpcError):
                self.errors += 1
            i += 1
            await asyncio.sleep(max(0.0, PERIOD - (time.monotonic() - began)))

    async def pinned(self, endpoint: str, n: int) -> None:
        async with EtcdClient([endpoint], timeout=60) as client:
            async def put(i: int) -> None:
                await client.put(b"load/%d/%d" % (n, i % 100), b"v" * 100)
            await self._write(put)

    async def health_checked(self, n: int) -> None:
        target = "ipv4:" + ",".join(e.split("://", 1)[1] for e in self.endpoints)
        async with grpc.aio.insecure_channel(target, options=[("grpc.service_config", HEALTH_CHECKED)]) as channel:
            kv = rpc.KVStub(channel)

            async def put(i: int) -> None:
                await kv.Put(rpc.PutRequest(key=b"load/%d/%d" % (n, i % 100), value=b"v" * 100), timeout=60)
            await self._write(put)

    def window(self, start: float, end: float) -> dict[str, float]:
        inside = [(s, lat) for s, lat in self.samples if start <= s + lat and s <= end]
        lat = [x for _, x in inside]
        done = sorted(s + x for s, x in inside)
        gaps = [b - a for a, b in zip([start, *done], [*done, end], strict=True)]
        return {"p99": percentile(lat, 99), "max": max(lat), "stall": max(gaps), "writes": len(lat)}


async def load_process(endpoints: list[str], mode: str, out: Path) -> None:
    """The load generator's own process (the bot's snapshot hashing must not delay its clock):
    writes until SIGTERM, then saves every sample."""
    load = Load(endpoints)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, load.stop.set)

    async def steady() -> None:  # every writer has written: the parent starts the tool's clock now
        while len(load.samples) < 3 * len(endpoints):
            await asyncio.sleep(PERIOD)
        print("writing", flush=True)
    asyncio.ensure_future(steady())
    if mode == "pinned":
        await asyncio.gather(*(load.pinned(e, n) for n, e in enumerate(endpoints)))
    else:
        await asyncio.gather(*(load.health_checked(n) for n in range(len(endpoints))))
    out.write_text(json.dumps({"samples": load.samples, "errors": load.errors}))


async def under_load(cluster: LocalCluster, mode: str, run: Callable[[], Awaitable[tuple[float, float] | None]],
                     ) -> dict[str, float]:
    """The tool's figures while the load runs: the whole run, and when `run` returns a (start, end) on the
    monotonic clock, that part alone ("phase_" figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.json"
        child = subprocess.Popen([sys.executable, __file__, "--load", ",".join(cluster.endpoints), "--mode", mode,
                                  "--json", str(out)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert await asyncio.to_thread(child.stdout.readline) == "writing\n", "the load did not start"
        await asyncio.sleep(0.5)  # steadily
        started = time.monotonic()
        phase = await run()
        ended = time.monotonic()
        await asyncio.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        await asyncio.to_thread(child.wait, 30)
        child.stdout.close()
        data = json.loads(out.read_text())
    load = Load(cluster.endpoints, [tuple(x) for x in data["samples"]], data["errors"])
    figures = {**load.window(started, ended), "time": ended - started, "errors": load.errors}
    if phase is not None:
        figures |= {f"phase_{k}": v for k, v in load.window(*phase).items()} | {"phase_time": phase[1] - phase[0]}
    return figures


async def one_setting(size_mb: int, mode: str, tool: Path, extra: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Each tool's figures on one cluster, the database fragmented again before each."""
    results: dict[str, dict[str, float]] = {}
    with LocalCluster(3, extra_args=("--quota-backend-bytes", str(8 * 1024 * MiB), *extra)) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        await fragment(cluster, size_mb)

        async def by_etcdctl() -> None:
            await asyncio.to_thread(subprocess.run, [*cluster.etcdctl_args(), "defrag", "--cluster",
                                                     "--command-timeout=300s"], check=True, capture_output=True)
            return None
        results["etcdctl defrag --cluster"] = await under_load(cluster, mode, by_etcdctl)

        await fragment(cluster, size_mb)

        async def by_etcd_defrag() -> None:
            await asyncio.to_thread(subprocess.run, [str(tool), f"--endpoints={','.join(cluster.endpoints)}",
                                                     "--cluster", "--move-leader", "--command-timeout=300s"],
                                    check=True, capture_output=True)
            return None
        results["etcd-defrag --move-leader"] = await under_load(cluster, mode, by_etcd_defrag)

        await fragment(cluster, size_mb)
        config = load_config(write_config(Path(tmp), [cluster_table("bench", cluster, timeout_seconds=5.0)],
                                          approval=APPROVAL))
        ctx = await BotContext.open(config, PlainNotifier(), PlainDirectory())
        runtime = await Runtime(ctx, watch=False, upkeep=False).start()
        try:
            outcome = await defrag.propose(ctx, config.clusters[0], "dbSize > 0", True, ONCALL, CHANNEL, "")
            assert outcome.ephemeral is None, outcome.ephemeral
            record = await ctx.store.open_plan("bench")
            assert record is not None

            async def by_bot() -> tuple[float, float]:
                await lifecycle.approve(ctx, record, LEAD)
                await wait_done(ctx.store, record.id, timeout=900)
                # the defragmentations alone: from the compaction to the last member's catch-up (store times: wall)
                to_mono = time.monotonic() - time.time()
                steps = {st.key: st for st in await ctx.store.steps(record.id)}
                last = max(st.finished_at or 0.0 for k, st in steps.items() if k.startswith("defrag-"))
                return steps["compact"].started_at + to_mono, last + to_mono
            results["bot"] = await under_load(cluster, mode, by_bot)
        finally:
            await runtime.stop()
            await ctx.close()
    for name, r in results.items():
        print(f"{mode}: {name}: p99 {r['p99'] * 1000:.0f} ms, max {r['max'] * 1000:.0f} ms, stall "
              f"{r['stall'] * 1000:.0f} ms, {r['time']:.2f} s, {r['writes']:.0f} writes, {r['errors']:.0f} errors"
              + (f"; defragmentations alone: max {r['phase_max'] * 1000:.0f} ms, stall "
                 f"{r['phase_stall'] * 1000:.0f} ms, {r['phase_time']:.2f} s" if "phase_max" in r else ""))
    return results


def rows_for(setting: str, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    bot = results["bot"]
    out = []
    for peer in ("etcdctl defrag --cluster", "etcd-defrag --move-leader"):
        them = results[peer]
        out += [
            row(f"{setting}: write latency p99", bot["p99"] * 1000, them["p99"] * 1000, "ms", peer),
            row(f"{setting}: the longest single write stall", bot["max"] * 1000, them["max"] * 1000, "ms", peer),
            row(f"{setting}: longest time no write succeeded anywhere", bot["stall"] * 1000, them["stall"] * 1000,
                "ms", peer),
            row(f"{setting}: total time (ours: approval to done, snapshot included)", bot["time"], them["time"], "s",
                peer),
            row(f"{setting}: the longest single write stall, ours the defragmentations alone (compact to the last "
                "catch-up)", bot["phase_max"] * 1000, them["max"] * 1000, "ms", peer),
            row(f"{setting}: longest time no write succeeded anywhere, ours the defragmentations alone",
                bot["phase_stall"] * 1000, them["stall"] * 1000, "ms", peer),
        ]
    return out


async def main_async(size_mb: int) -> list[dict[str, Any]]:
    tool = etcd_defrag()
    pinned = await one_setting(size_mb, "pinned", tool, ())
    checked = await one_setting(size_mb, "health-checked", tool, (GATE,))
    return (rows_for("pinned writers, StopGRPCServiceOnDefrag off", pinned)
            + rows_for("health-checked writers, StopGRPCServiceOnDefrag on", checked))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", default="3.6", help="the etcd release (3.6 has StopGRPCServiceOnDefrag)")
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--json")
    p.add_argument("--load", help=argparse.SUPPRESS)  # the load generator's child process: its endpoints
    p.add_argument("--mode", default="pinned", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load:
        asyncio.run(load_process(args.load.split(","), args.mode, Path(args.json)))
        return 0
    directory = etcd_bin_dir(args.release)
    os.environ["ETCD_BIN_DIR"] = str(directory)  # the clusters and etcdctl of that release
    rows = asyncio.run(main_async(args.size_mb))
    write(args.json, "Rolling defragmentation under write load", rows,
          f"etcd {binary_version(directory / 'etcd')}, 3 members, each database fragmented to about {args.size_mb} "
          "MB (7 of 8 values overwritten and compacted) before each tool. Pinned writers: one per member, a 100-byte "
          "put every 20 ms each. Health-checked writers: three, each balancing round robin over the members with "
          "gRPC health checks. The bot's total time includes the proposal's approval, every re-check, the verified "
          "snapshot and the leadership move; etcd-defrag runs with --cluster --move-leader (and its compaction).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
