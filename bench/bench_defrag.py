"""The bot's rolling defragmentation against `etcdctl defrag --cluster`, under a steady write load.

Why: defragmentation blocks a member's reads and writes while it runs, and
defragmenting the leader in place stalls every write in the cluster. The bot
defragments the followers one at a time, moves leadership away, then the
former leader; etcdctl defragments every member in turn, the leader in place.

Run from the repository root:

    .venv/bin/python bench/bench_defrag.py [--size-mb 330] [--writers 3] [--json out.json]

One 3-member cluster (8 GiB quota). For each tool, in the same run: the
database is fragmented to >= --size-mb (1 MiB values written, 7 of 8 then
overwritten with a byte, compacted), then a steady load writes through every
endpoint (one writer pinned to each member, as kubeadm's kube-apiservers talk
to their local etcd, a put every 20 ms each) while the tool runs. Reported:
write latency p99 and max during the run, the longest time no write
succeeded anywhere (the cluster-wide stall), and the tool's total time. Ours
runs through the plan engine (proposal, one approval, every step and
re-check, the verified snapshot included) with the plain notifier.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import load_config
from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.ops.defrag import plan as defrag
from bot.ops.notify import PlainDirectory, PlainNotifier
from bot.runtime import Runtime
from bot.testing.cluster import LocalCluster
from bot.testing.workspace import CHANNEL, LEAD, ONCALL, cluster_table, write_config
from common import percentile, row, write
from helpers import APPROVAL, wait_done

MiB = 1 << 20
PERIOD = 0.02


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
    """One writer per endpoint; every put's start and latency."""

    endpoints: list[str]
    samples: list[tuple[float, float]] = field(default_factory=list)   # (start, latency)
    errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0   # the tool's run, on the monotonic clock (shared by the processes)
    ended: float = 0.0

    async def writer(self, endpoint: str, n: int) -> None:
        async with EtcdClient([endpoint], timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    await client.put(b"load/%d/%d" % (n, i % 100), b"v" * 100)
                    self.samples.append((began, time.monotonic() - began))
                except EtcdError:
                    self.errors += 1
                i += 1
                await asyncio.sleep(max(0.0, PERIOD - (time.monotonic() - began)))

    def window(self, start: float, end: float) -> dict[str, float]:
        inside = [(s, lat) for s, lat in self.samples if start <= s + lat and s <= end]
        lat = [x for _, x in inside]
        done = sorted(s + x for s, x in inside)
        gaps = [b - a for a, b in zip([start, *done], [*done, end], strict=True)]
        return {"p99": percentile(lat, 99), "max": max(lat), "stall": max(gaps), "writes": len(lat)}


async def load_process(endpoints: list[str], out: Path) -> None:
    """The load generator's own process (the bot's snapshot hashing must not delay its clock):
    writes until SIGTERM, then saves every sample."""
    load = Load(endpoints)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, load.stop.set)
    await asyncio.gather(*(load.writer(e, n) for n, e in enumerate(endpoints)))
    out.write_text(json.dumps({"samples": load.samples, "errors": load.errors}))


async def under_load(cluster: LocalCluster, run: Callable[[], Awaitable[None]]) -> tuple[float, Load]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.json"
        child = subprocess.Popen([sys.executable, __file__, "--load", ",".join(cluster.endpoints), "--json", str(out)])
        await asyncio.sleep(2.0)  # started, and writing steadily
        started = time.monotonic()
        await run()
        ended = time.monotonic()
        await asyncio.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        await asyncio.to_thread(child.wait, 30)
        data = json.loads(out.read_text())
    load = Load(cluster.endpoints, [tuple(x) for x in data["samples"]], data["errors"])
    load.started, load.ended = started, ended
    return ended - started, load


async def main_async(size_mb: int) -> tuple[list[dict], int, int]:
    with LocalCluster(3, extra_args=("--quota-backend-bytes", str(8 * 1024 * MiB))) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        size_ctl = await fragment(cluster, size_mb)

        async def by_etcdctl() -> None:
            await asyncio.to_thread(subprocess.run, [*cluster.etcdctl_args(), "defrag", "--cluster",
                                                     "--command-timeout=300s"], check=True, capture_output=True)
        ctl_time, ctl_load = await under_load(cluster, by_etcdctl)
        ctl = ctl_load.window(ctl_load.started, ctl_load.ended)

        size_bot = await fragment(cluster, size_mb)
        config = load_config(write_config(Path(tmp), [cluster_table("bench", cluster, timeout_seconds=5.0)],
                                          approval=APPROVAL))
        ctx = await BotContext.open(config, PlainNotifier(), PlainDirectory())
        runtime = await Runtime(ctx, watch=False, upkeep=False).start()
        try:
            outcome = await defrag.propose(ctx, config.clusters[0], "dbSize > 0", True, ONCALL, CHANNEL, "")
            assert outcome.ephemeral is None, outcome.ephemeral
            record = await ctx.store.open_plan("bench")
            assert record is not None

            async def by_bot() -> None:
                await lifecycle.approve(ctx, record, LEAD)
                await wait_done(ctx.store, record.id, timeout=900)
            bot_time, bot_load = await under_load(cluster, by_bot)
            bot = bot_load.window(bot_load.started, bot_load.ended)
            # the defragmentations alone: from the compaction to the last member's catch-up (store times are wall)
            to_mono = time.monotonic() - time.time()
            steps = {st.key: st for st in await ctx.store.steps(record.id)}
            ended = max(st.finished_at or 0.0 for k, st in steps.items() if k.startswith("defrag-"))  # all done
            phase = bot_load.window(steps["compact"].started_at + to_mono, ended + to_mono)
            phase_time = ended - steps["compact"].started_at
        finally:
            await runtime.stop()
            await ctx.close()
    print(f"fragmented DB: {size_ctl / 1e6:.0f} MB (etcdctl run), {size_bot / 1e6:.0f} MB (bot run); "
          f"writes during the runs: {ctl['writes']:.0f} / {bot['writes']:.0f}")
    peer = "etcdctl defrag --cluster"
    return [
        row("write latency p99, whole run", bot["p99"] * 1000, ctl["p99"] * 1000, "ms", peer),
        row("write latency max (the longest single write stall), whole run", bot["max"] * 1000, ctl["max"] * 1000,
            "ms", peer),
        row("longest time no write succeeded anywhere, whole run", bot["stall"] * 1000, ctl["stall"] * 1000, "ms",
            peer),
        row("total time (ours: approval to done, snapshot included)", bot_time, ctl_time, "s", peer),
        row("write latency p99, the defragmentations alone (ours: compact to the last catch-up)", phase["p99"] * 1000,
            ctl["p99"] * 1000, "ms", peer),
        row("write latency max, the defragmentations alone", phase["max"] * 1000, ctl["max"] * 1000, "ms", peer),
        row("longest time no write succeeded anywhere, the defragmentations alone", phase["stall"] * 1000,
            ctl["stall"] * 1000, "ms", peer),
        row("time of the defragmentations alone", phase_time, ctl_time, "s", peer),
    ], size_ctl, size_bot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=330)
    p.add_argument("--json")
    p.add_argument("--load", help=argparse.SUPPRESS)  # the load generator's child process: its endpoints
    args = p.parse_args(argv)
    if args.load:
        asyncio.run(load_process(args.load.split(","), Path(args.json)))
        return 0
    rows, size_ctl, size_bot = asyncio.run(main_async(args.size_mb))
    write(args.json, "Rolling defragmentation under write load", rows,
          f"3 members, each database fragmented to about {max(size_ctl, size_bot) / 1e6:.0f} MB (7 of 8 values "
          "overwritten and compacted: about a fifth in use) "
          "before each tool; one writer pinned to each member (as kubeadm's kube-apiservers use their local etcd), "
          "a 100-byte put every 20 ms each. The bot's total time includes the proposal's approval, every re-check, "
          "the verified snapshot and the leadership move.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
